"""One active instance through a PostgreSQL advisory lock; standbys take over when it dies."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from producers import sql
from service.infra import errors, kafka
from service.infra.settings import Settings

log = logging.getLogger("segmentation.leader")

# The lock lives as long as the connection. If the leader's host vanishes, PostgreSQL notices through TCP
# keepalive (ignored on Unix sockets) and frees the lock; a leader cut off notices through the command timeout.
KEEPALIVE = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
             "tcp_user_timeout": "30000"}
COMMAND_TIMEOUT = 60.0


async def acquire(url: str, lock_id: int, name: str, stopping: asyncio.Event, retry_seconds: float = 1.0
                  ) -> asyncpg.Connection | None:
    """Connect and wait for the session lock; the connection holds it until closed. None if stopping."""
    announced = False
    while not stopping.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(url, timeout=10, command_timeout=COMMAND_TIMEOUT, server_settings={
                "application_name": f"segmentation-{name.replace(' ', '-')}-{os.getpid()}", **KEEPALIVE})
            while not stopping.is_set():
                if await conn.fetchval(sql.TRY_LOCK, lock_id):
                    log.info(f"{name} is active", extra={"lock": lock_id})
                    return conn
                if not announced:
                    log.info(f"{name} is on standby: another instance holds the lock", extra={"lock": lock_id})
                    announced = True
                await wait(stopping, retry_seconds)
        except errors.DATABASE_FAILURE as exc:
            log.warning(f"{name}: cannot reach PostgreSQL", extra={"error": repr(exc)})
            await wait(stopping, retry_seconds)
        if conn is not None:
            await conn.close()
    return None


async def lead_while_holding(url: str, lock_id: int, name: str, stopping: asyncio.Event,
                             lead: Callable[[asyncpg.Connection], Awaitable[None]], active: Gauge) -> None:
    """Wait for the lock, then `lead(conn)` while holding it; start over when the connection or broker fails."""
    while not stopping.is_set():
        conn = await acquire(url, lock_id, name, stopping)
        if conn is None:
            return
        active.set(1)
        try:
            await lead(conn)
        except (*errors.DATABASE_FAILURE, KafkaError) as exc:
            log.warning(f"{name} lost its footing; starting over", extra={"error": repr(exc)})
            await asyncio.sleep(0.5)
        finally:
            active.set(0)
            if not conn.is_closed():
                await conn.close()  # releases the lock


async def wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` at most `seconds`."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


class LeaderLoop:
    """A process of which one instance works at a time (the relay, the TTL producer): a Kafka producer for its
    whole life, `lead(conn)` while it holds the lock. Subclasses set LOCK, NAME and ACTIVE and write `lead`."""

    LOCK: int
    NAME: str
    ACTIVE: Gauge

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        self.settings = settings
        self.producer = producer or kafka.producer(settings)
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.published = 0

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def run(self) -> None:
        await self.producer.start()
        try:
            await lead_while_holding(self.settings.database_url, self.LOCK, self.NAME, self.stopping, self.lead,
                                     self.ACTIVE)
        finally:
            await self.producer.stop()  # flushes what is in flight
            log.info(f"{self.NAME} stopped", extra={"published": self.published})

    async def lead(self, conn: asyncpg.Connection) -> None:
        raise NotImplementedError
