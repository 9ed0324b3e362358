"""Outbox rows: every message the write path publishes is built here, and `topics` says where each kind goes.

The one exception: the set-based fan-outs (`sql._fan_out`) write the same MembershipChanged JSON in SQL, one
statement for a million members, never a Python loop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import orjson
import uuid_utils

from schemas import cloudevents
from schemas.events import SegmentChanged
from service.domain import Change
from service.infra.settings import Settings
from service.write.decoding import InboundRecord, time_text

Kind = Literal["membership", "segment", "result", "dlq"]  # the outbox.kind column
DLQ_MAX_BYTES = 900_000  # key + value of a dead letter
DLQ_MAX_KEY_BYTES = 16_384


def topics(settings: Settings) -> dict[str, str]:
    """The topic of each outbox kind."""
    return {"membership": settings.membership_topic, "segment": settings.segment_topic,
            "result": settings.results_topic, "dlq": settings.dlq_topic}


@dataclass
class OutboxRow:
    """One message for the relay to publish; `kind` picks the topic."""

    kind: Kind
    key: bytes | None
    payload: bytes | None  # None: a dead-lettered tombstone
    event_id: str
    headers: dict[str, str] | None = None

    def record(self) -> tuple:
        return (self.kind, self.key, self.payload, self.event_id, json.dumps(self.headers) if self.headers else None)


@dataclass(frozen=True)
class CloudEvent:
    """The CloudEvents binding of a published kind: its constant `ce_*` headers and where its `time` is."""

    constant: tuple[tuple[str, bytes], ...]
    time_field: str
    time_keys: tuple[bytes, bytes]  # the time field as a JSON key: as orjson and pydantic write it, as SQL does

    @classmethod
    def of(cls, type_: str, time_field: str) -> CloudEvent:
        constant = {"ce_specversion": cloudevents.SPECVERSION, "ce_source": cloudevents.SOURCE, "ce_type": type_,
                    "content-type": cloudevents.CONTENT_TYPE}
        return cls(tuple((k, v.encode()) for k, v in constant.items()), time_field,
                   (f'"{time_field}":"'.encode(), f'"{time_field}" : "'.encode()))  # older fan-outs' rows: " : "

    def time(self, payload: bytes) -> bytes | None:
        """The payload's time, found without parsing the JSON (once per message in the relay). Inside a JSON string
        every quote is escaped, so `"occurred_at":"` can only be a key, and none of our payloads nests one; from
        the end, where the time fields are."""
        for time_key in self.time_keys:
            if (start := payload.rfind(time_key)) >= 0:
                start += len(time_key)
                return payload[start:payload.find(b'"', start)]
        try:  # another spelling (a result stored as jsonb text before migration 002: `"processed_at": "`)
            value = orjson.loads(payload).get(self.time_field)
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return value.encode() if isinstance(value, str) else None


# Events and results carry the binding's headers; dead letters are not events and keep only their own.
CLOUDEVENTS = {"membership": CloudEvent.of(cloudevents.MEMBERSHIP_CHANGED, "occurred_at"),
               "segment": CloudEvent.of(cloudevents.SEGMENT_CHANGED, "occurred_at"),
               "result": CloudEvent.of(cloudevents.COMMAND_RESULT, "processed_at")}


def published_headers(kind: str, key: bytes | None, payload: bytes | None, event_id: bytes) -> list[tuple[str, bytes]]:
    """The Kafka headers of a row as published: `event_id`, plus the CloudEvents binary-mode ones for events and
    results (`ce_subject` is the key: the user id, slug or command id; `ce_time` the payload's own time)."""
    if (ce := CLOUDEVENTS.get(kind)) is None:
        return [("event_id", event_id)]
    headers = [("event_id", event_id), *ce.constant, ("ce_id", event_id)]
    if key is not None:
        headers.append(("ce_subject", key))
    if payload is not None and (time := ce.time(payload)) is not None:
        headers.append(("ce_time", time))
    return headers


def new_id() -> str:
    """A random (v4) UUID as text; uuid_utils is an order of magnitude cheaper than uuid.uuid4."""
    return str(uuid_utils.uuid4())


def membership_event(change: Change, command_id: str | None) -> OutboxRow:
    """A MembershipChanged event. Written out by hand (same fields, same order as the model): this is the
    hottest line of the worker, and the values come from validated state."""
    event_id = new_id()
    payload = orjson.dumps({
        "event_id": event_id, "type": "MembershipChanged", "change": change.change, "user_id": change.user_id,
        "slug": change.segment.slug, "reason": change.reason,
        "expires_at": time_text(change.expires_at) if change.expires_at is not None else None,
        "occurred_at": time_text(change.occurred_at), "command_id": command_id,
    })
    return OutboxRow("membership", str(change.user_id).encode(), payload, event_id)


def result_payload(command_id: str, type_: str, events: int, processed_at: datetime) -> str:
    """The JSON of an applied CommandResult, written by hand (same fields, same order as the model): one per
    command on the hot path."""
    return orjson.dumps({"command_id": command_id, "type": type_, "status": "applied", "error": None,
                         "events": events, "processed_at": time_text(processed_at)}).decode()


def segment_event(event: SegmentChanged) -> OutboxRow:
    return OutboxRow("segment", event.slug.encode(), event.model_dump_json().encode(), event.event_id)


def result_row(command_id: str, payload: str) -> OutboxRow:
    return OutboxRow("result", command_id.encode(), payload.encode(), new_id())


def dead_letter_row(record: InboundRecord, code: str, message: str) -> OutboxRow:
    """The original bytes (a tombstone stays one) with the five headers that say why."""
    headers = {"error.code": code, "error.message": message, "source.topic": record.topic,
               "source.partition": str(record.partition), "source.offset": str(record.offset)}
    key, value = record.key, record.value
    # What the broker took may not fit back with our headers: keep the heads, say how long they were.
    if key is not None and len(key) > DLQ_MAX_KEY_BYTES:
        key, headers["error.key_truncated"] = key[:DLQ_MAX_KEY_BYTES], str(len(key))
    room = DLQ_MAX_BYTES - len(key or b"")
    if value is not None and len(value) > room:
        value, headers["error.truncated"] = value[:room], str(len(value))
    return OutboxRow("dlq", key, value, new_id(), headers)
