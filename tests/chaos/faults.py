"""The faults of the chaos runs, each injected into a running cluster under load. Each returns the time to
recover: from the moment the fault is over (a killed process restarted, the path back, the process thawed) until
a new command's result is published."""
from __future__ import annotations

import asyncio
import random
import time

from tests.chaos.cluster import Cluster
from tests.chaos.load import ROLLOUT, Load
from tests.support.helpers import wait_until

RESTART_PAUSE = 1.0  # what `make run`'s supervisor waits before starting a dead process again


async def sigkill(cluster: Cluster, load: Load, name: str) -> float:
    """SIGKILL one process of `name` (the active one for relay and ttl), start it again after a pause."""
    victim = (await cluster.leader(name) if name in ("relay", "ttl") else None) or random.choice(cluster.live(name))
    cluster.kill(victim)
    await asyncio.sleep(RESTART_PAUSE)
    cluster.start(name)
    return await load.probe()


async def postgres_crash(cluster: Cluster, load: Load) -> float:
    """`pg_ctl stop -m immediate`, then start on the same data directory."""
    await cluster.crash_postgres()
    return await load.probe()


async def kafka_unreachable(cluster: Cluster, load: Load, seconds: float, mode: str = "refuse") -> float:
    """Every client's path to the broker refused (or silent: `blackhole`) for `seconds`."""
    await cluster.kafka.set_mode(mode)
    await asyncio.sleep(seconds)
    await cluster.kafka.set_mode("pass")
    return await load.probe()


async def relay_frozen(cluster: Cluster, load: Load, seconds: float = 15.0) -> float:
    """SIGSTOP the relay leading the most shards for `seconds` (another relay runs beside it), then SIGCONT.
    Recovery is counted from the freeze until the outbox holds no row older than 2 s: with a takeover that is
    during the freeze, without one only after the thaw."""
    active = await cluster.leader("relay")
    assert active is not None, "no relay leads a shard"
    frozen_at = time.monotonic()
    cluster.freeze(active)
    try:
        while time.monotonic() - frozen_at < seconds:
            await asyncio.sleep(0.5)
            if time.monotonic() - frozen_at > 3 and await _outbox_age(cluster) <= 2:
                return time.monotonic() - frozen_at  # taken over
    finally:
        cluster.thaw(active)
    async def caught_up() -> bool:
        return await _outbox_age(cluster) <= 2

    await wait_until(caught_up, timeout=120, interval=0.2, message="the outbox drained after the thaw")
    return time.monotonic() - frozen_at


async def _outbox_age(cluster: Cluster) -> float:
    rows = await cluster.sql("SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float AS age FROM outbox")
    return rows[0]["age"]


async def rebalance_storm(cluster: Cluster, load: Load, seconds: float = 30.0) -> float:
    """Workers join, leave (SIGKILL) and freeze past the session timeout, for `seconds`; ends with two workers."""
    stop_at = time.monotonic() + seconds
    frozen = None
    while time.monotonic() < stop_at:
        step = random.choice(["join", "leave", "freeze"])
        live = [p for p in cluster.live("worker") if p.pid not in cluster.frozen]
        if step == "join" or len(live) < 2:
            cluster.start("worker")
        elif step == "leave":
            cluster.kill(random.choice(live))
        elif frozen is None:
            frozen = random.choice(live)
            cluster.freeze(frozen)
        await asyncio.sleep(cluster.settings.kafka_session_timeout_ms / 1000 + 1)  # past the session timeout
        if frozen is not None and step != "freeze":
            cluster.thaw(frozen)
            frozen = None
    if frozen is not None:
        cluster.thaw(frozen)
    for extra in cluster.live("worker")[2:]:
        extra.terminate()
        await asyncio.to_thread(extra.wait, 30)
    return await load.probe()


async def clock_skew(cluster: Cluster, load: Load, offset: float = -3.0, seconds: float = 30.0) -> float:
    """Every worker's wall clock `offset` seconds off the TTL producer's for `seconds` (workers replaced one by one
    by skewed ones, then back)."""
    for clock in (offset, 0.0):
        for old in cluster.live("worker"):
            cluster.start("worker", clock_offset=clock)
            old.terminate()
            await asyncio.to_thread(old.wait, 30)
        if clock:
            await asyncio.sleep(seconds)
    return await load.probe()


async def percent_change(cluster: Cluster, load: Load, rounds: int = 4) -> float:
    """The rolled-out segment between 0 % and 100 % (a fan-out over every known user) while the load's users name
    it, under the databases' lock_timeout and statement_timeout."""
    for n in range(rounds):
        await load.send(ROLLOUT, {"type": "UpdateSegment", "command_id": load.new_id(), "slug": ROLLOUT,
                                  "auto_percent": 100 if n % 2 == 0 else 0})
        await asyncio.sleep(1.0)
    return await load.probe()
