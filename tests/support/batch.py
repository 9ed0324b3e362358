"""Feed records straight to the batch processor (real PostgreSQL, no broker) and read what it wrote."""
from __future__ import annotations

import json
from datetime import UTC, datetime

from service.write.batch import BatchProcessor
from service.write.decoding import InboundRecord


class Feeder:
    """Appends records to a partition of a fake topic and applies them in batches, with a settable clock."""

    def __init__(self, conn, now: datetime | None = None, fan_out_slice: int = 20_000,
                 fan_out_pass_seconds: float = 0.25):
        self.conn = conn
        self.now = now or datetime.now(UTC)
        self.offsets: dict[int, int] = {}
        self.processor = BatchProcessor("test-group", clock=lambda: self.now, fan_out_slice=fan_out_slice,
                                        fan_out_pass_seconds=fan_out_pass_seconds)

    def record(self, body, partition: int = 0, key: bytes | None = None) -> InboundRecord:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        value = body if isinstance(body, bytes) else json.dumps(body).encode()
        return InboundRecord("commands", partition, offset, key, value)

    async def apply(self, *bodies, partition: int = 0):
        return await self.processor.process(self.conn, [self.record(b, partition) for b in bodies])

    async def outbox(self, kind: str) -> list:
        rows = await self.conn.fetch(
            "SELECT payload, headers::text AS headers, key FROM outbox WHERE kind = $1 ORDER BY seq", kind)
        if kind == "dlq":
            return [(r["payload"], json.loads(r["headers"]), r["key"]) for r in rows]
        return [json.loads(r["payload"]) for r in rows]

    async def results(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in await self.outbox("result"):
            out.setdefault(r["command_id"], []).append(r)
        return out

    async def result(self, command_id: str) -> dict:
        return (await self.results())[command_id][-1]

    async def events(self, user_id: int | None = None) -> list[tuple]:
        return [(e["change"], e["user_id"], e["slug"], e["reason"]) for e in await self.outbox("membership")
                if user_id is None or e["user_id"] == user_id]

    async def members(self, slug: str) -> set[int]:
        rows = await self.conn.fetch(
            "SELECT m.user_id FROM memberships m JOIN segments s ON s.id = m.segment_id "
            "WHERE s.slug = $1 AND s.deleted_at IS NULL", slug)
        return {r["user_id"] for r in rows}


def create(slug: str, cid: str | None = None, percent=None) -> dict:
    body = {"type": "CreateSegment", "command_id": cid or f"create-{slug}", "slug": slug}
    return body | ({"auto_percent": percent} if percent is not None else {})


def update_user(cid: str, user_id: int, add=(), remove=(), **extra) -> dict:
    return {"type": "UpdateUserSegments", "command_id": cid, "user_id": user_id, "add": list(add),
            "remove": list(remove)} | extra
