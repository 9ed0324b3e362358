"""`make run` heals: each of its processes SIGKILLed is started again and the stack serves within 30 s."""
import json
import signal
import time
import uuid
from functools import partial

import aiohttp
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.dev.supervisor import PROCESSES, child_stack
from tests.support.helpers import wait_until

HEAL_SECONDS = 30


@pytest.fixture(scope="module")
def dev():
    with child_stack() as settings:
        [proc] = [p for p in psutil.Process().children()
                  if "dev" in p.cmdline() and p.environ().get("HTTP_PORT") == str(settings.http_port)]
        yield settings, proc


def children(proc, name: str) -> list[psutil.Process]:
    """The live `segmentation <name>` processes the supervisor started (the API's: `api --processes 1`)."""
    out = []
    for p in proc.children():
        try:
            cmd = p.cmdline()
            after = cmd[cmd.index("service.cli") + 1:] if "service.cli" in cmd else []
            if after[:1] == [name] and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


async def _replaced(proc, name: str, count: int, dead: int) -> bool:
    now = children(proc, name)
    return len(now) == count and dead not in {p.pid for p in now}


class Probe:
    """A user of the stack: publishes a command with a short TTL and waits for its result, its `added` event,
    its `removed`/`expired` event (worker, relay and TTL producer all working) and its HTTP answer (the API)."""

    def __init__(self, settings):
        self.s = settings
        self.seen: list[dict] = []

    async def __aenter__(self):
        self.producer = AIOKafkaProducer(bootstrap_servers=self.s.kafka_bootstrap_servers)
        self.consumer = AIOKafkaConsumer(self.s.membership_topic, self.s.results_topic,
                                         bootstrap_servers=self.s.kafka_bootstrap_servers, auto_offset_reset="latest")
        await self.producer.start()
        await self.consumer.start()
        await self.consumer.getmany(timeout_ms=1000)  # partitions assigned: from here on nothing is missed
        self.slug = f"HEAL_{uuid.uuid4().hex[:6]}"
        await self.send(self.slug, {"type": "CreateSegment", "command_id": f"c-{self.slug}", "slug": self.slug})
        await wait_until(lambda: self.find(command_id=f"c-{self.slug}", status="applied"), timeout=60,
                         message="the segment created")
        return self

    async def __aexit__(self, *exc):
        await self.producer.stop()
        await self.consumer.stop()

    async def send(self, key: str, body: dict) -> None:
        await self.producer.send_and_wait(self.s.commands_topic, json.dumps(body).encode(), key=key.encode())

    async def find(self, **fields):
        batch = await self.consumer.getmany(timeout_ms=200)
        self.seen.extend(json.loads(m.value) for ms in batch.values() for m in ms)
        return next((v for v in self.seen if all(v.get(k) == x for k, x in fields.items())), None)

    async def round_trip(self, timeout: float) -> None:
        user = int(time.time() * 1000) % 1_000_000_000
        command_id = f"u-{uuid.uuid4().hex[:8]}"
        await self.send(str(user), {"type": "UpdateUserSegments", "command_id": command_id, "user_id": user,
                                    "add": [self.slug], "ttl_seconds": 1})
        await wait_until(lambda: self.find(command_id=command_id, status="applied"), timeout=timeout,
                         message="the command's result")
        await wait_until(lambda: self.find(user_id=user, change="added"), timeout=timeout, message="its event")
        await wait_until(lambda: self.find(user_id=user, change="removed", reason="expired"), timeout=timeout,
                         message="its expiry")
        async with aiohttp.ClientSession() as http:
            async def answered():
                try:
                    async with http.get(f"http://127.0.0.1:{self.s.http_port}/api/v1/commands/{command_id}") as r:
                        return r.status == 200 and (await r.json())["status"] == "applied"
                except aiohttp.ClientError:
                    return False
            await wait_until(answered, timeout=timeout, interval=0.2, message="the API")


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_each_process_sigkilled_is_restarted_and_the_stack_serves_within_30_s(dev):
    settings, proc = dev
    async with Probe(settings) as probe:
        await probe.round_trip(timeout=60)
        for name in PROCESSES:
            victim, *others = children(proc, name)  # two API processes, one of each other kind
            assert len(others) == (1 if name == "api" else 0), name
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await probe.round_trip(timeout=HEAL_SECONDS)
            await wait_until(partial(_replaced, proc, name, 1 + len(others), victim.pid), timeout=HEAL_SECONDS,
                             message=f"{name} started again")
            assert time.monotonic() - killed_at < HEAL_SECONDS, name
            assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, "the supervisor died"
