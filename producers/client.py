"""The client library of the service: publish commands, wait for their results, subscribe to what it publishes.

    from producers.client import SegmentationClient
    from schemas import CreateSegment

    async with SegmentationClient() as client:                       # Settings() from the environment
        result = await client.request(CreateSegment(command_id="c-1", slug="AVITO_VOICE_MESSAGES"))
        async with client.subscribe(from_beginning=True) as events:  # MembershipChanged and SegmentChanged
            async for event in events:
                print(event.type, event.slug)

One implementation for every caller: the CLI, the tests and the benchmarks use this class. It is configured by
the same `Settings` as the service (bootstrap servers, topic names, TLS and SASL) and builds its Kafka clients
with the service's own factories (`service.infra.kafka`).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import BaseModel, ValidationError

from producers.dlq import Letter
from schemas import COMMAND_ADAPTER, Command, CommandResult, MembershipChanged, SegmentChanged
from schemas.commands import command_key
from service.infra import kafka
from service.infra.settings import Settings
from service.write.outbox import Kind, topics

Event: TypeAlias = MembershipChanged | SegmentChanged
Received: TypeAlias = MembershipChanged | SegmentChanged | CommandResult | Letter
EVENT_KINDS: tuple[Kind, ...] = ("membership", "segment")
MODELS: dict[Kind, type[BaseModel]] = {"membership": MembershipChanged, "segment": SegmentChanged,
                                       "result": CommandResult}


class ResultTimeoutError(TimeoutError):
    """No result for a command came within the timeout (is a worker running?)."""

    def __init__(self, command_id: str, timeout: float):
        super().__init__(f"no result for {command_id} within {timeout} s (is the worker running?)")
        self.command_id, self.timeout = command_id, timeout


class InvalidMessageError(ValueError):
    """A record of a subscribed topic is not the message its topic carries; the subscription goes on past it."""

    def __init__(self, record: ConsumerRecord, reason: str):
        super().__init__(f"{record.topic}/{record.partition}@{record.offset}: {reason}")
        self.record = record


def decode(kind: Kind, record: ConsumerRecord) -> Received:
    """The typed message of one record. Fields this version does not know are ignored: within a topic's major
    version the service only adds fields (README, Message versioning)."""
    if kind == "dlq":
        return Letter(record.topic, record.partition, record.offset, record.key, record.value,
                      {k: v.decode(errors="replace") for k, v in record.headers})
    model = MODELS[kind]
    if record.value is None:
        raise InvalidMessageError(record, "no value (a tombstone)")
    try:
        return model.model_validate_json(record.value, extra="ignore")  # type: ignore[return-value]  # MODELS holds only Received models
    except ValidationError as exc:
        raise InvalidMessageError(record, f"not a valid {model.__name__}: {exc}") from None


def identity(item: Received) -> tuple:
    """What makes two deliveries the same message: the event id; for a result its command and processing time
    (a stored result published again is the same bytes); for a dead letter the record it was made of."""
    if isinstance(item, MembershipChanged | SegmentChanged):
        return ("event", item.event_id)
    if isinstance(item, CommandResult):
        return ("result", item.command_id, item.processed_at)
    h = item.headers
    return ("dlq", h.get("source.topic"), h.get("source.partition"), h.get("source.offset")) if (
        "source.offset" in h) else ("dlq", item.partition, item.offset)


class Subscription:
    """An async iterator of the typed messages of some topics, each delivered once (deduplicated over the last
    `dedup_window` messages). Positioned when entered (`async with`) or at the first iteration. Made by
    `SegmentationClient.subscribe`, or directly from settings (it needs no producer; the CLI's `watch`)."""

    def __init__(self, settings: Settings, kinds: Iterable[Kind] = EVENT_KINDS, *, from_beginning: bool = False,
                 dedup_window: int = 100_000):
        names = topics(settings)
        self.kinds = {names[k]: k for k in kinds}
        self.from_beginning = from_beginning
        self.dedup_window = dedup_window
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None
        self.seen: OrderedDict[tuple, None] = OrderedDict()
        self.record: ConsumerRecord | None = None  # the record the last message yielded came from

    async def start(self) -> None:
        """Assign every partition of the topics and seek to their beginning or their end as it is now."""
        if self.consumer is not None:
            return
        self.consumer = kafka.consumer(self.settings, group=None)
        try:
            await self.consumer.start()
            tps = await kafka.assign_all(self.consumer, *self.kinds)
            if self.from_beginning:
                await self.consumer.seek_to_beginning(*tps)
            else:  # what is published after start() is read
                await kafka.seek_to_end_now(self.consumer, tps)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            await consumer.stop()

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Received:
        """The next message not seen before; raises InvalidMessageError for a record that is not one (iterate
        again to go on)."""
        await self.start()
        assert self.consumer is not None  # set by start()
        while True:
            record = await self.consumer.getone()
            self.record = record
            item = decode(self.kinds[record.topic], record)
            key = identity(item)
            if key in self.seen:
                self.seen.move_to_end(key)
                continue
            self.seen[key] = None
            if len(self.seen) > self.dedup_window:
                self.seen.popitem(last=False)
            return item

    @property
    def position(self) -> str | None:
        """`topic/partition@offset` of the last message yielded."""
        r = self.record
        return None if r is None else f"{r.topic}/{r.partition}@{r.offset}"


class SegmentationClient:
    """Publishes commands to the commands topic, waits for their results on the results topic, and subscribes
    to the events. Use it as an async context manager (or call `start()` and `close()`)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else Settings()
        self.producer: AIOKafkaProducer = kafka.producer(self.settings)
        self.results: AIOKafkaConsumer | None = None
        self.pending: dict[str, asyncio.Future[CommandResult]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.listening = asyncio.Lock()

    async def start(self) -> None:
        """Connect the producer (the results are read from the first command waited for on)."""
        try:
            await self.producer.start()
        except BaseException:
            await self.producer.stop()
            raise

    async def close(self) -> None:
        """Stop reading results and flush and stop the producer."""
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.results is not None:
            await self.results.stop()
        await self.producer.stop()

    async def __aenter__(self) -> SegmentationClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- publishing ---------------------------------------------------------------------------------

    async def send(self, command: Command | Mapping[str, Any], *, wait: bool = False,
                   timeout: float = 30.0) -> CommandResult | None:
        """Publish one command (a model, or a dict validated as one), keyed as the contract says; with `wait`,
        return its result (raises ResultTimeoutError after `timeout` seconds). Returns once the broker has it."""
        command = as_command(command)
        if wait:
            return await self.request(command, timeout)
        await self.producer.send_and_wait(self.settings.commands_topic,
                                          command.model_dump_json(exclude_none=True).encode(),
                                          key=command_key(command))
        return None

    async def request(self, command: Command | Mapping[str, Any], timeout: float = 30.0) -> CommandResult:
        """Publish one command and return its result, `applied` or `rejected` (look at `status` and `error`);
        raises ResultTimeoutError when none comes within `timeout` seconds."""
        command = as_command(command)
        result = await self.expect(command.command_id)
        try:
            await self.send(command)
        except BaseException:
            if self.pending.get(command.command_id) is result:
                del self.pending[command.command_id]
            raise
        return await self.result(command.command_id, result, timeout)

    async def send_raw(self, value: bytes | None, key: bytes | None) -> None:
        """Publish bytes as they are to the commands topic (a replay, a malformed message in a test)."""
        await self.producer.send_and_wait(self.settings.commands_topic, value, key=key)

    async def expect(self, command_id: str) -> asyncio.Future[CommandResult]:
        """A future of the next result published for `command_id`; call it before publishing the command."""
        await self._listen()
        return self.pending.setdefault(command_id, asyncio.get_running_loop().create_future())

    async def result(self, command_id: str, future: asyncio.Future[CommandResult], timeout: float) -> CommandResult:
        """Wait for a future of `expect`; raises ResultTimeoutError when it is not done within `timeout` s."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise ResultTimeoutError(command_id, timeout) from None
        finally:  # timed out or cancelled by the caller: nobody waits for it any more
            if not future.done() and self.pending.get(command_id) is future:
                del self.pending[command_id]

    async def _listen(self) -> None:
        """Read results from the end of the topic as it is now: a result published after this is seen."""
        async with self.listening:
            if self.results is not None:
                return
            self.results = kafka.consumer(self.settings, group=None)
            await self.results.start()
            await kafka.seek_to_end_now(self.results, await kafka.assign_all(self.results, self.settings.results_topic))
            self.reader = asyncio.create_task(self._read(self.results))

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                try:
                    result = decode("result", record)
                except InvalidMessageError:
                    continue  # not ours to judge: the service never publishes one
                assert isinstance(result, CommandResult)
                future = self.pending.pop(result.command_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except BaseException as exc:  # the reader is gone (failed, or the client closed): nobody waits for ever
            gone = exc if isinstance(exc, Exception) else ConnectionError("the client was closed")
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(gone)
            self.pending.clear()
            raise

    # ---- subscribing --------------------------------------------------------------------------------

    def subscribe(self, kinds: Iterable[Kind] = EVENT_KINDS, *, from_beginning: bool = False,
                  dedup_window: int = 100_000) -> Subscription:
        """Membership and segment events (by default; `kinds` may also name "result" and "dlq"), typed, each
        once: from the end of the topics as they are when the subscription starts, or from their beginning.

        Without a consumer group: every subscription reads every partition and commits nothing. Use it as
        `async with client.subscribe() as events: async for event in events: ...`.
        """
        return Subscription(self.settings, kinds, from_beginning=from_beginning, dedup_window=dedup_window)


def as_command(command: Command | Mapping[str, Any]) -> Command:
    """A command model as it is, or a dict validated as one (raises pydantic's ValidationError)."""
    if isinstance(command, Mapping):
        return COMMAND_ADAPTER.validate_python(dict(command))
    return command
