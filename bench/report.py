"""History report: a month of N `membership_history` rows (seeded with generate_series SQL straight into an embedded
PostgreSQL, plus rows in the months around it), then GET /api/v1/reports/history.csv for that month streamed from a
real `segmentation api` process. Measures wall time, rows, bytes, and the API process's peak RSS (psutil, every
50 ms while streaming). Targets: <= 10 s, API process < 200 MB.

    .venv/bin/python bench/report.py                     # 1 000 000 rows in 2024-03
    .venv/bin/python bench/report.py --rows 3000000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import common  # noqa: F401  (puts the project on sys.path)
import psutil

from service.dev import embedded
from service.infra import db

YEAR, MONTH = 2024, 3
# $1 rows, $2 first instant, $3 span: rows spread evenly over [$2, $2 + $3), 20 slugs, alternating operations.
SEED = """
INSERT INTO membership_history (user_id, slug, segment_id, operation, occurred_at, reason, command_id)
SELECT 1000000 + (i::bigint * 7919) % 500000, 'SEGMENT_' || (i % 20), 1 + i % 20,
       CASE WHEN i % 2 = 0 THEN 'added' ELSE 'removed' END,
       $2::timestamptz + $3::interval * (i::float8 / $1),
       (ARRAY['command', 'auto_percent', 'expired', 'segment_deleted'])[1 + i % 4], 'cmd-' || i
FROM generate_series(0, $1 - 1) AS i
"""


async def seed(url: str, rows: int) -> float:
    started = time.perf_counter()
    await db.ensure_database(url)
    await db.migrate(url)
    conn = await asyncpg.connect(url)
    try:
        for n, month, days in ((rows, 3, 31), (rows // 10, 2, 29), (rows // 10, 4, 30)):  # 2 and 4: left out
            await conn.execute(SEED, n, datetime(YEAR, month, 1, tzinfo=UTC), timedelta(days=days))
        await conn.execute("VACUUM ANALYZE membership_history")
    finally:
        await conn.close()
    return time.perf_counter() - started


def sample_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.05)


async def stream(url: str) -> tuple[int, int, float]:
    rows = size = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(url) as r:
            r.raise_for_status()
            async for chunk in r.content.iter_chunked(1 << 16):
                size += len(chunk)
                rows += chunk.count(b"\n")
    return rows - 1, size, time.perf_counter() - started  # minus the header line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with embedded.postgres() as database:
        seeded_in = asyncio.run(seed(database, args.rows))
        port = embedded.free_port()
        env = os.environ | {"DATABASE_URL": database, "HTTP_PORT": str(port), "LOG_LEVEL": "WARNING",
                            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{embedded.free_port()}"}  # the report needs none
        api = subprocess.Popen([sys.executable, "-m", "service.cli", "api"], env=env)
        try:
            embedded.wait_port("127.0.0.1", port, timeout=30, proc=api)
            baseline = psutil.Process(api.pid).memory_info().rss
            peak, stop = [baseline], threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(api.pid, stop, peak), daemon=True)
            sampler.start()
            url = f"http://127.0.0.1:{port}/api/v1/reports/history.csv?year={YEAR}&month={MONTH}"
            rows, size, wall = asyncio.run(stream(url))
            stop.set()
            sampler.join()
        finally:
            api.terminate()
            api.wait(15)
    print(f"seeded {args.rows:,} rows for {YEAR}-{MONTH:02d} (+{2 * (args.rows // 10):,} around it) "
          f"with generate_series SQL in {seeded_in:.1f} s")
    print(f"history.csv {YEAR}-{MONTH:02d}: {rows:,} rows, {size / 1e6:.1f} MB in {wall:.2f} s "
          f"({rows / wall:,.0f} rows/s); API RSS {baseline / 2**20:.0f} MB before, peak {peak[0] / 2**20:.0f} MB "
          f"(targets: <= 10 s, < 200 MB)")


if __name__ == "__main__":
    main()
