"""Helpers every kind of test uses: fresh databases, fast settings, a child's environment, waiting."""
from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

import asyncpg

from service.dev.supervisor import EMBEDDED_FETCH_MAX_WAIT_MS
from service.infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "segmentation_template"


def db_url(admin: str, name: str) -> str:
    return admin.replace("/postgres?", f"/{name}?", 1)


async def new_database(admin_url: str) -> str:
    """A fresh database copied from the migrated template."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    finally:
        await conn.close()
    return db_url(admin_url, name)


def fast_settings(database_url: str, bootstrap: str, **overrides) -> Settings:
    """Settings with fresh topic names and group, and short group timeouts (the broker's rebalance is slow)."""
    tag = uuid.uuid4().hex[:8]
    values = dict(
        database_url=database_url, kafka_bootstrap_servers=bootstrap,
        commands_topic=f"cmd-{tag}", dlq_topic=f"dlq-{tag}", results_topic=f"res-{tag}",
        membership_topic=f"mem-{tag}", segment_topic=f"seg-{tag}", consumer_group=f"g-{tag}",
        commands_partitions=4, events_partitions=4,
        kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=300, kafka_rebalance_timeout_ms=2000,
        relay_poll_seconds=0.2, worker_poll_ms=100, log_format="text",
        kafka_fetch_max_wait_ms=int(EMBEDDED_FETCH_MAX_WAIT_MS),  # the embedded broker, as the dev stack
    )
    return Settings(**(values | overrides))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see `settings`."""
    env = {k.upper(): str(v) for k, v in settings.model_dump().items() if v is not None}
    return os.environ | env | {"PYTHONPATH": str(ROOT)}


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll an async predicate until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)



@contextlib.asynccontextmanager
async def api_client(settings: Settings):
    """The read API on a test server, as an aiohttp test client."""
    from aiohttp.test_utils import TestClient, TestServer

    from service.read.api import create_app

    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
