"""End-to-end throughput of UpdateUserSegments (two slugs each, distinct users) on the embedded stack, from the
first publish until every result is out, and freshness (publish -> visible in the read API) under that load.

    .venv/bin/python bench/throughput.py --commands 50000              # burst: maximum throughput
    .venv/bin/python bench/throughput.py --commands 50000 --rate 5000  # freshness at a steady 5 000/s
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import aiohttp
from common import dev_stack, dumps, percentile
from streams import tail

from producers.client import SegmentationClient
from schemas.commands import CreateSegment
from service.infra import kafka


async def run(settings, commands: int, probes: int, rate: int) -> float:
    """Prints the figures; returns commands/s (publish to last result)."""
    base = f"http://127.0.0.1:{settings.http_port}"
    slugs = ["BENCH_A", "BENCH_B"]
    async with SegmentationClient(settings) as client:
        for slug in slugs:
            await client.request(CreateSegment(command_id=str(uuid.uuid4()), slug=slug))
    results = await tail(settings, settings.results_topic)
    producer = kafka.producer(settings, linger_ms=20)
    await producer.start()
    run_id = uuid.uuid4().hex[:8]
    wanted = {f"{run_id}-{i}" for i in range(commands)}
    done = asyncio.Event()

    async def collect() -> None:
        while wanted:
            batch = await results.getmany(timeout_ms=200, max_records=10_000)
            for recs in batch.values():
                for r in recs:
                    wanted.discard(json.loads(r.value)["command_id"])
        done.set()

    collector = asyncio.create_task(collect())
    freshness: list[float] = []

    async def probe(session: aiohttp.ClientSession, n: int) -> None:
        user = 9_000_000_000 + n
        t0 = time.perf_counter()
        await producer.send_and_wait(settings.commands_topic, dumps({
            "type": "UpdateUserSegments", "command_id": f"probe-{run_id}-{n}", "user_id": user, "add": slugs}),
            key=str(user).encode())
        while True:
            async with session.get(f"{base}/api/v1/users/{user}/segments") as r:
                body = await r.json()
            if len(body["segments"]) == 2:
                freshness.append(time.perf_counter() - t0)
                return
            await asyncio.sleep(0.01)

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        probe_tasks = []
        for i in range(commands):
            user = 1_000_000 + i
            await producer.send(settings.commands_topic, dumps({
                "type": "UpdateUserSegments", "command_id": f"{run_id}-{i}", "user_id": user, "add": slugs}),
                key=str(user).encode())
            if probes and i % max(1, commands // probes) == 0:
                probe_tasks.append(asyncio.create_task(probe(session, i)))
            if rate and i % 100 == 99:  # paced: hold the offered load at `rate` commands/s
                ahead = (i + 1) / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await producer.flush()
        published = time.perf_counter() - started
        await done.wait()
        elapsed = time.perf_counter() - started
        await asyncio.gather(*probe_tasks)
    collector.cancel()
    await producer.stop()
    await results.stop()
    print(f"commands: {commands}, published in {published:.2f} s")
    print(f"end-to-end: {elapsed:.2f} s -> {commands / elapsed:,.0f} commands/s (publish to last result)")
    if freshness:
        print(f"freshness (publish -> visible over HTTP) under load, {len(freshness)} probes: "
              f"p50 {percentile(freshness, 50) * 1000:.0f} ms, p99 {percentile(freshness, 99) * 1000:.0f} ms, "
              f"max {max(freshness) * 1000:.0f} ms")
    return commands / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--relays", type=int, default=1)
    parser.add_argument("--probes", type=int, default=None,
                        help="Freshness probes (default: 50 with --rate, none for a burst: their polling costs CPU).")
    parser.add_argument("--rate", type=int, default=0, help="Offered load in commands/s (0: publish at once).")
    args = parser.parse_args()
    if args.probes is None:
        args.probes = 50 if args.rate else 0
    with dev_stack(args.workers, relays=args.relays) as settings:
        asyncio.run(run(settings, args.commands, args.probes, args.rate))


if __name__ == "__main__":
    main()
