"""The read API's options against a plain GET /api/v1/users/{id}/segments for a user with 20 segments (10 rollouts
at 100 %, 10 explicit): at= (over a history of N membership_history rows, default 1 000 000), explain=true,
after= (a processed command), both at= and explain=, a page of members, the segment history, members.csv.
Commands are applied through the batch processor (the triggers of migration 005 keep the history), the bulk
history rows are seeded with generate_series SQL, and a real `segmentation api` process answers. Each variant:
`--requests` sequential requests on one keep-alive connection after a warm-up, rounds interleaved so that
the load of other processes on the machine hits every variant alike. Prints p50 and mean, and the ratio to
the plain GET (the target: at most 2).

    .venv/bin/python bench/read_options.py
    .venv/bin/python bench/read_options.py --rows 3000000 --requests 2000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
from common import percentile

from service.dev import embedded
from service.infra import db
from tests.support.batch import Feeder, create, update_user

USER = 42
START = datetime(2025, 1, 1, tzinfo=UTC)
# $1 rows, spread over 2025 for 200 000 other users and 20 segments; the bench user's own rows come from commands.
SEED = """
INSERT INTO membership_history (user_id, slug, segment_id, operation, occurred_at, reason, command_id)
SELECT 1000000 + (i::bigint * 7919) % 200000, 'BULK_' || (i % 20), 100000 + i % 20,
       CASE WHEN i % 2 = 0 THEN 'added' ELSE 'removed' END,
       timestamptz '2025-01-01' + interval '365 days' * (i::float8 / $1), 'command', 'bulk-' || i
FROM generate_series(0, $1 - 1) AS i
"""


async def seed(url: str, rows: int) -> str:
    """The bench user's life over 2025 through real commands; returns a command id that was processed."""
    await db.ensure_database(url)
    await db.migrate(url)
    conn = await asyncpg.connect(url)
    try:
        f = Feeder(conn, now=START)
        rollouts, plain = [f"R{i:02d}" for i in range(10)], [f"P{i:02d}" for i in range(10)]
        await f.apply(*[create(s, percent=50) for s in rollouts], *[create(s) for s in plain])
        for day in range(1, 300, 3):  # percents moving, memberships coming and going
            f.now = START + timedelta(days=day)
            await f.apply(*[{"type": "UpdateSegment", "command_id": f"u{day}-{s}", "slug": s,
                             "auto_percent": 100 if day % 2 else 60} for s in rollouts],
                          update_user(f"add{day}", USER, add=plain), update_user(f"rm{day}", USER, remove=plain[:5]))
        f.now = START + timedelta(days=301)
        await f.apply(*[{"type": "UpdateSegment", "command_id": f"final-{s}", "slug": s, "auto_percent": 100}
                        for s in rollouts], update_user("final", USER, add=plain))
        await conn.execute(SEED, rows)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return "final"


async def measure(base: str, variants: dict[str, str], requests: int, rounds: int = 5) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in variants}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async def get(path: str) -> float:
            t0 = time.perf_counter()
            async with session.get(base + path) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{path}: HTTP {r.status}: {await r.text()}")
            return time.perf_counter() - t0

        for path in variants.values():
            for _ in range(100):  # warm-up: connection, pool, plans
                await get(path)
        for _ in range(rounds):
            for name, path in variants.items():
                for _ in range(requests // rounds):
                    timings[name].append(await get(path))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=1_000)
    args = parser.parse_args()
    with embedded.postgres() as database:
        started = time.perf_counter()
        processed = asyncio.run(seed(database, args.rows))
        print(f"seeded the user's life and {args.rows:,} bulk history rows in {time.perf_counter() - started:.1f} s")
        port = embedded.free_port()
        env = os.environ | {"DATABASE_URL": database, "HTTP_PORT": str(port), "LOG_LEVEL": "WARNING",
                            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{embedded.free_port()}"}  # reads need none
        api = subprocess.Popen([sys.executable, "-m", "service.cli", "api"], env=env)
        try:
            embedded.wait_port("127.0.0.1", port, timeout=30, proc=api)
            user = f"/api/v1/users/{USER}/segments"
            middle = (START + timedelta(days=150, hours=12)).isoformat().replace("+00:00", "Z")
            variants = {
                "plain": user,
                "at= (mid-history)": f"{user}?at={middle}",
                "explain=true": f"{user}?explain=true",
                "at= & explain=true": f"{user}?at={middle}&explain=true",
                "after= (processed)": f"{user}?after={processed}",
                "members?limit=20": "/api/v1/segments/P00/members?limit=20",
                "segment history": "/api/v1/segments/R00/history",
                "members.csv": "/api/v1/segments/P00/members.csv",
            }
            timings = asyncio.run(measure(f"http://127.0.0.1:{port}", variants, args.requests))
        finally:
            api.terminate()
            api.wait(15)
    base_p50 = percentile(timings["plain"], 50)
    base_mean = sum(timings["plain"]) / len(timings["plain"])
    for name, values in timings.items():
        p50, mean = percentile(values, 50), sum(values) / len(values)
        print(f"{name:<22} p50 {p50 * 1000:6.2f} ms ({p50 / base_p50:4.2f}x)   mean {mean * 1000:6.2f} ms "
              f"({mean / base_mean:4.2f}x)   p99 {percentile(values, 99) * 1000:6.2f} ms")


if __name__ == "__main__":
    main()
