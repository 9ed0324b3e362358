"""Read your writes: requests waiting for a command to be processed, woken by one LISTEN connection per process.

A trigger (migration 005) notifies `segmentation_commands` once per transaction that stores command results.
On each notification the listener looks up, in one query, which of the awaited ids are now stored, and wakes
their requests. No request polls; with nobody waiting a notification costs nothing but its delivery.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import asyncpg

from service.infra import errors
from service.read import views

log = logging.getLogger("segmentation.api")
CHANNEL = "segmentation_commands"
RECONNECT_SECONDS = 1.0
APPLICATION_NAME = "segmentation-api-listener"  # how it shows in pg_stat_activity


class CommandWaiters:
    """Futures by command id, resolved when the command's result is stored."""

    def __init__(self, database_url: str):
        self.url = database_url
        self.waiting: dict[str, set[asyncio.Future]] = defaultdict(set)
        self.wake = asyncio.Event()
        self.listening = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    @contextlib.contextmanager
    def registered(self, command_id: str):
        """A future resolved once `command_id` is processed. Register before looking it up: a commit between the
        look-up and the wait still wakes it."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[command_id].add(future)
        try:
            yield future
        finally:
            futures = self.waiting.get(command_id)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self.waiting[command_id]

    @staticmethod
    async def wait(future: asyncio.Future, timeout: float) -> bool:
        """True once resolved; False after `timeout` seconds."""
        if timeout <= 0:
            return future.done()
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        """Listen, reconnecting after a lost connection."""
        while True:
            try:
                await self._listen()
            except errors.DATABASE_FAILURE as exc:
                log.warning("command listener lost its connection; reconnecting", extra={"error": repr(exc)})
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self) -> None:
        """One connection's life: check after every notification, and once at the start (what committed while
        nobody listened)."""
        conn = await asyncpg.connect(self.url, timeout=5, server_settings={"application_name": APPLICATION_NAME})
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _: lost.set())
            await conn.add_listener(CHANNEL, lambda *_: self.wake.set())
            self.listening.set()
            self.wake.set()
            while not lost.is_set():
                waker, loser = asyncio.create_task(self.wake.wait()), asyncio.create_task(lost.wait())
                await asyncio.wait({waker, loser}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                loser.cancel()
                if self.wake.is_set():
                    self.wake.clear()
                    await self._check(conn)
        finally:
            self.listening.clear()
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)

    async def _check(self, conn: asyncpg.Connection) -> None:
        if not self.waiting:
            return
        for command_id in await views.processed(conn, list(self.waiting)):
            for future in self.waiting.get(command_id, ()):
                if not future.done():
                    future.set_result(True)
