"""The read row of `make bench` alone, in about a minute a round: the dev stack (`--api-processes N`), a user with
3 explicit segments as bench.py seeds it, `wrk -t1 -c32 -d8s --latency` on the project, then naive_api.py under
the same command; several rounds, each pair in the same minute, and the median ratio. `--no-cache` sets
READ_CACHE_MB=0: every request queries PostgreSQL, as a user's first read after a change does (the cost of a
miss; the naive always queries).

    .venv/bin/python bench/read_row.py --rounds 4 --api-processes 2
    .venv/bin/python bench/read_row.py --rounds 4 --no-cache
"""
from __future__ import annotations

import argparse
import asyncio
import statistics

from common import dev_stack

from bench import naive_read, seed_read_user, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--no-cache", action="store_true", help="READ_CACHE_MB=0: no answer kept in memory")
    args = parser.parse_args()
    ratios = []
    env = {"API_PROCESSES": str(args.api_processes)} | ({"READ_CACHE_MB": "0"} if args.no_cache else {})
    with dev_stack(2, extra_env=env) as settings:
        url = asyncio.run(seed_read_user(settings))
        for _ in range(args.rounds):
            (ours, ours_p99), (naive, naive_p99) = wrk(url), naive_read()
            ratios.append(ours / naive)
            print(f"project {ours:,.0f} req/s p99 {ours_p99:.1f} ms | naive {naive:,.0f} req/s p99 {naive_p99:.1f} ms"
                  f" | ratio {ours / naive:.2f}", flush=True)
    print(f"median ratio {statistics.median(ratios):.2f} over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
