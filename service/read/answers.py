"""Each user's answer now, kept in the API process and dropped when a commit changes it.

The hottest route answers from memory: the body of `GET /api/v1/users/{id}/segments` (no `at`, `explain` or
`after`) as PostgreSQL last gave it. Migration 012's triggers notify `segmentation_users` at commit with the ids
of the users whose memberships or exclusions a statement changed, or '*' for everyone (a segment changed); the
process's LISTEN connection (service/read/waiters.py) hands each payload to `changed`.

Why an answer is never kept stale:
- A read takes `epoch` before its query and stores its answer only if no notification came in between. A commit
  its snapshot missed notifies after the snapshot, so either before the store (refused) or after it (dropped).
- Notifications are lost while the connection is down: losing it, and listening again, flush everything, and
  nothing is stored or served unless the connection answered within the last `LIVENESS_SECONDS` (a connection
  silently gone stops answering the listener's heartbeat). The freshness bound of the contract (1 s) holds.
- Time changes an answer only where a membership expires: an answer is kept with its earliest expiry and not
  served from that instant on (the database's clock decided the rows, this process's clock the expiry).
Bounded: the `size` users served last (least recently used out first); 0 keeps nothing.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime

CHANNEL = "segmentation_users"
EVERYONE = "*"
LIVENESS_SECONDS = 1.0  # served only while the listener proved itself within this long (its heartbeat: 0.25 s)
NEVER = float("inf")


class UserAnswers:
    __slots__ = ("size", "entries", "epoch", "live_until")

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[int, tuple[bytes, float]] = OrderedDict()  # user id -> (body, expires, epoch s)
        self.epoch = 0  # notifications and flushes seen: a read stores only if none came during it
        self.live_until = 0.0  # time.monotonic() until which the listener is known to deliver

    def get(self, user_id: int) -> bytes | None:
        """The kept body, or None (not kept, expired, or the listener not known to be live)."""
        entry = self.entries.get(user_id)
        if entry is None or time.monotonic() >= self.live_until:
            return None
        if entry[1] <= time.time():
            del self.entries[user_id]
            return None
        self.entries.move_to_end(user_id)
        return entry[0]

    def put(self, user_id: int, epoch: int, body: bytes, expires: datetime | None) -> None:
        """Keep `body`, read by a query started at `epoch`, until `expires` (its earliest membership expiry)."""
        if epoch != self.epoch or self.size <= 0 or time.monotonic() >= self.live_until:
            return
        self.entries[user_id] = (body, NEVER if expires is None else expires.timestamp())
        self.entries.move_to_end(user_id)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def changed(self, payload: str) -> None:
        """A notification of `CHANNEL`: those users' answers (or everyone's) changed."""
        self.epoch += 1
        if payload == EVERYONE:
            self.entries.clear()
            return
        pop = self.entries.pop
        try:
            for user_id in payload.split(","):
                pop(int(user_id), None)
        except ValueError:  # not a payload of migration 012's: whose answer changed is unknown
            self.entries.clear()

    def alive(self) -> None:
        """The listener delivered everything committed until a moment ago."""
        self.live_until = time.monotonic() + LIVENESS_SECONDS

    def reset(self) -> None:
        """The listener lost its connection or listens anew: what was kept may have missed notifications."""
        self.epoch += 1
        self.entries.clear()
        self.live_until = 0.0


def earliest_expiry(rows) -> datetime | None:
    return min((r["expires_at"] for r in rows if r["expires_at"] is not None), default=None)
