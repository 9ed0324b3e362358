"""What is a command and what is a dead letter."""
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.commands import ExpireMembership, StartMembership
from schemas.common import SLUG_PATTERN
from service.write.decoding import InboundRecord, body_hash, decode


def rec(value: bytes) -> InboundRecord:
    return InboundRecord("t", 0, 7, b"k", value)


@pytest.mark.parametrize("value, code, command_id", [
    (b"\xff not json", "INVALID_JSON", None),
    (b"[1, 2]", "NOT_AN_OBJECT", None),
    (b'{"type": "Explode", "command_id": "x1"}', "UNKNOWN_TYPE", "x1"),
    (b'{"type": "DeleteSegment", "slug": "A"}', "MISSING_COMMAND_ID", None),
    (b'{"type": "DeleteSegment", "command_id": "x2", "slug": "bad slug!"}', "INVALID_FIELDS", "x2"),
    (b'{"type": "DeleteSegment", "command_id": "x3", "slug": "A", "extra": 1}', "INVALID_FIELDS", "x3"),
    (b'{"type": "UpdateUserSegments", "command_id": "x4", "user_id": 0}', "INVALID_FIELDS", "x4"),
    (b'{"type": "UpdateUserSegments", "command_id": "x5", "user_id": "12"}', "INVALID_FIELDS", "x5"),
])
def test_dead_letters_are_classified(value, code, command_id):
    d = decode(rec(value))
    assert d.command is None
    assert d.error_code == code
    assert d.command_id == command_id
    assert d.error_message


def test_a_command_decodes_once_with_a_hash_that_ignores_issued_at():
    body = {"type": "UpdateUserSegments", "command_id": "c", "user_id": 5, "add": ["A"]}
    a = decode(rec(json.dumps(body).encode()))
    b = decode(rec(json.dumps(body | {"issued_at": "2026-11-22T10:00:00Z"}).encode()))
    c = decode(rec(json.dumps(body | {"add": ["B"]}).encode()))
    assert a.command is not None and a.error_code is None
    assert a.body_hash == b.body_hash == body_hash(a.command)
    assert a.body_hash != c.body_hash


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from([ExpireMembership, StartMembership]),
       command_id=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                          max_size=128),  # a lone surrogate is no str pydantic takes (nor JSON text)
       user_id=st.integers(1, 2**63 - 1), slug=st.from_regex(SLUG_PATTERN, fullmatch=True),
       at=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                  timezone(timedelta(hours=-11))]),
                       min_value=datetime(1900, 1, 2), max_value=datetime(9999, 12, 30)))
def test_the_scheduler_commands_hand_written_body_hash_is_the_models(kind, command_id, user_id, slug, at):
    field = "expires_at" if kind is ExpireMembership else "starts_at"
    command = kind(command_id=command_id, user_id=user_id, slug=slug, issued_at=at, **{field: at})
    canonical = command.model_dump_json(exclude={"issued_at"}).encode()
    assert body_hash(command) == hashlib.sha256(canonical).hexdigest()
