"""Real servers for the suite: one embedded PostgreSQL and one broker per session; never skipped.

Databases are copied from a migrated template; topic names and consumer groups are fresh per stack.
Helpers live in tests/support/; nothing imports this file.
"""
from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import asyncpg
import pytest

from service.dev import embedded
from service.infra import db, kafka
from service.infra.settings import Settings
from tests.support.helpers import TEMPLATE, db_url, fast_settings, new_database

# A stopped run (CI's time limit, `timeout`) tears its servers down like Ctrl-C instead of leaking them.
signal.signal(signal.SIGTERM, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    """A private --basetemp for each run unless one is given: pytest's shared numbered folders are pruned by the
    next runs, so two suites running at once deleted each other's PostgreSQL data directories."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="segtest-")  # short: Unix socket paths under it


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """That folder goes when the run passed; a failed run keeps it for a look."""
    base = session.config.option.basetemp
    if exitstatus == 0 and base and Path(base).name.startswith("segtest-") \
            and not hasattr(session.config, "workerinput"):
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url():
    """A PostgreSQL server for the whole session (fails loudly if it cannot start)."""
    with embedded.postgres(database="postgres", fsync=False) as url:
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
