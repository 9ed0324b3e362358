"""Connections and migrations."""
from __future__ import annotations

import asyncio
import logging
import os
from importlib import resources

import asyncpg

from service.infra import errors, sql
from service.infra.settings import Settings

log = logging.getLogger("segmentation.db")

# Every PostgreSQL advisory lock id of the service, here so that none collide.
MIGRATION_LOCK = 7_361_001  # session lock: one migrator at a time
RELAY_LOCK = 7_361_002  # session locks: shared by every relay present; (RELAY_LOCK, shard) leads a shard
TTL_LOCK = 7_361_003  # session lock: the active TTL producer
ROLLOUT_LOCK = 7_361_004  # transaction lock: registrations (shared) vs. rollout starts (exclusive), write/sql.py


def server_settings(settings: Settings, application: str) -> dict[str, str]:
    """Session settings of every pooled connection: TCP keepalive (a vanished client's locks are freed) and the
    statement, lock and idle-in-transaction timeouts (-1 keeps the server's)."""
    out = {"application_name": f"segmentation-{application}-{os.getpid()}",
           "tcp_keepalives_idle": str(settings.db_tcp_keepalives_idle_seconds),
           "tcp_keepalives_interval": str(settings.db_tcp_keepalives_interval_seconds),
           "tcp_keepalives_count": str(settings.db_tcp_keepalives_count)}
    timeouts = {"statement_timeout": settings.db_statement_timeout_ms, "lock_timeout": settings.db_lock_timeout_ms,
                "idle_in_transaction_session_timeout": settings.db_idle_in_transaction_timeout_ms}
    return out | {name: str(ms) for name, ms in timeouts.items() if ms >= 0}


async def create_pool(settings: Settings, application: str, min_size: int, max_size: int,
                      session_reset: bool = True) -> asyncpg.Pool:
    """A pool whose every wait is bounded: `db_command_timeout_seconds` on each call, the server settings above.

    `session_reset=False` for users that change no session state (no SET, LISTEN, session advisory lock or cursor
    outside a transaction: the read API): a released connection skips asyncpg's reset query, a round trip per
    checkout. asyncpg still rolls back a transaction left open before any custom reset runs."""
    return await asyncpg.create_pool(
        settings.database_url, min_size=min_size, max_size=max_size,
        command_timeout=settings.db_command_timeout_seconds,
        server_settings=server_settings(settings, application),
        reset=None if session_reset else _keep_session)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo (see `create_pool`)."""


async def wait_for(url: str, timeout: float = 60.0) -> None:
    """Wait until PostgreSQL answers, with backoff; raise after `timeout` seconds."""
    delay, loop = 0.1, asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=5)
            await conn.close()
            return
        except errors.DATABASE_FAILURE as exc:
            if loop.time() > deadline:
                raise
            log.warning("waiting for PostgreSQL", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("service.infra") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name, p.read_text()) for p in files]


async def migrate(url: str) -> list[str]:
    """Apply the numbered migrations not applied yet; returns their names."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql.LOCK, MIGRATION_LOCK)
        await conn.execute(sql.CREATE_MIGRATIONS_TABLE)
        done = {r["name"] for r in await conn.fetch(sql.APPLIED_MIGRATIONS)}
        applied = []
        for name, text in migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute(sql.RECORD_MIGRATION, name)
            applied.append(name)
            log.info("migration applied", extra={"migration": name})
        if applied:  # a migration may change any answer (a function, the data): the API processes drop theirs
            await conn.execute(sql.NOTIFY_EVERY_ANSWER)
        return applied
    finally:
        await conn.execute(sql.UNLOCK, MIGRATION_LOCK)
        await conn.close()


async def ensure_database(url: str) -> None:
    """Create the database named in `url` if it does not exist (dev and tests)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    await wait_for(admin)
    conn = await asyncpg.connect(admin)
    try:
        if not await conn.fetchval(sql.DATABASE_EXISTS, name):
            await conn.execute(sql.CREATE_DATABASE.format(name=name))
    finally:
        await conn.close()
