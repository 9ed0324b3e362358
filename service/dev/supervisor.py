"""`segmentation dev`: embedded PostgreSQL and broker (unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS point
elsewhere), topics, migrations, then worker, relay, TTL producer and API as child processes. Also
`segmentation api --processes N`: N API processes on one port, started again when they die."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import NoReturn

from service.dev import embedded
from service.infra import db, kafka
from service.infra.settings import Settings

log = logging.getLogger("segmentation.dev")
PROCESSES = ("worker", "relay", "ttl", "api")
# PostgreSQL's default of 128 MB thrashed under a rollout to 10 % of 1 000 000 users once the earlier work had
# filled it (3.2 GB read back from the OS cache, the fan-out 2-3x slower); docker-compose.yml asks the same.
SHARED_BUFFERS = "512MB"
EMBEDDED_FETCH_MAX_WAIT_MS = "20"  # see child_env

TRY = """
segmentation is running.
  Kafka   {kafka}
  HTTP    http://{http_host}:{http_port}   (Swagger UI at /docs)
  Postgres {database}

Try, in another terminal (after `source .venv/bin/activate`):
  segmentation send create-segment AVITO_VOICE_MESSAGES
  segmentation send update-user 1000 --add AVITO_VOICE_MESSAGES
  curl http://{http_host}:{http_port}/api/v1/users/1000/segments
  segmentation watch
Ctrl-C stops everything.
"""


def run(workers: int = 1, relays: int = 1, api_processes: int = 1) -> int:
    _stop_on_signals()
    settings = Settings()
    external_db = "DATABASE_URL" in os.environ
    external_kafka = "KAFKA_BOOTSTRAP_SERVERS" in os.environ
    try:
        with ExitStack() as stack:
            database = settings.database_url if external_db else stack.enter_context(
                embedded.postgres(shared_buffers=SHARED_BUFFERS))
            port = int(os.environ.get("DEV_KAFKA_PORT", "9092"))
            bootstrap = settings.kafka_bootstrap_servers if external_kafka else stack.enter_context(
                embedded.broker(port=port))
            env = child_env(dict(os.environ), database, bootstrap, external_kafka)
            settings = Settings(database_url=database, kafka_bootstrap_servers=bootstrap)
            asyncio.run(_prepare(settings))
            children = [Child(name, env) for name in PROCESSES if name != "api"
                        for _ in range({"worker": workers, "relay": relays}.get(name, 1))]
            _supervise(children + api_children(env, api_processes, stack), started=lambda: print(
                TRY.format(kafka=bootstrap, http_host=settings.http_host, http_port=settings.http_port,
                           database=database), file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        return 0


def child_env(environ: dict[str, str], database: str, bootstrap: str, external_kafka: bool) -> dict[str, str]:
    """The environment of the dev stack's processes. On the embedded broker they fetch with a short wait (unless
    the user set one): it answers a waiting fetch only when the wait is over, not when a record arrives, so Kafka's
    500 ms default put up to ~115 ms on every hop (a command to the worker, a result to its client)."""
    env = environ | {"DATABASE_URL": database, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    if not external_kafka:
        env = {"KAFKA_FETCH_MAX_WAIT_MS": EMBEDDED_FETCH_MAX_WAIT_MS} | env
    return env


def api_children(env: dict[str, str], processes: int, stack: ExitStack) -> list[Child]:
    """`processes` API processes sharing one port (each `segmentation api --processes 1`, API_PROCESSES telling
    it to bind with SO_REUSEPORT). Above one, their metrics go to a folder of their own (prometheus_client's
    multiprocess mode, removed with `stack`), so that /metrics of any of them counts the requests of all."""
    env = env | {"API_PROCESSES": str(processes)}
    if processes > 1:
        folder = tempfile.mkdtemp(prefix="segmentation-api-metrics-")
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = folder
    return [Child("api", env, argv=[sys.executable, "-m", "service.cli", "api", "--processes", "1"])
            for _ in range(processes)]


def serve_api(processes: int) -> int:
    """`segmentation api --processes N` (N > 1): the processes, started again when they die, until SIGTERM."""
    _stop_on_signals()
    try:
        with ExitStack() as stack:
            _supervise(api_children(dict(os.environ), processes, stack))
    except KeyboardInterrupt:
        return 0


def _stop_on_signals() -> None:
    """SIGTERM behaves like Ctrl-C from the first instant, so the servers are stopped even during start-up; and
    Ctrl-C works even where it was ignored when we started (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _supervise(children: list[Child], started: Callable[[], None] = lambda: None) -> NoReturn:
    """Start the children, then heal them until KeyboardInterrupt; a child started is a child stopped, even when
    Ctrl-C comes while the others start."""
    try:
        for child in children:
            child.start()
        started()
        _heal(children)
    finally:
        _stop(children)


class Child:
    """One process of the stack, started again when it dies: after 1 s, then twice as long each time it dies
    again soon (at most MAX_PAUSE); a process that stayed up STABLE_SECONDS starts again from 1 s."""

    MAX_PAUSE, STABLE_SECONDS = 30.0, 60.0

    def __init__(self, name: str, env: dict[str, str], argv: list[str] | None = None):
        self.name, self.env = name, env
        self.argv = argv or [sys.executable, "-m", "service.cli", name]
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.pause = 0.0
        self.restart_at: float | None = None

    def start(self, now: float | None = None) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started_at, self.restart_at = time.monotonic() if now is None else now, None

    def check(self, now: float) -> None:
        """Notice a death, and start the process again once its pause is over."""
        assert self.proc is not None
        if self.restart_at is None and self.proc.poll() is not None:
            stable = now - self.started_at >= self.STABLE_SECONDS
            self.pause = 1.0 if stable or not self.pause else min(self.pause * 2, self.MAX_PAUSE)
            self.restart_at = now + self.pause
            log.error("a process died; starting it again", extra={
                "child": self.name, "pid": self.proc.pid, "exit_code": self.proc.returncode,
                "restart_in_seconds": self.pause})
        elif self.restart_at is not None and now >= self.restart_at:
            self.start(now)
            log.warning("process started again", extra={"child": self.name, "pid": self.proc.pid})


def _heal(children: list[Child]) -> NoReturn:
    """Run until Ctrl-C or SIGTERM (KeyboardInterrupt), starting again whatever dies."""
    while True:
        now = time.monotonic()
        for child in children:
            child.check(now)
        time.sleep(0.2)


def _stop(children: list[Child]) -> None:
    procs = [child.proc for child in children if child.proc is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _prepare(settings: Settings) -> None:
    await db.ensure_database(settings.database_url)
    applied = await db.migrate(settings.database_url)
    created = await kafka.create_topics(settings)
    log.info("ready", extra={"migrations": applied, "topics_created": created})


@contextmanager
def child_stack(workers: int = 1, extra_env: dict | None = None, ready_timeout: float = 90.0, relays: int = 1):
    """Run `segmentation dev` as a child process on free ports (benchmarks, end-to-end tests); yield its
    Settings; SIGTERM it at the end."""
    kafka_port, http_port = embedded.free_port(), embedded.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env |= {"DEV_KAFKA_PORT": str(kafka_port), "HTTP_PORT": str(http_port), "LOG_LEVEL": "WARNING"}
    env |= extra_env or {}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "dev", "--workers", str(workers),
                             "--relays", str(relays)], env=env, start_new_session=True)
    try:
        embedded.wait_port("127.0.0.1", http_port, timeout=ready_timeout, proc=proc)
        settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{kafka_port}", http_port=http_port,
                            kafka_fetch_max_wait_ms=int(env.get("KAFKA_FETCH_MAX_WAIT_MS", EMBEDDED_FETCH_MAX_WAIT_MS)))
        _wait_ready(f"http://127.0.0.1:{http_port}/readyz", ready_timeout)
        yield settings
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def _wait_ready(url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200")
