"""The TTL producer: publishes ExpireMembership when memberships run out. One active instance."""
from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaProducer

from producers import leader, sql
from schemas.commands import ExpireMembership
from schemas.common import format_time
from service.infra import db, metrics
from service.infra.settings import Settings

log = logging.getLogger("segmentation.ttl")

# Rows are visible at commit, not at insert: look back this far each pass so a late commit is not missed.
LOOKBACK = timedelta(seconds=60)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FULL_SCAN_SECONDS = 300
REPUBLISH_AFTER = timedelta(seconds=10)


def expiry_command_id(user_id: int, slug: str, expires_at: datetime) -> str:
    """Deterministic: the same due membership always gives the same command id, so scanning twice is harmless."""
    digest = hashlib.sha256(f"{user_id}|{slug}|{format_time(expires_at)}".encode()).hexdigest()[:32]
    return f"expire:{user_id}:{digest}"


class TtlProducer(leader.LeaderLoop):
    LOCK, NAME, ACTIVE = db.TTL_LOCK, "ttl producer", metrics.TTL_ACTIVE

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        super().__init__(settings, producer)
        self.next_due: datetime | None = None
        self.recent: dict[str, datetime] = {}  # command id -> when the broker acknowledged it

    def on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        """A worker set an expiry: wake early if it is sooner than the planned wake-up."""
        try:
            when = datetime.fromisoformat(payload.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is None or self.next_due is None or when < self.next_due:
            self.wake.set()

    async def lead(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener("segmentation_ttl", self.on_notify)
        self.recent.clear()
        cursor = (EPOCH, 0, 0)  # a new leader scans everything still due
        full_scan_at = asyncio.get_running_loop().time() + FULL_SCAN_SECONDS
        while not self.stopping.is_set():
            self.wake.clear()
            now = datetime.now(UTC)
            if asyncio.get_running_loop().time() >= full_scan_at:
                # Safety net: anything still due (a command the worker ignored for clock skew) goes out again.
                cursor, full_scan_at = (EPOCH, 0, 0), asyncio.get_running_loop().time() + FULL_SCAN_SECONDS
            cursor = await self.publish_due(conn, now, cursor)
            # Next pass starts a little behind the cursor (late commits); `recent` keeps repeats out.
            cursor = min(cursor, (now - LOOKBACK, 0, 0))
            self.forget_old(now)
            self.next_due = await conn.fetchval(sql.NEXT_DUE, now)
            sleep = self.settings.ttl_max_sleep_seconds
            if self.next_due is not None:
                sleep = min(sleep, max(0.0, (self.next_due - datetime.now(UTC)).total_seconds()))
            await leader.wait(self.wake, sleep)

    async def publish_due(self, conn: asyncpg.Connection, now: datetime, cursor: tuple) -> tuple:
        """Publish every membership due at `now` after `cursor`; returns the new cursor. Sets the TTL lag gauge
        to this pass's worst lateness (0 when nothing was due)."""
        lag = 0.0
        while True:
            rows = await conn.fetch(sql.DUE, now, *cursor, self.settings.ttl_batch_max)
            if not rows:
                metrics.TTL_LAG.set(lag)
                return cursor
            futures, sent = [], {}
            for r in rows:
                command_id = expiry_command_id(r["user_id"], r["slug"], r["expires_at"])
                if command_id in self.recent:
                    continue
                cmd = ExpireMembership(command_id=command_id, user_id=r["user_id"], slug=r["slug"],
                                       expires_at=r["expires_at"], issued_at=now)
                futures.append(await self.producer.send(
                    self.settings.commands_topic, value=cmd.model_dump_json().encode(), key=str(r["user_id"]).encode()))
                sent[command_id] = r["expires_at"]
                lag = max(lag, (datetime.now(UTC) - r["expires_at"]).total_seconds())
            await self.acknowledged(futures)  # bounded: a leader that cannot publish steps down
            self.recent.update({cid: datetime.now(UTC) for cid in sent})  # only what the broker acknowledged
            metrics.TTL_EXPIRIES.inc(len(futures))
            self.published += len(futures)
            if futures:
                log.info("expiry commands published", extra={"count": len(futures), "up_to": format_time(rows[-1]["expires_at"])})
            last = rows[-1]
            cursor = (last["expires_at"], last["user_id"], last["segment_id"])
            if len(rows) < self.settings.ttl_batch_max:
                metrics.TTL_LAG.set(lag)
                return cursor

    def forget_old(self, now: datetime) -> None:
        """After REPUBLISH_AFTER, a membership still due (not applied yet, or seen early by a worker whose
        clock is behind) is published again while the lookback window still covers it."""
        horizon = now - REPUBLISH_AFTER
        for cid in [c for c, sent_at in self.recent.items() if sent_at < horizon]:
            del self.recent[cid]


async def main(settings: Settings) -> None:
    """`segmentation ttl`: run until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    ttl = TtlProducer(settings)
    await run_until_signalled(ttl.run(), ttl.stop)
