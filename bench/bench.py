"""`make bench`: every measure of the performance table in one run, the project beside the naive baselines of
../shared/bench (same machine, same run), printed as one table with the ratios.

  1. the project's dev stack (`segmentation dev --workers W --relays R`): e2e throughput, then naive_e2e.py with
     the same number of commands; the read API under wrk, then naive_api.py under the same wrk command (each
     baseline right after its counterpart, the stack idle meanwhile: both see the same load of a shared machine);
  2. TTL lag, rollout fan-out, GET /segments with two segments empty and then of 10 % of the registered users.

    make bench
    .venv/bin/python bench/bench.py --workers 1 --relays 2
    .venv/bin/python bench/bench.py --commands 10000 --users 100000     # a quicker pass

Absolute figures move by half between machines and with other load: read the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import rollout
import throughput
import ttl_lag
from common import dev_stack, percentile
from streams import run_commands

from service.dev import embedded


def _naive_dir() -> Path:
    """NAIVE_BENCH_DIR, else shared/bench beside the project (or beside one of its parent folders)."""
    if "NAIVE_BENCH_DIR" in os.environ:
        return Path(os.environ["NAIVE_BENCH_DIR"])
    here = Path(__file__).resolve().parent.parent
    return next((p / "shared" / "bench" for p in here.parents if (p / "shared" / "bench").is_dir()), here / "shared")


NAIVE = _naive_dir()
WRK = ["wrk", "-t1", "-c32", "-d8s", "--latency"]
READ_USER = 42


def wrk(url: str) -> tuple[float, float]:
    """Requests/s and p99 latency (ms) of the issue's wrk command against `url`."""
    out = subprocess.run([*WRK, url], capture_output=True, text=True, check=True).stdout
    if re.search(r"Non-2xx", out):
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out).groups()
    return rate, float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def segment_list_ms(settings, requests: int = 200) -> float:
    """p50 of GET /api/v1/segments, sequential on one connection."""
    url = f"http://127.0.0.1:{settings.http_port}/api/v1/segments"
    async with aiohttp.ClientSession() as session:
        took = []
        for _ in range(requests):
            t0 = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                r.raise_for_status()
            took.append(time.perf_counter() - t0)
    return percentile(took, 50) * 1000


async def seed_read_user(settings) -> str:
    """READ_USER in 3 new segments (the read measure's user); returns the URL of its segments."""
    run_id = uuid.uuid4().hex[:6]
    slugs = [f"READ{i}_{run_id}" for i in range(3)]
    await run_commands(settings, [(s.encode(), {"type": "CreateSegment", "command_id": f"{run_id}-{s}", "slug": s})
                                  for s in slugs])
    await run_commands(settings, [(str(READ_USER).encode(), {"type": "UpdateUserSegments", "command_id": f"{run_id}-u",
                                                             "user_id": READ_USER, "add": slugs})])
    return f"http://127.0.0.1:{settings.http_port}/api/v1/users/{READ_USER}/segments"


async def project(settings, args, naive: dict) -> dict:
    """The project's measures; each baseline runs right after its counterpart (the stack idle meanwhile), so
    that both see the same load of a shared machine."""
    got: dict = {}
    got["e2e"] = await throughput.run(settings, args.commands, 0, 0)
    naive["e2e"] = await asyncio.to_thread(naive_e2e, args.commands)
    run_id = uuid.uuid4().hex[:6]
    got["read"] = await asyncio.to_thread(wrk, await seed_read_user(settings))
    print(f"read API, a user's 3 segments, {' '.join(WRK)}: {got['read'][0]:,.0f} requests/s, p99 {got['read'][1]:.1f} ms")
    naive["read"] = await asyncio.to_thread(naive_read)
    got["ttl"] = await ttl_lag.run(settings, args.ttl_users, args.ttl_lead, 60.0)
    listed = [f"LIST{i}_{run_id}" for i in range(2)]
    await run_commands(settings, [(s.encode(), {"type": "CreateSegment", "command_id": f"{run_id}-{s}", "slug": s})
                                  for s in listed])
    got["list_empty"] = await segment_list_ms(settings)
    got["rollout"] = (await rollout.run(settings, args.users, 120.0, segment_id=None))[0]
    for s in listed:  # 10 % of the registered users each; every event out: measured idle, as the empty list was
        await rollout.fan_out(settings, {"type": "UpdateSegment", "command_id": f"{run_id}-{s}-10", "slug": s,
                                         "auto_percent": 10}, s, 300)
    got["list_full"] = await segment_list_ms(settings)
    print(f"GET /segments p50: {got['list_empty']:.2f} ms with the 2 listed segments empty, "
          f"{got['list_full']:.2f} ms with {args.users // 10:,} members each")
    return got


def naive_e2e(commands: int) -> float:
    out = subprocess.run([sys.executable, str(NAIVE / "naive_e2e.py"), str(commands)], capture_output=True, text=True,
                         check=True, timeout=600).stdout.strip().splitlines()
    print(f"naive e2e: {out[-2]}")
    return float(out[-1])


def naive_read() -> tuple[float, float]:
    port = embedded.free_port()
    proc = subprocess.Popen([sys.executable, str(NAIVE / "naive_api.py"), str(port)])
    try:
        embedded.wait_port("127.0.0.1", port, timeout=60, proc=proc)
        got = wrk(f"http://127.0.0.1:{port}/api/v1/users/1/segments")
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"naive read API: {got[0]:,.0f} requests/s, p99 {got[1]:.1f} ms")
    return got


def table(p: dict, naive: dict, args) -> str:
    rows = [
        ("e2e `UpdateUserSegments`, 2 slugs, publish -> last result", f"{p['e2e']:,.0f} cmd/s",
         f"{naive['e2e']:,.0f} cmd/s", f"{p['e2e'] / naive['e2e']:.2f}", ">= 1.0"),
        ("read: a user's segments, `wrk -t1 -c32 -d8s`", f"{p['read'][0]:,.0f} req/s, p99 {p['read'][1]:.1f} ms",
         f"{naive['read'][0]:,.0f} req/s, p99 {naive['read'][1]:.1f} ms", f"{p['read'][0] / naive['read'][0]:.2f}",
         ">= 1.2, p99 below naive's"),
        (f"TTL: {args.ttl_users:,} memberships due in one second, `expires_at` -> event", f"max {p['ttl']:.2f} s",
         "", "", "max <= 1 s"),
        (f"rollout: 10 % of {args.users:,} users, publish -> last event", f"{p['rollout']:.1f} s", "", "",
         "<= 6 s"),
        (f"`GET /segments`, 2 segments of {args.users // 10:,} members (p50; empty: {p['list_empty']:.1f} ms)",
         f"{p['list_full']:.1f} ms", "", f"{p['list_full'] / p['list_empty']:.2f} of empty",
         "independent of member count"),
    ]
    lines = ["| measure | project | naive | ratio | goal |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=1_000_000, help="Registered users of the rollout measure.")
    parser.add_argument("--ttl-users", type=int, default=10_000)
    parser.add_argument("--ttl-lead", type=float, default=30.0,
                        help="Seconds from seeding to expires_at (seeding must finish first, on a loaded machine too).")
    parser.add_argument("--workers", type=int, default=2,
                        help="Worker processes (2 on 2 cores: one's Python runs while the other waits on PostgreSQL).")
    parser.add_argument("--relays", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the read measure (Debian: apt-get install wrk)")
    if not (NAIVE / "naive_e2e.py").exists():
        raise SystemExit(f"no naive baselines in {NAIVE} (set NAIVE_BENCH_DIR)")
    started = time.perf_counter()
    naive: dict = {}
    with dev_stack(args.workers, relays=args.relays) as settings:
        p = asyncio.run(project(settings, args, naive))
    print(f"\n--workers {args.workers} --relays {args.relays}, {args.commands:,} commands; "
          f"{os.cpu_count()} cores; {time.perf_counter() - started:.0f} s\n")
    print(table(p, naive, args))


if __name__ == "__main__":
    main()
