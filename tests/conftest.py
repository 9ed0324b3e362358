"""Real servers for the suite: one embedded PostgreSQL and one broker per session; never skipped.

Databases are copied from a migrated template; topic names and consumer groups are fresh per stack.
Helpers live in tests/support/; nothing imports this file.
"""
from __future__ import annotations

import signal

import asyncpg
import pytest

from service.dev import embedded
from service.infra import db, kafka
from service.infra.settings import Settings
from tests.support.helpers import TEMPLATE, db_url, fast_settings, new_database

# A stopped run (CI's time limit, `timeout`) tears its servers down like Ctrl-C instead of leaking them.
signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(scope="session")
def pg_admin_url():
    """A PostgreSQL server for the whole session (fails loudly if it cannot start)."""
    with embedded.postgres(database="postgres") as url:
        yield url


@pytest.fixture(scope="session")
def broker_bootstrap():
    """A Kafka-protocol broker (Tansu) for the whole session (fails loudly if it cannot start)."""
    with embedded.broker() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
async def template_db(pg_admin_url) -> str:
    url = db_url(pg_admin_url, TEMPLATE)
    await db.ensure_database(url)
    await db.migrate(url)
    return TEMPLATE


@pytest.fixture
async def database_url(pg_admin_url, template_db) -> str:
    return await new_database(pg_admin_url)


@pytest.fixture
async def conn(database_url):
    c = await asyncpg.connect(database_url)
    yield c
    await c.close()


@pytest.fixture
async def settings(database_url, broker_bootstrap) -> Settings:
    s = fast_settings(database_url, broker_bootstrap)
    await kafka.create_topics(s)
    return s
