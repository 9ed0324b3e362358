"""Client side: publish a command and wait for its result (used by the CLI, the tests and the benchmarks)."""
from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer

from schemas.commands import Command, command_key
from service.infra import kafka
from service.infra.settings import Settings


class CommandClient:
    """Publishes commands to the commands topic and reads their results from the results topic."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer = kafka.producer(settings)
        self.results: AIOKafkaConsumer | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def __aenter__(self) -> CommandClient:
        try:
            await self.producer.start()
        except BaseException:
            await self.producer.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self.reader:
            self.reader.cancel()
        if self.results:
            await self.results.stop()
        await self.producer.stop()

    async def listen(self) -> None:
        """Start reading results from the end of the topic; call before sending commands to wait for."""
        self.results = kafka.consumer(self.settings, group=None)
        await self.results.start()
        tps = await kafka.assign_all(self.results, self.settings.results_topic)
        await self.results.seek_to_end(*tps)
        for tp in tps:
            await self.results.position(tp)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.results is not None  # set by start()
        async for msg in self.results:
            try:
                result = json.loads(msg.value)
            except ValueError:
                continue
            fut = self.pending.pop(result.get("command_id"), None)
            if fut is not None and not fut.done():
                fut.set_result(result)

    async def send(self, command: Command) -> None:
        await self.producer.send_and_wait(
            self.settings.commands_topic, command.model_dump_json(exclude_none=True).encode(), key=command_key(command)
        )

    async def send_raw(self, value: bytes, key: bytes | None) -> None:
        await self.producer.send_and_wait(self.settings.commands_topic, value, key=key)

    def expect(self, command_id: str) -> asyncio.Future:
        return self.pending.setdefault(command_id, asyncio.get_running_loop().create_future())

    async def request(self, command: Command, timeout: float = 30.0) -> dict:
        """Publish and wait for the result."""
        fut = self.expect(command.command_id)
        await self.send(command)
        return await asyncio.wait_for(fut, timeout)
