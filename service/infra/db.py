"""Connections and migrations."""
from __future__ import annotations

import asyncio
import logging
from importlib import resources

import asyncpg

from service.infra import errors, sql

log = logging.getLogger("segmentation.db")

# Every PostgreSQL advisory lock id of the service, here so that none collide.
MIGRATION_LOCK = 7_361_001  # session lock: one migrator at a time
RELAY_LOCK = 7_361_002  # session locks: shared by every relay present; (RELAY_LOCK, shard) leads a shard
TTL_LOCK = 7_361_003  # session lock: the active TTL producer
ROLLOUT_LOCK = 7_361_004  # transaction lock: registrations (shared) vs. rollout starts (exclusive), write/sql.py


async def create_pool(url: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)


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
