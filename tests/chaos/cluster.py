"""The service as production runs it, on one machine, with every path breakable: its own PostgreSQL (reached
through a fault proxy on a Unix socket, crashable with `pg_ctl stop -m immediate`), its own broker (advertising a
fault proxy, so every client's path to Kafka goes through it), and worker, relay, TTL producer and API as real
processes that can be killed, frozen and thawed."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg

from service.dev import embedded
from service.infra import db, kafka
from service.infra.settings import Settings
from tests.support.faults import FaultProxy, crash_postgres
from tests.support.helpers import ROOT, fast_settings, settings_env

# What managed PostgreSQL services set: a statement or lock wait that runs away is cut.
DATABASE_TIMEOUTS = {"lock_timeout": "2s", "statement_timeout": "30s"}


def faketime_library() -> Path:
    """The libfaketime shared library the `libfaketime` wheel ships."""
    import libfaketime

    [library] = Path(libfaketime.__file__).parent.glob("vendor/libfaketime/src/libfaketime.so.1")
    return library


class Cluster:
    """`async with Cluster(folder) as c`: servers, proxies, topics, migrations and the processes of `initial`."""

    def __init__(self, folder: Path, initial: dict[str, int] | None = None, **overrides):
        self.folder = folder
        self.initial = initial or {"worker": 2, "relay": 2, "ttl": 2, "api": 1}
        self.overrides = overrides
        self.stack = ExitStack()
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self.frozen: set[int] = set()
        self.logs = folder / "logs"

    async def __aenter__(self) -> Cluster:
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.folder / "pgsock").mkdir()
        try:
            self.pg_url = self.stack.enter_context(embedded.postgres(self.folder / "pg", database="segmentation"))
            proxy_port = embedded.free_port()
            direct = self.stack.enter_context(embedded.broker(advertised_port=proxy_port))
            host, port = direct.split(":")
            self.kafka = await FaultProxy((host, int(port)), ("127.0.0.1", proxy_port)).start()
            self.pg = await FaultProxy.for_postgres(self.pg_url, self.folder / "pgsock").start()
            # A rollout of the load's 300 users in ~15 passes, so that faults land between them (resumed rollouts).
            self.settings: Settings = fast_settings(
                self.pg.url, self.kafka.address, http_port=embedded.free_port(), commands_partitions=6,
                events_partitions=6, **({"fan_out_slice": 20, "fan_out_pass_seconds": 0} | self.overrides))
            await db.ensure_database(self.settings.database_url)
            await db.migrate(self.settings.database_url)
            for k, v in DATABASE_TIMEOUTS.items():
                await self.sql(f"ALTER DATABASE segmentation SET {k} = '{v}'")
            await kafka.create_topics(self.settings)
            for name, count in self.initial.items():
                for _ in range(count):
                    self.start(name)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for proc in self.all():
            if proc.pid in self.frozen:
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        for proc in self.all():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proxy in (getattr(self, "kafka", None), getattr(self, "pg", None)):
            if proxy is not None:
                await proxy.stop()
        self.stack.close()

    def all(self) -> list[subprocess.Popen]:
        return [p for procs in self.procs.values() for p in procs]

    def start(self, name: str, clock_offset: float = 0.0) -> subprocess.Popen:
        """Start a process of `name`; with `clock_offset`, its wall clock is that many seconds off (libfaketime
        preloaded; its monotonic clock stays true, so timeouts are not affected)."""
        n = sum(1 for _ in self.logs.glob(f"{name}-*.log"))
        env = settings_env(self.settings)
        if clock_offset:
            env |= {"LD_PRELOAD": str(faketime_library()), "FAKETIME": f"{clock_offset:+g}",
                    "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        with open(self.logs / f"{name}-{n}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", name], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.procs.setdefault(name, []).append(proc)
        return proc

    def live(self, name: str) -> list[subprocess.Popen]:
        return [p for p in self.procs.get(name, []) if p.poll() is None]

    def kill(self, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        self.frozen.discard(proc.pid)

    def freeze(self, proc: subprocess.Popen) -> None:
        os.kill(proc.pid, signal.SIGSTOP)
        self.frozen.add(proc.pid)

    def thaw(self, proc: subprocess.Popen) -> None:
        os.kill(proc.pid, signal.SIGCONT)
        self.frozen.discard(proc.pid)

    async def leader(self, name: str) -> subprocess.Popen | None:
        """The active TTL producer (it holds TTL_LOCK), or the relay leading the most shards."""
        if name == "ttl":
            where = "l.classid = 0 AND l.objid = $1 AND l.objsubid = 1"
            lock = db.TTL_LOCK
        else:
            where = "l.classid = $1 AND l.objsubid = 2"  # (RELAY_LOCK, shard)
            lock = db.RELAY_LOCK
        rows = await self.sql("SELECT a.application_name, count(*) AS n FROM pg_locks l JOIN pg_stat_activity a "
                              f"ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND {where} "
                              "GROUP BY 1 ORDER BY 2 DESC", lock)
        pids = [int(r["application_name"].rsplit("-", 1)[1]) for r in rows]
        return next((p for pid in pids for p in self.live(name) if p.pid == pid), None)

    async def crash_postgres(self) -> None:
        await asyncio.to_thread(crash_postgres, self.pg_url)

    async def sql(self, query: str, *args, timeout: float = 30.0) -> list[asyncpg.Record]:
        """A query on a direct connection (not through the proxy: the checker must see past a fault)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await asyncpg.connect(self.pg_url, timeout=5)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()
