"""Load for the chaos runs: users adding and removing segments (some with TTLs, some naming the rolled-out segment),
percent changes of that segment (a fan-out over every known user), publisher duplicates and malformed input.
Every command it sends is valid, so each must be `applied`; it remembers what the broker acknowledged."""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

from aiokafka.errors import KafkaError

from service.infra import kafka
from service.infra.settings import Settings
from tests.support.harness import Collector, read_to_end
from tests.support.helpers import wait_until

MANUAL = [f"M{i}" for i in range(4)]
ROLLOUT = "ROLL"


class Load:
    def __init__(self, settings: Settings, users: int = 300, rate: float = 40.0, seed: int = 8):
        self.settings, self.users, self.rate = settings, users, rate
        self.random = random.Random(seed)
        self.tag = uuid.uuid4().hex[:6]
        self.acked: dict[str, bytes] = {}  # command id -> the bytes the broker acknowledged
        self.uncertain: set[str] = set()  # the send failed: it may or may not have been written
        self.malformed: list[bytes] = []  # malformed input the broker acknowledged
        self.malformed_ids: set[str] = set()  # ... of it, with a readable command id
        self.malformed_sent = 0
        self.in_flight: set[asyncio.Future] = set()
        self.sent_count = 0

    async def __aenter__(self) -> Load:
        self.producer = kafka.producer(self.settings, request_timeout_ms=15_000, retry_backoff_ms=500)
        await self.producer.start()
        self.collector = Collector(self.settings)
        await self.collector.start()
        created = []
        for slug in [*MANUAL, ROLLOUT]:
            created.append(self.new_id())
            await self.send(slug, {"type": "CreateSegment", "command_id": created[-1], "slug": slug,
                                   "auto_percent": 30 if slug == ROLLOUT else 0})
        await self.drain()
        # Segment commands and user commands travel on different partitions: users name a segment once it exists.
        async def all_created() -> bool:
            return set(created) <= {v["command_id"] for v in self.collector.values(self.settings.results_topic)}

        await wait_until(all_created, timeout=120, interval=0.1, message="the segments created")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.drain()
        await self.producer.stop()
        await self.collector.stop()

    def new_id(self) -> str:
        self.sent_count += 1
        return f"{self.tag}-{self.sent_count}"

    async def send(self, key: str, body: dict | bytes, command_id: str | None = None, malformed: bool = False) -> None:
        """Publish without waiting for the acknowledgement (sorted into acked or uncertain when it comes);
        retried while the broker cannot even take it (nothing was written then)."""
        value = body if isinstance(body, bytes) else json.dumps(body).encode()
        command_id = command_id or (body.get("command_id") if isinstance(body, dict) else None)
        while True:
            try:
                fut = await self.producer.send(self.settings.commands_topic, value, key=key.encode())
                break
            except KafkaError:
                await asyncio.sleep(0.5)

        def settled(f: asyncio.Future, command_id: str | None = command_id) -> None:
            self.in_flight.discard(f)
            acked = not f.cancelled() and f.exception() is None
            if malformed:
                if acked:
                    self.malformed.append(value)
                    if command_id is not None:
                        self.malformed_ids.add(command_id)
            elif acked and command_id is not None:
                self.acked.setdefault(command_id, value)
            elif command_id is not None and command_id not in self.acked:
                self.uncertain.add(command_id)

        self.in_flight.add(fut)
        fut.add_done_callback(settled)

    async def drain(self) -> None:
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=60)

    async def one(self) -> None:
        r = self.random.random()
        if r < 0.02 and self.acked:  # a publisher sending a command again
            command_id = self.random.choice(list(self.acked))
            value = self.acked[command_id]
            body = json.loads(value)
            await self.send(str(body.get("user_id", body.get("slug"))), value, command_id)
        elif r < 0.04:
            await self.send_malformed()
        elif r < 0.045:
            percent = self.random.choice([0, 5, 30, 60, 100])
            await self.send(ROLLOUT, {"type": "UpdateSegment", "command_id": self.new_id(), "slug": ROLLOUT,
                                      "auto_percent": percent})
        else:
            user = self.random.randint(1, self.users)
            slugs = self.random.sample([*MANUAL, ROLLOUT], 3)
            body: dict = {"type": "UpdateUserSegments", "command_id": self.new_id(), "user_id": user,
                          "add": slugs[:self.random.randint(0, 2)], "remove": slugs[2:]}
            if body["add"] and self.random.random() < 0.3:
                body["ttl_seconds"] = self.random.randint(1, 5)
            await self.send(str(user), body)

    async def send_malformed(self) -> None:
        n = self.malformed_sent = self.malformed_sent + 1
        command_id = None
        if n % 2:
            command_id = f"{self.tag}-bad-{n}"
            value = json.dumps({"type": "UpdateUserSegments", "command_id": command_id, "user_id": "nobody"}).encode()
        else:
            value = f"not json {self.tag} {n}".encode()
        await self.send(str(self.random.randint(1, self.users)), value, command_id, malformed=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Send at `rate` commands a second until `stop` is set."""
        started, n = time.monotonic(), 0
        while not stop.is_set():
            await self.one()
            n += 1
            ahead = started + n / self.rate - time.monotonic()
            if ahead > 0:
                try:
                    await asyncio.wait_for(stop.wait(), ahead)
                except TimeoutError:
                    pass

    async def probe(self, timeout: float = 180.0) -> float:
        """Send a command (again every 15 s while its send may have been lost) and wait for its result to be
        published; returns the seconds it took. The live reader may miss the result (see tests/chaos/invariants.py):
        before each resend the results topic is read afresh (the time is then up to 15 s high)."""
        started = time.monotonic()
        command_id = self.new_id()
        user = self.users + 1
        body = {"type": "UpdateUserSegments", "command_id": command_id, "user_id": user, "add": [MANUAL[0]],
                "ttl_seconds": 1}
        topic = self.settings.results_topic

        def answered(records: list) -> bool:
            return any(value.get("command_id") == command_id for _, value in records)

        while time.monotonic() - started < timeout:
            await self.send(str(user), body)
            resent = time.monotonic()
            while time.monotonic() - resent < 15:
                if answered(self.collector.messages[topic]):
                    return time.monotonic() - started
                await asyncio.sleep(0.1)
            if answered((await read_to_end(self.settings, topic))[topic]):
                return time.monotonic() - started
        raise AssertionError(f"no result for the probe {command_id} after {timeout} s")
