"""TTL lag: N memberships (distinct users) expiring in the same second, from `expires_at` until the bench consumer
receives each `removed`/`expired` MembershipChanged event. Everything goes through Kafka on the embedded stack:
UpdateUserSegments commands with one `expires_at` (a whole second, --lead seconds ahead), all results awaited,
then the membership-changed topic is tailed until every expiry event has arrived. Target: max lag <= 1 s.

    .venv/bin/python bench/ttl_lag.py                     # 10 000 memberships
    .venv/bin/python bench/ttl_lag.py --users 1000 --lead 5
    .venv/bin/python bench/ttl_lag.py --workers 2         # two worker processes
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from common import dev_stack, percentile
from streams import run_commands, tail

from schemas.common import format_time


async def run(settings, users: int, lead: float, timeout: float) -> float:
    """Prints the figures; returns the worst lag in seconds."""
    slug = f"TTL_{uuid.uuid4().hex[:8]}"
    run_id = uuid.uuid4().hex[:8]
    create = {"type": "CreateSegment", "command_id": f"{run_id}-seg", "slug": slug}
    await run_commands(settings, [(slug.encode(), create)])
    events = await tail(settings, settings.membership_topic)
    expires = (datetime.now(UTC) + timedelta(seconds=lead)).replace(microsecond=0) + timedelta(seconds=1)
    stamp = format_time(expires)
    commands = [(str(u).encode(), {"type": "UpdateUserSegments", "command_id": f"{run_id}-{u}", "user_id": u,
                                   "add": [{"slug": slug, "expires_at": stamp}]})
                for u in range(5_000_000, 5_000_000 + users)]
    started = time.perf_counter()
    await run_commands(settings, commands)
    applied_in = time.perf_counter() - started
    ahead = expires.timestamp() - time.time()
    if ahead <= 0:
        raise SystemExit(f"seeding took {applied_in:.1f} s, past expires_at: raise --lead")
    lags: dict[int, float] = {}
    deadline = expires.timestamp() + timeout
    while len(lags) < users and time.time() < deadline:
        for recs in (await events.getmany(timeout_ms=100, max_records=10_000)).values():
            received = time.time()
            for r in recs:
                e = json.loads(r.value)
                if e["slug"] == slug and e["change"] == "removed" and e["reason"] == "expired":
                    lags.setdefault(e["user_id"], received - expires.timestamp())
    await events.stop()
    values = list(lags.values())
    print(f"seeded {users} memberships expiring at {stamp} in {applied_in:.2f} s (through Kafka), "
          f"{ahead:.1f} s before expiry")
    if not values:
        raise SystemExit("no expiry event received")
    print(f"expiry events received: {len(values)}/{users}; lag expires_at -> received: "
          f"min {min(values):.3f} s, p50 {percentile(values, 50):.3f} s, p99 {percentile(values, 99):.3f} s, "
          f"max {max(values):.3f} s (target max <= 1 s)")
    return max(values) if len(values) == users else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--lead", type=float, default=10.0, help="Seconds between now and expires_at.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Give up this long after expires_at.")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with dev_stack(args.workers) as settings:
        asyncio.run(run(settings, args.users, args.lead, args.timeout))


if __name__ == "__main__":
    main()
