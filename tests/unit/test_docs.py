"""docs/: the checked-in schemas match the code, and each document is valid for its specification."""
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
from jsonschema import Draft7Validator, Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT7

from schemas import (
    CommandResult,
    CreateSegment,
    DeleteSegment,
    ErrorCode,
    ErrorInfo,
    ExpireMembership,
    MembershipChanged,
    RegisterUsers,
    SegmentChanged,
    SlugAdd,
    StartMembership,
    UpdateSegment,
    UpdateSegmentMembers,
    UpdateUserSegments,
    openapi,
    topics,
)
from schemas.asyncapi import DLQ_ERROR_CODES, document
from schemas.commands import COMMAND_MODELS
from schemas.export import export
from service.write.decoding import InboundRecord, decode
from service.write.outbox import published_headers

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ASYNCAPI_SCHEMA = ROOT / "tests" / "data" / "asyncapi-3.0.0.json"  # from the @asyncapi/specs package
NOW = datetime(2026, 11, 22, 7, 30, 5, 123456, tzinfo=UTC)
DEFAULT_TOPICS = SimpleNamespace(
    commands_topic=topics.COMMANDS, dlq_topic=topics.DLQ, results_topic=topics.RESULTS,
    membership_topic=topics.MEMBERSHIP_CHANGED, segment_topic=topics.SEGMENT_CHANGED,
)
COMMANDS = [
    CreateSegment(command_id="c-1", slug="AVITO_VOICE_MESSAGES", description="voice", auto_percent=Decimal("0.07")),
    UpdateSegment(command_id="c-2", slug="AVITO_VOICE_MESSAGES", auto_percent=Decimal("30"), issued_at=NOW),
    DeleteSegment(command_id="c-3", slug="AVITO_VOICE_MESSAGES"),
    UpdateUserSegments(command_id="c-4", user_id=1000, add=["A", SlugAdd(slug="B", ttl_seconds=60)], remove=["C"]),
    RegisterUsers(command_id="c-5", user_ids=[1, 2**63 - 1]),
    ExpireMembership(command_id="c-6", user_id=1000, slug="B", expires_at=NOW),
    UpdateSegmentMembers(command_id="c-7", slug="B", add=[1, 2, 3], remove=[4], ttl_seconds=3600, starts_at=NOW),
    StartMembership(command_id="c-8", user_id=1000, slug="B", starts_at=NOW),
    CreateSegment(command_id="c-9", slug="DISCOUNT_30", auto_percent=Decimal(30), layer="discounts"),
    UpdateUserSegments(command_id="c-10", user_id=1, add=[SlugAdd(slug="B", starts_at=NOW, ttl_seconds=60)]),
]
EVENTS = [
    MembershipChanged(event_id="e-1", change="added", user_id=1000, slug="B", reason="command", expires_at=NOW,
                      occurred_at=NOW, command_id="c-4"),
    MembershipChanged(event_id="e-2", change="removed", user_id=7, slug="B", reason="auto_percent", expires_at=None,
                      occurred_at=NOW, command_id=None),
    SegmentChanged(event_id="e-3", change="created", slug="A", description=None, auto_percent=Decimal("12.5"),
                   occurred_at=NOW, command_id="c-1"),
    SegmentChanged(event_id="e-4", change="updated", slug="DISCOUNT_30", description=None, auto_percent=Decimal(30),
                   occurred_at=NOW, command_id="c-9", layer="discounts", bucket_start=5000, bucket_end=8000),
    MembershipChanged(event_id="e-5", change="added", user_id=1000, slug="B", reason="scheduled", expires_at=None,
                      occurred_at=NOW, command_id="c-8"),
    CommandResult(command_id="c-9", type="CreateSegment", status="rejected", events=0, processed_at=NOW,
                  error=ErrorInfo(code=ErrorCode.LAYER_FULL, message="full", details={"layer": "discounts"})),
    CommandResult(command_id="c-4", type="UpdateUserSegments", status="rejected", events=0, processed_at=NOW,
                  error=ErrorInfo(code=ErrorCode.SEGMENT_NOT_FOUND, message="unknown", details={"slugs": ["X"]})),
    CommandResult(command_id="c-1", type="CreateSegment", status="applied", error=None, events=3, processed_at=NOW),
]
SAMPLES = COMMANDS + EVENTS


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def asyncapi() -> dict:
    return _load(DOCS / "asyncapi.json")


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(doc: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_checked_in_docs_are_what_the_code_generates(tmp_path):
    written = export(tmp_path)
    generated = {p.relative_to(tmp_path) for p in written}
    checked_in = {p.relative_to(DOCS) for p in DOCS.rglob("*.json")}
    assert checked_in == generated, "run `segmentation export-schemas` and commit docs/"
    for relative in generated:
        assert (DOCS / relative).read_text() == (tmp_path / relative).read_text(), (
            f"docs/{relative} is stale: run `segmentation export-schemas`")


def test_export_ignores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMANDS_TOPIC", "somebody.elses.topic")
    export(tmp_path)
    assert _load(tmp_path / "asyncapi.json") == document(DEFAULT_TOPICS)


def test_asyncapi_document_is_valid_asyncapi_3(asyncapi):
    validator = Draft7Validator(_load(ASYNCAPI_SCHEMA))
    assert [f"{e.json_path}: {e.message}" for e in validator.iter_errors(asyncapi)] == []
    broken = {**asyncapi, "operations": {"x": {"action": "publish", "channel": {"$ref": "#/channels/commands"}}}}
    assert not validator.is_valid(broken)


def test_asyncapi_references_all_resolve(asyncapi):
    refs = set(_refs(asyncapi))
    assert refs
    for ref in refs:
        _resolve(asyncapi, ref)


def test_asyncapi_describes_every_topic_key_and_header(asyncapi):
    addresses = {c["address"] for c in asyncapi["channels"].values()}
    assert addresses == set(vars(DEFAULT_TOPICS).values())
    actions = {_resolve(asyncapi, op["channel"]["$ref"])["address"]: op["action"]
               for op in asyncapi["operations"].values()}
    assert actions.pop(topics.COMMANDS) == "receive" and set(actions.values()) == {"send"}
    messages = asyncapi["components"]["messages"]
    assert set(messages) == {type(s).__name__ for s in SAMPLES} | {"DeadLetter"}
    for message in messages.values():
        assert message["bindings"]["kafka"]["key"]["description"]
    for name in ("MembershipChanged", "SegmentChanged", "CommandResult"):
        assert messages[name]["headers"]["required"][0] == "event_id"
    assert set(messages["DeadLetter"]["headers"]["required"]) == {
        "error.code", "error.message", "source.topic", "source.partition", "source.offset", "event_id"}


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{type(e).__name__}-{e.command_id}")
def test_asyncapi_headers_are_those_the_relay_publishes_for_each_event_and_result(event, asyncapi):
    kind, key = {MembershipChanged: ("membership", "user_id"), SegmentChanged: ("segment", "slug"),
                 CommandResult: ("result", "command_id")}[type(event)]
    payload = event.model_dump_json().encode()
    headers = published_headers(kind, str(getattr(event, key)).encode(), payload, b"e-9")
    published = {name: value.decode() for name, value in headers}
    assert len(published) == len(headers)  # no header twice
    schema = asyncapi["components"]["messages"][type(event).__name__]["headers"]
    Draft7Validator(schema).validate(published)
    assert set(published) == set(schema["required"])
    time_field = "processed_at" if kind == "result" else "occurred_at"
    assert published["ce_time"] == json.loads(payload)[time_field] == "2026-11-22T07:30:05.123456Z"


def test_asyncapi_follows_the_settings():
    names = SimpleNamespace(commands_topic="c", dlq_topic="d", results_topic="r", membership_topic="m",
                            segment_topic="s")
    assert {c["address"] for c in document(names)["channels"].values()} == {"c", "d", "r", "m", "s"}


def test_dead_letter_codes_are_those_the_worker_writes():
    bad = [b"not json", b"[1]", b'{"type": "Nope", "command_id": "x"}', b'{"type": "DeleteSegment"}',
           b'{"type": "DeleteSegment", "command_id": "x", "slug": "no spaces"}']
    codes = {decode(InboundRecord("t", 0, i, None, value)).error_code for i, value in enumerate(bad)}
    assert codes | {"UNPROCESSABLE"} == set(DLQ_ERROR_CODES)  # UNPROCESSABLE: tests/integration/test_batch.py
    assert (Path(__file__).parents[2] / "service" / "write" / "batch.py").read_text().count('"UNPROCESSABLE"') == 1


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_message_schemas_accept_real_messages(sample, asyncapi):
    name = type(sample).__name__
    wire = json.loads(sample.model_dump_json())
    schema = _load(DOCS / "schemas" / f"{name}.json")
    Draft202012Validator(schema).validate(wire)
    if isinstance(sample, COMMAND_MODELS):
        Draft202012Validator(_load(DOCS / "schemas" / "Command.json")).validate(wire)
    registry = Registry().with_resource("urn:asyncapi", DRAFT7.create_resource(asyncapi))
    payload_ref = asyncapi["components"]["messages"][name]["payload"]["$ref"]
    Draft7Validator({"$ref": f"urn:asyncapi{payload_ref}"}, registry=registry).validate(wire)
    assert not Draft202012Validator(schema).is_valid(wire | {"unexpected": 1})


def test_openapi_document_is_valid_openapi():
    doc = _load(DOCS / "openapi.json")
    assert doc == json.loads(json.dumps(openapi.document()))
    validate_openapi(doc)


def test_asyncapi_commands_may_carry_the_replayed_from_header_of_a_dlq_replay(asyncapi):
    from producers.dlq import REPLAYED_FROM

    for name in asyncapi["channels"]["commands"]["messages"]:
        headers = asyncapi["components"]["messages"][name]["headers"]
        assert REPLAYED_FROM in headers["properties"] and REPLAYED_FROM not in headers.get("required", [])
