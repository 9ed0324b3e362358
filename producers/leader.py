"""One active instance through a PostgreSQL advisory lock; standbys take over when it dies."""
from __future__ import annotations

import asyncio
import logging
import os

import asyncpg

log = logging.getLogger("segmentation.leader")

RELAY_LOCK = 7_361_002
TTL_LOCK = 7_361_003


async def acquire(url: str, lock_id: int, name: str, stopping: asyncio.Event, retry_seconds: float = 1.0
                  ) -> asyncpg.Connection | None:
    """Connect and wait for the session lock; the connection holds it until closed. None if stopping."""
    announced = False
    while not stopping.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(url, timeout=10, server_settings={
                "application_name": f"segmentation-{name.replace(' ', '-')}-{os.getpid()}"})
            while not stopping.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id):
                    log.info(f"{name} is active", extra={"lock": lock_id})
                    return conn
                if not announced:
                    log.info(f"{name} is on standby: another instance holds the lock", extra={"lock": lock_id})
                    announced = True
                await _wait(stopping, retry_seconds)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
            log.warning(f"{name}: cannot reach PostgreSQL", extra={"error": repr(exc)})
            await _wait(stopping, retry_seconds)
        if conn is not None:
            await conn.close()
    return None


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass
