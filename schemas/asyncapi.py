"""The AsyncAPI 3.0 document of every topic, built from the message models."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from schemas import cloudevents
from schemas.commands import COMMAND_MODELS, SEGMENT_COMMANDS, RegisterUsers
from schemas.common import SLUG_PATTERN
from schemas.events import MembershipChanged, SegmentChanged
from schemas.results import CommandResult

EVENT_MODELS = (MembershipChanged, SegmentChanged, CommandResult)
# What decoding finds wrong, and UNPROCESSABLE: a well-formed record the worker failed on (quarantined).
DLQ_ERROR_CODES = ("INVALID_JSON", "NOT_AN_OBJECT", "UNKNOWN_TYPE", "MISSING_COMMAND_ID", "INVALID_FIELDS",
                   "UNPROCESSABLE")
KAFKA_BINDING = "0.5.0"

_STRING = {"type": "string"}
USER_KEY = {"type": "string", "pattern": "^[1-9][0-9]{0,18}$", "description": "the user id, decimal"}
SLUG_KEY = {"type": "string", "pattern": SLUG_PATTERN, "description": "the segment's slug"}
COMMAND_ID_KEY = {"type": "string", "minLength": 1, "maxLength": 128, "description": "the command id"}


def _event_headers(ce_type: str, time_field: str, subject: str) -> dict[str, Any]:
    """`event_id` and the CloudEvents Kafka protocol binding's headers in binary mode (the value is the data)."""
    properties = {
        "event_id": _STRING | {"description": "stable id of this message, for deduplication"},
        "ce_specversion": {"type": "string", "const": cloudevents.SPECVERSION, "description": "CloudEvents version"},
        "ce_id": _STRING | {"description": "the CloudEvents id: the same as `event_id`"},
        "ce_source": {"type": "string", "const": cloudevents.SOURCE},
        "ce_type": {"type": "string", "const": ce_type},
        "ce_time": {"type": "string", "format": "date-time", "description": f"the payload's `{time_field}`"},
        "ce_subject": _STRING | {"description": f"{subject} (the key)"},
        "content-type": {"type": "string", "const": cloudevents.CONTENT_TYPE,
                         "description": "the CloudEvents datacontenttype"},
    }
    return {"type": "object", "properties": properties, "required": list(properties)}


COMMAND_HEADERS = {
    "type": "object",
    "properties": {"replayed-from": {"type": "string", "pattern": "^.+/[0-9]+@[0-9]+$",
                                     "description": "set by `segmentation dlq replay`: the dead letter it was "
                                                    "published from, `<dlq topic>/<partition>@<offset>`"}},
}
DLQ_HEADERS = {
    "type": "object",
    "properties": {
        "error.code": {"type": "string", "enum": list(DLQ_ERROR_CODES), "description": "why it is not a command"},
        "error.message": _STRING | {"description": "what was wrong, for people"},
        "source.topic": _STRING | {"description": "the topic it was read from"},
        "source.partition": {"type": "string", "pattern": "^[0-9]+$", "description": "its partition, decimal"},
        "source.offset": {"type": "string", "pattern": "^[0-9]+$", "description": "its offset, decimal"},
        "event_id": _STRING | {"description": "stable id of this dead letter, for deduplication"},
        "error.truncated": {"type": "string", "pattern": "^[0-9]+$",
                            "description": "present when the value was cut to fit: its original length in bytes"},
        "error.key_truncated": {"type": "string", "pattern": "^[0-9]+$",
                                "description": "present when the key was cut to fit: its original length in bytes"},
    },
    "required": ["error.code", "error.message", "source.topic", "source.partition", "source.offset", "event_id"],
}


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0]


def _command_key(model: type[BaseModel]) -> dict[str, Any]:
    if model in SEGMENT_COMMANDS:
        return SLUG_KEY
    if model is RegisterUsers:
        return USER_KEY | {"description": "the first of `user_ids`, decimal"}
    return USER_KEY


def _message(model: type[BaseModel], payload: dict[str, Any], key: dict[str, Any], headers: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": model.__name__, "title": model.__name__, "summary": _summary(model),
        "contentType": "application/json", "payload": payload,
        "bindings": {"kafka": {"key": key, "bindingVersion": KAFKA_BINDING}},
    }
    if headers:
        message["headers"] = headers
    return message


def _channel(address: str, title: str, description: str, names: list[str]) -> dict[str, Any]:
    return {"address": address, "title": title, "description": description,
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names}}


def _operation(action: str, channel: str, names: list[str], summary: str) -> dict[str, Any]:
    return {"action": action, "summary": summary, "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{n}"} for n in names]}


def document(settings: Any) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document; `settings` is anything with the five `*_topic` attributes."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in COMMAND_MODELS]
    wanted += [(m, "serialization") for m in EVENT_MODELS]
    refs, defs = models_json_schema(wanted, ref_template="#/components/schemas/{model}")
    payload = {model: refs[(model, mode)] for model, mode in wanted}
    by_command_id = {"location": "$message.payload#/command_id", "description": "the command's `command_id`"}

    messages = {m.__name__: _message(m, payload[m], _command_key(m), COMMAND_HEADERS) | {"correlationId": by_command_id}
                for m in COMMAND_MODELS}
    messages["CommandResult"] = _message(
        CommandResult, payload[CommandResult], COMMAND_ID_KEY,
        _event_headers(cloudevents.COMMAND_RESULT, "processed_at", "the command id"),
    ) | {"summary": "The result of one command", "correlationId": by_command_id}
    messages["MembershipChanged"] = _message(
        MembershipChanged, payload[MembershipChanged], USER_KEY,
        _event_headers(cloudevents.MEMBERSHIP_CHANGED, "occurred_at", "the user id, decimal"))
    messages["SegmentChanged"] = _message(SegmentChanged, payload[SegmentChanged], SLUG_KEY,
                                          _event_headers(cloudevents.SEGMENT_CHANGED, "occurred_at", "the slug"))
    messages["DeadLetter"] = {
        "name": "DeadLetter", "title": "DeadLetter", "summary": "A message of the commands topic that is not a command",
        "description": "The original value and key, untouched unless too large to publish again (then cut, "
                       "and the error.truncated / error.key_truncated headers give the original length); the "
                       "headers say why it was set aside. A tombstone stays a tombstone.",
        "contentType": "application/octet-stream", "payload": {"type": "string", "description": "the original bytes"},
        "headers": DLQ_HEADERS,
        "bindings": {"kafka": {"key": {"type": ["string", "null"], "description": "the original key"},
                               "bindingVersion": KAFKA_BINDING}},
    }

    commands = [m.__name__ for m in COMMAND_MODELS]
    channels = {
        "commands": _channel(settings.commands_topic, "Commands",
                             "Commands in; keyed by user id (user commands) or slug (segment commands), "
                             "so the commands of one user are applied in order.", commands),
        "deadLetters": _channel(settings.dlq_topic, "Dead letters",
                                "Messages of the commands topic that are not commands.", ["DeadLetter"]),
        "commandResults": _channel(settings.results_topic, "Command results",
                                   "The result of every command, keyed by command id.", ["CommandResult"]),
        "membershipChanged": _channel(settings.membership_topic, "Membership changes",
                                      "Every change of a user's membership, keyed by user id, in order per user.",
                                      ["MembershipChanged"]),
        "segmentChanged": _channel(settings.segment_topic, "Segment changes",
                                   "Every change of a segment, keyed by slug.", ["SegmentChanged"]),
    }
    receive = _operation("receive", "commands", commands, "The worker applies commands")
    receive["reply"] = {"channel": {"$ref": "#/channels/commandResults"},
                        "messages": [{"$ref": "#/channels/commandResults/messages/CommandResult"}]}
    operations = {
        "receiveCommands": receive,
        "sendDeadLetters": _operation("send", "deadLetters", ["DeadLetter"], "Set aside what is not a command"),
        "sendCommandResults": _operation("send", "commandResults", ["CommandResult"],
                                         "Publish the result of every command"),
        "sendMembershipChanged": _operation("send", "membershipChanged", ["MembershipChanged"],
                                            "Publish every membership change"),
        "sendSegmentChanged": _operation("send", "segmentChanged", ["SegmentChanged"],
                                         "Publish every segment change"),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "segmentation", "version": "1.0.0",
                 "description": "Commands in through Kafka, memberships in PostgreSQL, events out. "
                                "Every value is a UTF-8 JSON object; timestamps are RFC 3339 in UTC."},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": defs.get("$defs", {}), "messages": messages},
    }
