"""Percent rollout fan-out on the embedded stack: N registered users (seeded through Kafka with RegisterUsers
commands of 10 000 ids each), then `CreateSegment` with auto_percent 10 and `UpdateSegment` 10 -> 20, each timed
from its publish until all of its MembershipChanged events (as many as its result's `events`) are received from
the membership-changed topic. The counts are checked offline against service.bucket. Target: <= 15 s each.

    .venv/bin/python bench/rollout.py                    # 1 000 000 users
    .venv/bin/python bench/rollout.py --users 100000
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import orjson
from common import dev_stack
from streams import run_commands, tail

from service.bucket import bucket, segment_salt

CHUNK = 10_000


async def fan_out(settings, command: dict, slug: str, timeout: float) -> tuple[dict, float, float, set[int]]:
    """Publish one segment command; return its result, seconds to the result and to its last event, the users."""
    events = await tail(settings, settings.membership_topic)
    users: set[int] = set()
    result: dict = {}
    last_at = 0.0

    # The subscriber shares the 2 cores with the stack it measures: it parses only the events of this command
    # (found by their command id's bytes) and with orjson (json.loads took ~0.3 s of CPU per 100 000 events).
    mark = orjson.dumps({"command_id": command["command_id"]})[1:-1]

    async def collect() -> None:
        nonlocal last_at
        while not (result and len(users) >= result["events"]):
            for recs in (await events.getmany(timeout_ms=100, max_records=20_000)).values():
                for r in recs:
                    if mark not in r.value:
                        continue
                    e = orjson.loads(r.value)
                    if e["slug"] == slug and e["command_id"] == command["command_id"]:
                        users.add(e["user_id"])
                        last_at = time.perf_counter()

    collector = asyncio.create_task(collect())
    results, started, result_at = await run_commands(settings, [(slug.encode(), command)])
    result.update(results[command["command_id"]])
    await asyncio.wait_for(collector, timeout)
    await events.stop()
    return result, result_at - started, last_at - started, users


async def run(settings, users: int, timeout: float, segment_id: int | None = 1) -> list[float]:
    """Prints the figures; returns each step's seconds from publish to its last event."""
    run_id = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    await run_commands(settings, [
        (str(first).encode(), {"type": "RegisterUsers", "command_id": f"{run_id}-reg-{first}",
                               "user_ids": list(range(first, min(first + CHUNK, users + 1)))})
        for first in range(1, users + 1, CHUNK)], timeout=600)
    print(f"seeded {users:,} users through Kafka (RegisterUsers x {CHUNK:,} ids) in {time.perf_counter() - started:.1f} s")

    slug = f"ROLL_{run_id}"
    steps = [("CreateSegment 0 -> 10%", {"type": "CreateSegment", "command_id": f"{run_id}-create", "slug": slug,
                                         "auto_percent": 10}, 0, 1000),
             ("UpdateSegment 10 -> 20%", {"type": "UpdateSegment", "command_id": f"{run_id}-update", "slug": slug,
                                          "auto_percent": 20}, 1000, 2000)]
    took = []
    for name, command, low, high in steps:
        result, to_result, to_last, got = await fan_out(settings, command, slug, timeout)
        # The salt is slug:segment id; a fresh stack's first segment has id 1 (None: not checked).
        check = "not checked against service.bucket"
        if segment_id is not None:
            expected = sum(1 for u in range(1, users + 1) if low <= bucket(segment_salt(slug, segment_id), u) < high)
            check = "matches service.bucket" if expected == len(got) else f"service.bucket says {expected}"
        print(f"{name}: {len(got):,} events (result says {result['events']:,}; {check}); "
              f"result after {to_result:.2f} s, last event after {to_last:.2f} s (target <= 6 s)")
        took.append(to_last)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=120.0, help="Give up on a step after this many seconds.")
    args = parser.parse_args()
    with dev_stack() as settings:
        asyncio.run(run(settings, args.users, args.timeout))


if __name__ == "__main__":
    main()
