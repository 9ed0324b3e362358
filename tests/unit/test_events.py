"""The hand-written JSON of the hot paths (events, results, a user's segments) is exactly what the models write."""
import json
from datetime import UTC, datetime, timedelta

from schemas.events import MembershipChanged
from schemas.http import UserSegment, UserSegments
from schemas.results import CommandResult
from service.domain import Change, Segment
from service.read.api import user_segments_body
from service.write.outbox import membership_event, published_headers, result_payload

NOW = datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC)


def test_membership_event_matches_the_model():
    seg = Segment(1, "AVITO_VOICE_MESSAGES", "AVITO_VOICE_MESSAGES:1")
    for change in (Change("added", 1000, seg, "command", NOW + timedelta(hours=1), NOW),
                   Change("removed", 2**63 - 1, seg, "expired", None, NOW.replace(microsecond=0))):
        for command_id in ("c-1", None):
            row = membership_event(change, command_id)
            model = MembershipChanged.model_validate_json(row.payload)
            assert row.payload.decode() == model.model_dump_json()
            assert row.event_id == model.event_id and row.key == str(change.user_id).encode()
            assert json.loads(row.payload)["expires_at"] == (
                None if change.expires_at is None else change.expires_at.isoformat().replace("+00:00", "Z"))


def test_applied_result_matches_the_model():
    for when in (NOW, NOW.replace(microsecond=0)):
        payload = result_payload("c-é", "UpdateUserSegments", 2, when)
        model = CommandResult(command_id="c-é", type="UpdateUserSegments", status="applied", error=None, events=2,
                              processed_at=when)
        assert payload == model.model_dump_json()


def test_user_segments_answer_matches_the_model():
    rows = [{"slug": "A", "added_at": NOW, "expires_at": None, "source": "manual"},
            {"slug": "B_é", "added_at": NOW.replace(microsecond=0), "expires_at": NOW + timedelta(days=1),
             "source": "auto_percent"}]
    for segments in (rows, []):
        model = UserSegments(user_id=2**63 - 1, segments=[UserSegment(**r) for r in segments])
        assert user_segments_body(2**63 - 1, segments).decode() == model.model_dump_json()


def test_a_segment_changed_has_the_layer_fields_only_in_a_layer_and_null_buckets_before_a_percent():
    from decimal import Decimal

    from schemas.events import SegmentChanged

    common = {"event_id": "e-1", "change": "created", "slug": "A", "description": None, "occurred_at": NOW,
              "command_id": "c-1"}
    outside = json.loads(SegmentChanged(auto_percent=Decimal(5), **common).model_dump_json())
    assert not {"layer", "bucket_start", "bucket_end"} & outside.keys()
    at_zero = json.loads(SegmentChanged(auto_percent=Decimal(0), layer="L", **common).model_dump_json())
    assert (at_zero["layer"], at_zero["bucket_start"], at_zero["bucket_end"]) == ("L", None, None)


def test_the_cloudevents_time_is_the_payloads_own_however_the_json_is_spaced_and_whatever_strings_it_holds():
    from decimal import Decimal

    from schemas.events import SegmentChanged

    decoy = '"occurred_at":"1999-01-01T00:00:00Z"'
    event = SegmentChanged(event_id="e-1", change="created", slug="A", description=decoy, auto_percent=Decimal(5),
                           occurred_at=NOW, command_id="occurred_at", layer="occurred_at")
    written_by_sql = (b'{"event_id" : "e-2", "type" : "MembershipChanged", "change" : "added", "user_id" : 7, '
                      b'"slug" : "A", "reason" : "auto_percent", "expires_at" : null, '
                      b'"occurred_at" : "2026-11-22T12:00:00Z", "command_id" : "occurred_at"}')
    for kind, payload, time in (("segment", event.model_dump_json().encode(), "2026-11-22T12:00:00.123456Z"),
                                ("membership", written_by_sql, "2026-11-22T12:00:00Z")):
        headers = dict(published_headers(kind, b"k", payload, b"e"))
        assert headers["ce_time"].decode() == time == json.loads(payload)["occurred_at"]


def test_dead_letters_are_not_cloudevents():
    assert published_headers("dlq", b"k", b"not json", b"d-1") == [("event_id", b"d-1")]


def test_ce_time_is_found_in_any_spelling_of_the_time_key():
    """A result stored as jsonb text (before migration 002) spells `"processed_at": "`: still its ce_time."""
    payload = b'{"command_id": "c-1", "status": "applied", "processed_at": "2026-01-01T00:00:00Z"}'
    assert dict(published_headers("result", b"c-1", payload, b"e"))["ce_time"] == b"2026-01-01T00:00:00Z"


def test_counters_that_alerts_take_increase_of_exist_at_zero_before_their_first_event():
    from prometheus_client import REGISTRY

    import consumers.worker  # noqa: F401  (the processes that count them make their series)
    import producers.relay  # noqa: F401

    for reason in ("beyond_log_end", "before_log_start"):
        assert REGISTRY.get_sample_value("segmentation_offset_resets_total", {"reason": reason}) is not None
    for kind in ("membership", "segment", "result", "dlq"):
        assert REGISTRY.get_sample_value("segmentation_outbox_refused_total", {"kind": kind}) is not None



def test_the_schedulers_commands_match_their_models():
    from producers.ttl import ENDS
    from service.write.decoding import DUE_FIELD

    for end in ENDS:
        for at in (NOW, NOW.replace(microsecond=0)):
            row = {"user_id": 2**63 - 1, "slug": "AVITO_VOICE_MESSAGES", "at": at}
            payload = end.payload("expire:1:ab", row, NOW)
            model = end.command(command_id="expire:1:ab", user_id=row["user_id"], slug=row["slug"],
                                issued_at=NOW, **{DUE_FIELD[end.command.__name__]: at})
            assert payload.decode() == model.model_dump_json()
