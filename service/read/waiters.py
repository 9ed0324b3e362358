"""Read your writes: requests waiting for a command to be processed, woken by one LISTEN connection per process.

A trigger (migration 005) notifies `segmentation_commands` once per transaction that stores command results.
On each notification the listener looks up, in one query, which of the awaited ids are now stored, and wakes
their requests. No request polls; with nobody waiting a notification costs nothing but its delivery.

The same connection listens for the users whose answers changed (service/read/answers.py), and proves itself
with a heartbeat every HEARTBEAT_SECONDS, for that cache serves only while the connection is known to deliver.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

import asyncpg

from service.infra import errors
from service.read import views
from service.read.answers import CHANNEL as USERS_CHANNEL
from service.read.answers import UserAnswers

log = logging.getLogger("segmentation.api")
CHANNEL = "segmentation_commands"
RECONNECT_SECONDS = 1.0
HEARTBEAT_SECONDS = 0.15
HEARTBEAT_TIMEOUT_SECONDS = 10.0  # then the connection is given up; the kept answers lapsed long before
QUEUE_ALARM = 0.05  # of PostgreSQL's NOTIFY queue in use (healthy: about 0)
STUCK_LISTENER_SECONDS = 30
APPLICATION_NAME = "segmentation-api-listener"  # how it shows in pg_stat_activity


class CommandWaiters:
    """Futures by command id, resolved when the command's result is stored; and the notifications of `answers`."""

    def __init__(self, database_url: str, answers: UserAnswers | None = None):
        self.url = database_url
        self.answers = UserAnswers(0) if answers is None else answers
        self.connection: asyncpg.Connection | None = None  # while listening
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
        nobody listened); a heartbeat every HEARTBEAT_SECONDS."""
        conn = await asyncpg.connect(self.url, timeout=5, server_settings={"application_name": APPLICATION_NAME})
        lost, answers, loop = asyncio.Event(), self.answers, asyncio.get_running_loop()

        def on_lost(_) -> None:
            lost.set()
            answers.reset()

        try:
            conn.add_termination_listener(on_lost)
            await conn.add_listener(CHANNEL, lambda *_: self.wake.set())
            keeping = answers.budget > 0 and await self._triggers_in_place(conn)
            if keeping:
                await conn.add_listener(USERS_CHANNEL, lambda _c, _pid, _channel, payload: answers.changed(payload))
            answers.reset()  # kept while nobody listened: may have missed a change
            self.connection = conn
            self.listening.set()
            self.wake.set()
            next_beat = loop.time()
            while not lost.is_set():
                waker, loser = asyncio.create_task(self.wake.wait()), asyncio.create_task(lost.wait())
                await asyncio.wait({waker, loser}, timeout=max(0.0, next_beat - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                loser.cancel()
                if lost.is_set():
                    break
                if self.wake.is_set():
                    self.wake.clear()
                    await self._check(conn)
                if loop.time() >= next_beat:
                    next_beat = loop.time() + HEARTBEAT_SECONDS
                    await self._heartbeat(conn, keeping)
        finally:
            self.connection = None
            self.listening.clear()
            answers.reset()
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)

    async def _heartbeat(self, conn: asyncpg.Connection, keeping: bool) -> None:
        """Notifications committed before the server ran it come ahead of its answer, and their callbacks were
        scheduled before this coroutine resumes: the kept answers missed nothing sent before `sent`. An answer
        slow to come lets the answers lapse (LIVENESS_SECONDS) long before the connection is given up."""
        sent = time.monotonic()
        database_now, queue_usage = await conn.fetchrow(views.LISTENER_HEARTBEAT, timeout=HEARTBEAT_TIMEOUT_SECONDS)
        if keeping:
            self.answers.alive(sent, database_now, time.monotonic())
        if queue_usage >= QUEUE_ALARM:
            await self._free_queue(conn, queue_usage)

    @staticmethod
    async def _triggers_in_place(conn: asyncpg.Connection) -> bool:
        if await conn.fetchval(views.USERS_TRIGGERS_ENABLED) == views.USERS_TRIGGERS:
            return True
        log.warning("no answer kept in memory: migration 012's triggers are missing or disabled")
        return False

    @staticmethod
    async def _free_queue(conn: asyncpg.Connection, usage: float) -> None:
        """PostgreSQL's NOTIFY queue is as long as its slowest listener is behind, and a commit that notifies
        fails once it is full (8 GB): a listener of a process frozen but connected pins it. Listeners of this
        API that have not heartbeat for STUCK_LISTENER_SECONDS are ended (their process, if it wakes,
        connects again and drops what it kept)."""
        ended, error = [], None
        try:
            ended = await conn.fetch(views.END_STUCK_LISTENERS, APPLICATION_NAME, STUCK_LISTENER_SECONDS)
        except asyncpg.PostgresError as exc:  # e.g. not allowed to signal another role's backends
            error = repr(exc)
        log.warning("the NOTIFY queue is filling", extra={"usage": usage, "ended": [r["pid"] for r in ended],
                                                          "error": error})

    async def _check(self, conn: asyncpg.Connection) -> None:
        if not self.waiting:
            return
        for command_id in await views.processed(conn, list(self.waiting)):
            for future in self.waiting.get(command_id, ()):
                if not future.done():
                    future.set_result(True)
