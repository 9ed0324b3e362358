"""UpdateSegmentMembers of 100 000 users in one command, on the embedded stack: from the publish of the command
until the bench consumer receives the last of its 100 000 `added` MembershipChanged events (and its result).
The users are new (each registered by the command) unless --known, and one rolled-out segment exists, so the
registration fan-out runs too (a further event per user in its bucket).

    .venv/bin/python bench/segment_members.py                   # 100 000 new users
    .venv/bin/python bench/segment_members.py --users 100000 --known
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from common import dev_stack
from streams import run_commands, tail

from service.infra import kafka


async def run(settings, users: int, known: bool, timeout: float) -> float:
    """Prints the figures; returns seconds from publish to the last event."""
    tag = uuid.uuid4().hex[:8]
    slug, rollout = f"BULK_{tag}", f"ROLL_{tag}"
    ids = list(range(7_000_000, 7_000_000 + users))
    setup = [(slug.encode(), {"type": "CreateSegment", "command_id": f"{tag}-s", "slug": slug}),
             (rollout.encode(), {"type": "CreateSegment", "command_id": f"{tag}-r", "slug": rollout,
                                 "auto_percent": 10})]
    await run_commands(settings, setup)
    if known:
        for i in range(0, users, 10_000):
            await run_commands(settings, [(str(ids[i]).encode(), {
                "type": "RegisterUsers", "command_id": f"{tag}-reg-{i}", "user_ids": ids[i:i + 10_000]})])
    events = await tail(settings, settings.membership_topic)
    results = await tail(settings, settings.results_topic)
    command = {"type": "UpdateSegmentMembers", "command_id": f"{tag}-bulk", "slug": slug, "add": ids,
               "ttl_seconds": 86_400}
    body = json.dumps(command, separators=(",", ":")).encode()
    producer = kafka.producer(settings, max_request_size=4 * 1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    await producer.send_and_wait(settings.commands_topic, body, key=slug.encode())
    await producer.stop()
    added: set[int] = set()
    result = None
    last_event = result_at = started
    deadline = started + timeout
    while (len(added) < users or result is None) and time.perf_counter() < deadline:
        for recs in (await events.getmany(timeout_ms=50, max_records=20_000)).values():
            for r in recs:
                e = json.loads(r.value)
                if e["slug"] == slug and e["change"] == "added":
                    added.add(e["user_id"])
                    last_event = time.perf_counter()
        for recs in (await results.getmany(timeout_ms=0)).values():
            for r in recs:
                if json.loads(r.value)["command_id"] == command["command_id"]:
                    result, result_at = json.loads(r.value), time.perf_counter()
    await events.stop()
    await results.stop()
    print(f"UpdateSegmentMembers of {users} {'known' if known else 'new'} users ({len(body)} bytes): "
          f"result {result and result['status']} with {result and result['events']} events; "
          f"{len(added)}/{users} added events, publish -> last event {last_event - started:.2f} s "
          f"(-> result {result_at - started:.2f} s)")
    return last_event - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--known", action="store_true", help="Register the users first (no registration fan-out).")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    with dev_stack() as settings:
        asyncio.run(run(settings, args.users, args.known, args.timeout))


if __name__ == "__main__":
    main()
