"""Turn a Kafka record's bytes into a command, or say why it is a dead letter."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

import orjson
from pydantic import ValidationError

from schemas.commands import COMMAND_ADAPTER, COMMAND_TYPES, SCHEDULER_COMMANDS, Command
from schemas.common import format_time

# The instants of a batch repeat (its `now`, a shared expires_at): each is formatted once.
time_text = functools.lru_cache(maxsize=1024)(format_time)

DUE_FIELD = {"ExpireMembership": "expires_at", "StartMembership": "starts_at"}  # a scheduler command's due time


def scheduler_json(type_: str, command_id: str, user_id: int, slug: str, due: datetime,
                   issued_at: datetime | None = None) -> bytes:
    """A scheduler command's JSON written by hand, field for field as its model_dump_json (the scheduler's bursts
    publish it, the worker hashes it); without `issued_at`, the body the hash is of."""
    issued = {"issued_at": time_text(issued_at)} if issued_at is not None else {}
    return orjson.dumps({"command_id": command_id, **issued, "type": type_, "user_id": user_id, "slug": slug,
                         DUE_FIELD[type_]: time_text(due)})


@dataclass(frozen=True)
class InboundRecord:
    """The parts of a consumed Kafka record the worker needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def position(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True)
class Decoded:
    """A record read as a command (`command` set) or as a dead letter (`error_code` set)."""

    record: InboundRecord
    command: Command | None
    command_id: str | None
    body_hash: str
    error_code: str | None = None
    error_message: str | None = None
    type_name: str = "unknown"

    @property
    def type(self) -> str:
        return self.command.type if self.command is not None else self.type_name


def body_hash(command: Command) -> str:
    """Hash of the command's canonical body; `issued_at` is left out (a publisher may re-stamp a retry)."""
    if isinstance(command, SCHEDULER_COMMANDS):  # the scheduler's bursts: the same JSON, written by hand
        body = scheduler_json(command.type, command.command_id, command.user_id, command.slug,
                              getattr(command, DUE_FIELD[command.type]))
    else:
        body = command.model_dump_json(exclude={"issued_at"}).encode()
    return hashlib.sha256(body).hexdigest()


def _readable_id(obj: object) -> str | None:
    if isinstance(obj, dict):
        cid = obj.get("command_id")
        if isinstance(cid, str) and 1 <= len(cid) <= 128 and _storable(cid):
            return cid
    return None


def _storable(text: str) -> bool:
    """PostgreSQL text takes it: valid UTF-8 (no lone surrogate), no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def printable(text: str, limit: int = 1000) -> str:
    """Text safe for a PostgreSQL text/jsonb column and a Kafka header: no NUL, bounded length."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summary(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def decode(record: InboundRecord) -> Decoded:
    """Validate once with the prebuilt adapter; classify what is not a command. Never raises."""
    raw = record.value or b""
    try:
        return Decoded(record, c := COMMAND_ADAPTER.validate_json(raw), c.command_id, body_hash(c))
    except ValidationError as err:
        summary = _summary(err)
    except (RecursionError, ValueError, ArithmeticError) as err:  # absurd nesting, dates out of range, ...
        summary = f"{type(err).__name__}: {err}"
    raw_hash = hashlib.sha256(raw).hexdigest()

    def dead(code: str, message: str, command_id: str | None = None, kind: str = "unknown") -> Decoded:
        return Decoded(record, None, command_id, raw_hash, code, printable(message), kind)

    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return dead("INVALID_JSON", f"value is not JSON: {str(exc)[:200]}")
    if not isinstance(obj, dict):
        return dead("NOT_AN_OBJECT", f"value is a JSON {type(obj).__name__}, not an object")
    cid = _readable_id(obj)
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in COMMAND_TYPES:
        name = kind if isinstance(kind, str) and len(kind) <= 64 and _storable(kind) else "unknown"
        return dead("UNKNOWN_TYPE", f"unknown command type {printable(repr(kind), 200)}", cid, name)
    if "command_id" not in obj:
        return dead("MISSING_COMMAND_ID", "command_id is missing", None, kind)
    return dead("INVALID_FIELDS", summary, cid, kind)
