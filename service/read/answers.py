"""Each user's answer now, kept in the API process and dropped when a commit changes it.

The hottest route answers from memory: the body of `GET /api/v1/users/{id}/segments` (no `at`, `explain` or
`after`) as PostgreSQL last gave it. Migration 012's triggers notify `segmentation_users` at commit with the ids
of the users whose memberships or exclusions a statement changed, or '*' for everyone (a segment changed); the
process's LISTEN connection (service/read/waiters.py) hands each payload to `changed`.

Why an answer is never kept stale:
- A read takes `epoch` before its query and stores its answer only if no notification naming its user (or
  everyone) came in between. A commit its snapshot missed notifies after the snapshot, so either before the store
  (refused) or after it (dropped). Another user's change refuses nothing: under a steady stream of writes a read
  of a user nobody changes is still kept. Who changed when is remembered for the last `CHANGES_KEPT`
  notified users; a read older than the oldest change forgotten is refused (it may have been overtaken).
- Notifications are lost while the connection is down: losing it, and listening again, flush everything, and
  nothing is stored or served unless the listener's last heartbeat was sent within `LIVENESS_SECONDS` (a
  connection silently gone stops answering it): the contract's freshness (1 s) holds.
- Time changes an answer only where a membership expires: an answer is kept until its earliest expiry, in the
  database's clock (the heartbeat measures its offset from this host's monotonic clock: deadlines run on that
  one, so a step of the host's wall clock stretches none).
- Whatever nobody foresaw (triggers disabled, a write with `session_replication_role = replica`): no answer is
  kept longer than `MAX_AGE_SECONDS`.
`after=` never reads from here. Bounded: about `budget` bytes of bodies, the least recently served out first.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime

CHANNEL = "segmentation_users"
EVERYONE = "*"
LIVENESS_SECONDS = 0.5  # served only while the listener's last heartbeat was sent within this long
MAX_AGE_SECONDS = 60.0
ENTRY_BYTES = 200  # what an entry costs beside its body (key, tuple, float, the ordered dict's links)
CHANGES_KEPT = 65_536  # users whose last change's epoch is remembered (~100 B each): seconds of changes at any rate


class UserAnswers:
    __slots__ = ("budget", "used", "entries", "epoch", "changed_at", "unknown_before", "live_until",
                 "database_offset")

    def __init__(self, budget: int):
        self.budget = budget  # bytes; 0 keeps nothing
        self.used = 0
        self.entries: OrderedDict[int, tuple[bytes, float]] = OrderedDict()  # user id -> (body, monotonic deadline)
        self.epoch = 0  # notifications and flushes seen: a read started at `epoch` e stores only if none since e
        # named its user: user id -> the epoch of the last notification naming them (the oldest first) ...
        self.changed_at: OrderedDict[int, int] = OrderedDict()
        # ... and a read started before this epoch is refused (a flush, or a change no longer in `changed_at`)
        self.unknown_before = 0
        self.live_until = 0.0  # time.monotonic() until which the listener is known to deliver
        # The database's clock minus time.monotonic(), seconds: the host's wall clock may step, this does not.
        self.database_offset = time.time() - time.monotonic()

    def get(self, user_id: int) -> bytes | None:
        """The kept body, or None (not kept, past its deadline, or the listener not known to be live)."""
        entry = self.entries.get(user_id)
        if entry is None or time.monotonic() >= self.live_until:
            return None
        if entry[1] <= time.monotonic():
            self._drop(user_id)
            return None
        self.entries.move_to_end(user_id)
        return entry[0]

    def put(self, user_id: int, epoch: int, body: bytes, expires: datetime | None) -> None:
        """Keep `body`, read by a query started at `epoch`, until `expires` (its earliest membership expiry)."""
        if epoch < self.unknown_before or self.changed_at.get(user_id, -1) > epoch \
                or time.monotonic() >= self.live_until or len(body) + ENTRY_BYTES > self.budget:
            return
        deadline = time.monotonic() + MAX_AGE_SECONDS
        if expires is not None:
            deadline = min(deadline, expires.timestamp() - self.database_offset)
        self._drop(user_id)
        self.entries[user_id] = (body, deadline)
        self.used += len(body) + ENTRY_BYTES
        while self.used > self.budget:
            _, (old, _) = self.entries.popitem(last=False)
            self.used -= len(old) + ENTRY_BYTES

    def _drop(self, user_id: int) -> None:
        entry = self.entries.pop(user_id, None)
        if entry is not None:
            self.used -= len(entry[0]) + ENTRY_BYTES

    def changed(self, payload: str) -> None:
        """A notification of `CHANNEL`: those users' answers (or everyone's) changed."""
        self.epoch += 1
        if payload == EVERYONE:
            self._clear()
            return
        try:
            users = [int(user_id) for user_id in payload.split(",")]
        except ValueError:  # not a payload of migration 012's: whose answer changed is unknown
            self._clear()
            return
        changed_at = self.changed_at
        for user_id in users:
            self._drop(user_id)
            changed_at[user_id] = self.epoch
            changed_at.move_to_end(user_id)
        while len(changed_at) > CHANGES_KEPT:
            _, forgotten = changed_at.popitem(last=False)
            self.unknown_before = max(self.unknown_before, forgotten)

    def alive(self, sent: float, database_now: datetime, received: float) -> None:
        """The listener's heartbeat, sent at `sent` (time.monotonic()) and answered at `received` with the
        database's clock: it delivered everything committed before `sent`."""
        self.live_until = sent + LIVENESS_SECONDS
        self.database_offset = database_now.timestamp() - (sent + received) / 2

    def reset(self) -> None:
        """The listener lost its connection or listens anew: what was kept may have missed notifications."""
        self.epoch += 1
        self._clear()
        self.live_until = 0.0

    def _clear(self) -> None:
        """Everything dropped, and every read in flight refused."""
        self.entries.clear()
        self.used = 0
        self.changed_at.clear()
        self.unknown_before = self.epoch


def earliest_expiry(rows) -> datetime | None:
    return min((r["expires_at"] for r in rows if r["expires_at"] is not None), default=None)
