"""Chaos runs: phases of faults under load, each ended by the invariant checker. `make chaos` runs the long plan
(`python -m tests.chaos.run`) and prints per fault kind: injected, commands, lost, double effects, duplicate
deliveries, time to recover (p50, max) and the violations found. A failed run keeps the cluster's folder (its
processes' logs) and prints where."""
from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos import faults
from tests.chaos.cluster import Cluster
from tests.chaos.invariants import Report, check, settle
from tests.chaos.load import Load

Fault = Callable[[Cluster, Load], Awaitable[float]]


@dataclass
class Phase:
    kind: str
    faults: list[Fault]
    pause: float = 3.0  # of load before each fault


@dataclass
class Row:
    kind: str
    injected: int
    commands: int
    lost: int
    double_effects: int
    duplicate_deliveries: int
    recover: list[float]
    tail_missed: int = 0
    violations: dict[str, list] = field(default_factory=dict)


def kill(name: str) -> Fault:
    return functools.partial(faults.sigkill, name=name)


SHORT = [Phase("short: SIGKILL worker, relay; PostgreSQL crash; Kafka cut 10 s",
               [kill("worker"), kill("relay"), faults.postgres_crash,
                functools.partial(faults.kafka_unreachable, seconds=10)])]

LONG = [
    Phase("SIGKILL worker", [kill("worker")] * 4),
    Phase("SIGKILL relay", [kill("relay")] * 3),
    Phase("SIGKILL ttl", [kill("ttl")] * 3),
    Phase("SIGKILL api", [kill("api")] * 3),
    Phase("PostgreSQL crash (pg_ctl stop -m immediate)", [faults.postgres_crash] * 3, pause=5),
    Phase("Kafka unreachable 10 s (refused)", [functools.partial(faults.kafka_unreachable, seconds=10)] * 2),
    Phase("Kafka unreachable 60 s (silent)", [functools.partial(faults.kafka_unreachable, seconds=60,
                                                                mode="blackhole")]),
    Phase("relay frozen (SIGSTOP 15 s), standby running", [faults.relay_frozen] * 2),
    Phase("rebalance storm (30 s)", [faults.rebalance_storm]),
    Phase("percent 0 <-> 100 % under lock/statement timeouts", [faults.percent_change] * 2),
    Phase("worker clocks 3 s behind the TTL producer's (30 s)", [faults.clock_skew]),
]


async def run(plan: list[Phase], folder: Path, users: int = 300, rate: float = 40.0,
              out: Callable[[str], None] = lambda _: None) -> list[Row]:
    rows: list[Row] = []
    async with Cluster(folder) as cluster:
        async with Load(cluster.settings, users=users, rate=rate) as load:
            await load.probe(timeout=120)  # the cluster is up
            before, seen = Report(), set()
            for phase in plan:
                out(f"{time.strftime('%H:%M:%S')} {phase.kind}")
                stop = asyncio.Event()
                sending = asyncio.create_task(load.run(stop))
                recover, stuck = [], []
                try:
                    for fault in phase.faults:
                        await asyncio.sleep(phase.pause)
                        try:
                            recover.append(await fault(cluster, load))
                        except AssertionError as exc:  # the probe timed out: say so, go on with the plan
                            stuck.append(str(exc))
                finally:
                    stop.set()
                    await sending
                await settle(cluster, load)
                report = await check(cluster, load)
                new = {k: [x for x in found if repr(x) not in seen] for k, found in report.broken().items()}
                seen |= {repr(x) for found in report.broken().values() for x in found}
                rows.append(Row(phase.kind, len(phase.faults), report.commands - before.commands,
                                report.lost - before.lost, report.double_effects - before.double_effects,
                                report.duplicate_deliveries - before.duplicate_deliveries, recover,
                                report.tail_missed - before.tail_missed,
                                {k: found for k, found in new.items() if found} | ({"recovered": stuck} if stuck else {})))
                before = report
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| fault | injected | commands | lost | double effects | duplicate deliveries | recover p50 | recover max "
             "| missed by the live reader |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kind} | {r.injected} | {r.commands} | {r.lost} | {r.double_effects} | "
                     f"{r.duplicate_deliveries} | {_seconds(statistics.median, r.recover)} | {_seconds(max, r.recover)} "
                     f"| {r.tail_missed} |")
    return "\n".join(lines)


def _seconds(f, values: list[float]) -> str:
    return f"{f(values):.1f} s" if values else "never"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="the short plan of `make test`")
    parser.add_argument("--rate", type=float, default=40.0, help="commands per second")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's folder (logs, data) even when all pass")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="chaos-"))
    rows: list[Row] = []
    try:
        rows = asyncio.run(run(SHORT if args.short else LONG, folder, rate=args.rate,
                               out=lambda line: print(line, file=sys.stderr, flush=True)))
    finally:
        print(table(rows))
        broken = [(r.kind, r.violations) for r in rows if r.violations]
        for kind, violations in broken:
            print(f"\nviolations after {kind}:")
            for name, found in violations.items():
                print(f"  {name}: {len(found)}: {found[:3]}")
        passed = rows and not broken
        if passed and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:  # a failure is read in its processes' logs: one file per process started, by name and number
            print(f"\nkept: {folder} (logs in {folder / 'logs'})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
