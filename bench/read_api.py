"""Read API latency: GET /api/v1/users/{id}/segments on the embedded stack for a user with 20 segments (10 rollouts
at 100 %, 10 explicit), and for an unknown user id (the 10 rollouts, computed from the bucket). N requests
sequentially (one keep-alive connection), then N with --concurrency in flight; p50/p99 latency and requests/s.
The bench client runs on the same machine (2 cores) as the API and PostgreSQL.

    .venv/bin/python bench/read_api.py
    .venv/bin/python bench/read_api.py --requests 20000 --concurrency 32
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aiohttp
from common import dev_stack, percentile
from streams import run_commands

KNOWN, UNKNOWN = 42, 7_777_777_777


async def load(session: aiohttp.ClientSession, url: str, requests: int, concurrency: int, segments: int) -> str:
    latencies: list[float] = []
    left = iter(range(requests))

    async def client() -> None:
        for _ in left:
            t0 = time.perf_counter()
            async with session.get(url) as r:
                body = await r.json()
            latencies.append(time.perf_counter() - t0)
            if r.status != 200 or len(body["segments"]) != segments:
                raise RuntimeError(f"unexpected answer {r.status}: {body}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return (f"p50 {percentile(latencies, 50) * 1000:.2f} ms, p99 {percentile(latencies, 99) * 1000:.2f} ms, "
            f"{requests / wall:,.0f} requests/s")


async def run(settings, requests: int, concurrency: int) -> None:
    run_id = uuid.uuid4().hex[:8]
    rollouts = [f"R{i:02d}_{run_id}" for i in range(10)]
    plain = [f"P{i:02d}_{run_id}" for i in range(10)]
    await run_commands(settings, [(s.encode(), {"type": "CreateSegment", "command_id": f"{run_id}-{s}", "slug": s,
                                                "auto_percent": 100 if s in rollouts else 0}) for s in rollouts + plain])
    await run_commands(settings, [(str(KNOWN).encode(), {"type": "UpdateUserSegments", "command_id": f"{run_id}-user",
                                                         "user_id": KNOWN, "add": plain})])
    base = f"http://127.0.0.1:{settings.http_port}/api/v1/users"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for user, segments, label in ((KNOWN, 20, "user with 20 segments"), (UNKNOWN, 10, "unknown user (10 rollouts)")):
            url = f"{base}/{user}/segments"
            await load(session, url, 200, 1, segments)  # warm-up: connections, pool, plans
            runs = [f"concurrency {c}: {await load(session, url, requests, c, segments)}" for c in (1, concurrency)]
            print(f"{label}, {requests} requests each; " + "; ".join(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with dev_stack() as settings:
        asyncio.run(run(settings, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
