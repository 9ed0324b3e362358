"""The relay's own CPU per message, without a broker or a database: a claimed row made into a record with its headers
and appended to a producer batch, the batch built (what `send_batch` sends). Run:

    .venv/bin/python bench/relay_rows.py
"""
from __future__ import annotations

import asyncio
import statistics
import time
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer

from producers import relay

ROWS = 1_000  # one claim (RELAY_BATCH_MAX's default order)
ROUNDS = 500


def claimed() -> list[dict]:
    """What CLAIM returns for a fan-out of MembershipChanged events (asyncpg records read the same way)."""
    now = datetime.now(UTC)
    return [{"seq": i, "kind": "membership", "key": str(1000 + i).encode(), "event_id": f"{i:08d}-6c1f-4b1e-9a0e-5f2b8c1d2e3f",
             "payload": orjson.dumps({"event_id": f"{i:08d}-6c1f-4b1e-9a0e-5f2b8c1d2e3f", "type": "MembershipChanged",
                                      "change": "added", "user_id": 1000 + i, "slug": "AVITO_VOICE_MESSAGES",
                                      "reason": "auto_percent", "expires_at": None,
                                      "occurred_at": "2026-12-01T23:39:21.123456Z", "command_id": "c-1"}),
             "headers": None, "created_at": now} for i in range(ROWS)]


async def main() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", max_batch_size=4 << 20)  # never started
    records = claimed()
    per_message = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        rows = [relay._row(r) for r in records]  # type: ignore[arg-type]
        batch = producer.create_batch()
        for r in rows:
            assert batch.append(key=r.key, value=r.payload, timestamp=None, headers=r.headers) is not None
        batch._build()
        per_message.append((time.perf_counter() - start) / ROWS * 1e6)
    await producer.stop()
    print(f"{ROWS} rows a batch, {ROUNDS} rounds: median {statistics.median(per_message):.2f} µs per message, "
          f"best {min(per_message):.2f} µs; headers per message: {len(rows[0].headers)}")


if __name__ == "__main__":
    asyncio.run(main())
