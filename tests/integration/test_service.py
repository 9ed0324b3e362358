"""Commands in through a real broker, rows in PostgreSQL, events out, answers over HTTP."""
import asyncio
import uuid
from datetime import datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event

from schemas import CreateSegment, DeleteSegment, UpdateUserSegments
from service.read.api import create_app
from tests.support.harness import Stack, cid
from tests.support.helpers import fast_settings, new_database, wait_until


@pytest.fixture(scope="module")
async def stack(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    async with Stack(settings, ttl=True) as s:
        yield s


@pytest.fixture(scope="module")
async def http(stack):
    client = TestClient(TestServer(create_app(stack.settings)))
    await client.start_server()
    yield client
    await client.close()


def slug(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:6]}"


async def test_the_assignment_scenario(stack, http):
    voice, vas, d30, d50 = (slug(n) for n in ("AVITO_VOICE_MESSAGES", "AVITO_PERFORMANCE_VAS",
                                                "AVITO_DISCOUNT_30", "AVITO_DISCOUNT_50"))
    for s in (voice, vas, d30, d50):
        assert (await stack.request(CreateSegment(command_id=cid(), slug=s))).status == "applied"
    r = await stack.request(UpdateUserSegments(command_id=cid(), user_id=1000, add=[voice, vas, d30]))
    assert r.status == "applied" and r.events == 3
    await stack.request(UpdateUserSegments(command_id=cid(), user_id=1002, add=[voice, d50]))
    await stack.request(UpdateUserSegments(command_id=cid(), user_id=1004, add=[d30]))
    await stack.request(UpdateUserSegments(command_id=cid(), user_id=1004, remove=[d30]))

    async def slugs(user: int) -> list[str]:
        resp = await http.get(f"/api/v1/users/{user}/segments")
        assert resp.status == 200
        body = await resp.json()
        assert body["user_id"] == user
        return [s["slug"] for s in body["segments"] if s["slug"] in (voice, vas, d30, d50)]

    assert await slugs(1000) == sorted([voice, vas, d30])
    assert await slugs(1002) == sorted([voice, d50])
    assert await slugs(1004) == []
    resp = await http.get(f"/api/v1/segments/{voice}")
    assert (await resp.json())["member_count"] == 2
    events = await wait_until(lambda: _events_for(stack, [1000, 1002, 1004], 7), message="seven events")
    assert [(e["change"], e["slug"]) for e in events if e["user_id"] == 1004] == [("added", d30), ("removed", d30)]


async def _events_for(stack, users, count):
    events = [e for e in stack.collector.membership_events() if e["user_id"] in users]
    return events if len(events) >= count else None


async def test_every_event_carries_its_id_in_a_header(stack):
    s = slug("HDR")
    await stack.request(CreateSegment(command_id=cid(), slug=s))
    await stack.request(UpdateUserSegments(command_id=cid(), user_id=77, add=[s]))
    msgs = await wait_until(lambda: _messages(stack, stack.settings.membership_topic, lambda v: v["slug"] == s),
                            message="the event")
    msg, value = msgs[0]
    assert dict(msg.headers)["event_id"].decode() == value["event_id"]
    assert msg.key == b"77"


async def test_events_and_results_carry_cloudevents_headers_that_the_cloudevents_sdk_reads(stack):
    s = slug("CE")
    created, added, rejected = cid(), cid(), cid()
    await stack.request(CreateSegment(command_id=created, slug=s))
    await stack.request(UpdateUserSegments(command_id=added, user_id=78, add=[s]))
    await stack.request(CreateSegment(command_id=rejected, slug=s))  # SEGMENT_EXISTS: a result the model writes
    await stack.request(DeleteSegment(command_id=cid(), slug=s))  # its members' events are written by SQL
    settings = stack.settings
    wanted = [  # (topic, which message, CloudEvents type, subject, time field)
        (settings.segment_topic, lambda v: v["slug"] == s, "segmentation.segment-changed.v1", s, "occurred_at"),
        *[(settings.membership_topic, lambda v, c=change: (v["slug"], v["change"]) == (s, c),
           "segmentation.membership-changed.v1", "78", "occurred_at") for change in ("added", "removed")],
        *[(settings.results_topic, lambda v, c=command: v["command_id"] == c, "segmentation.command-result.v1",
           command, "processed_at") for command in (created, added, rejected)],
    ]
    for topic, which, ce_type, subject, time_field in wanted:
        msg, value = (await wait_until(lambda t=topic, w=which: _messages(stack, t, w), message=ce_type))[0]
        headers = dict(msg.headers)
        event = from_binary_event(KafkaMessage(headers=headers, key=msg.key, value=msg.value))
        assert event.get_specversion() == "1.0" and event.get_source() == "segmentation"
        assert event.get_id() == headers["event_id"].decode() == value.get("event_id", event.get_id())
        assert event.get_type() == ce_type and event.get_subject() == subject
        assert event.get_time() == datetime.fromisoformat(value[time_field])
        assert headers["ce_time"].decode() == value[time_field]  # the payload's own text
        assert event.get_datacontenttype() == "application/json" and event.get_data() == value  # value unchanged


async def _messages(stack, topic, pred):
    found = [(m, v) for m, v in stack.collector.messages[topic] if isinstance(v, dict) and pred(v)]
    return found or None


async def test_poison_messages_then_a_good_command_on_the_same_partition(stack):
    s = slug("POISON")
    await stack.request(CreateSegment(command_id=cid(), slug=s))
    bad_id, good_id = cid(), cid()
    for value in (b"\x00not json", b"[]", b'{"type": "Nope", "command_id": "%s"}' % bad_id.encode(),
                  b'{"type": "UpdateUserSegments", "command_id": "x", "user_id": -5}'):
        await stack.send_raw(value, key=b"4242")
    result = await stack.request(UpdateUserSegments(command_id=good_id, user_id=4242, add=[s]))
    assert result.status == "applied"
    dlq = await wait_until(lambda: _dlq(stack), message="four dead letters")
    assert [m.value for m in dlq][:2] == [b"\x00not json", b"[]"]
    headers = dict(dlq[0].headers)
    assert set(headers) >= {"error.code", "error.message", "source.topic", "source.partition", "source.offset"}
    assert headers["source.topic"].decode() == stack.settings.commands_topic
    assert not [name for name in headers if name.startswith("ce_")]  # not an event: no CloudEvents headers
    assert all(m.key == b"4242" for m in dlq)
    rejected = await wait_until(lambda: _result(stack, bad_id), message="the rejected result")
    assert rejected["status"] == "rejected" and rejected["error"]["code"] == "INVALID_COMMAND"


async def _dlq(stack):
    msgs = [m for m, _ in stack.collector.messages[stack.settings.dlq_topic]]
    return msgs if len(msgs) >= 4 else None


async def _result(stack, command_id):
    return (stack.collector.results().get(command_id) or [None])[-1]


async def test_rejections_duplicates_and_conflicts_over_kafka(stack, http):
    s = slug("IDEM")
    await stack.request(CreateSegment(command_id=cid(), slug=s))
    exists = await stack.request(CreateSegment(command_id=cid(), slug=s))
    assert exists.error.code == "SEGMENT_EXISTS"
    command = UpdateUserSegments(command_id=cid(), user_id=555, add=[s])
    first = await stack.request(command)
    again = await stack.request(command)
    assert again == first
    conflict = await stack.request(UpdateUserSegments(command_id=command.command_id, user_id=555, remove=[s]))
    assert conflict.error.code == "IDEMPOTENCY_CONFLICT"
    resp = await http.get(f"/api/v1/commands/{command.command_id}")
    assert resp.status == 200 and await resp.json() == first.model_dump(mode="json")
    await wait_until(lambda: _messages(stack, stack.settings.membership_topic, lambda v: v["slug"] == s),
                     message="the one event")
    await asyncio.sleep(0.5)  # a second event, if the duplicate had made one, would be out by now
    assert len([e for e in stack.collector.membership_events() if e["slug"] == s]) == 1
    rows = await stack.query("SELECT count(*) AS n FROM membership_history WHERE user_id = 555 AND slug = $1", s)
    assert rows[0]["n"] == 1


async def test_http_errors(http):
    for path in ("/api/v1/users/abc/segments", "/api/v1/users/0/segments", "/api/v1/users/99999999999999999999/segments",
                 "/api/v1/segments/bad%20slug", "/api/v1/segments?include_deleted=maybe",
                 "/api/v1/reports/history?year=2026&month=13", "/api/v1/reports/history.csv?year=x&month=1",
                 "/api/v1/reports/history.csv?month=1", "/api/v1/commands/x%00y"):
        resp = await http.get(path)
        assert resp.status == 400, path
        body = await resp.json()
        assert set(body["error"]) == {"code", "message"}
    for path in ("/api/v1/segments/NEVER_EXISTED", "/api/v1/commands/unknown-id", "/api/v1/nothing"):
        resp = await http.get(path)
        assert resp.status == 404, path
        assert "error" in await resp.json()
    assert (await http.post("/api/v1/segments")).status == 405


async def test_deleted_segments_and_health(stack, http):
    s = slug("GONE")
    await stack.request(CreateSegment(command_id=cid(), slug=s, description="temporary"))
    await stack.request(UpdateUserSegments(command_id=cid(), user_id=31, add=[s]))
    await stack.request(DeleteSegment(command_id=cid(), slug=s))
    listed = await (await http.get("/api/v1/segments")).json()
    assert s not in [x["slug"] for x in listed["segments"]]
    listed = await (await http.get("/api/v1/segments?include_deleted=true")).json()
    gone = next(x for x in listed["segments"] if x["slug"] == s)
    assert gone["deleted_at"] is not None and gone["member_count"] == 0 and gone["description"] == "temporary"
    assert (await http.get(f"/api/v1/segments/{s}")).status == 200
    mine = (await (await http.get("/api/v1/users/31/segments")).json())["segments"]
    assert s not in [x["slug"] for x in mine]
    assert (await http.get("/healthz")).status == 200
    assert (await http.get("/readyz")).status == 200


async def test_membership_expires_end_to_end(stack, http):
    s = slug("TTL")
    await stack.request(CreateSegment(command_id=cid(), slug=s))
    added = await stack.request(UpdateUserSegments(command_id=cid(), user_id=808, add=[{"slug": s, "ttl_seconds": 4}]))
    assert added.status == "applied"
    body = await (await http.get("/api/v1/users/808/segments")).json()
    assert [x["slug"] for x in body["segments"]] == [s]
    event = await wait_until(lambda: _removed(stack, 808, s), timeout=15, message="the expiry event")
    assert event["reason"] == "expired"
    await asyncio.sleep(0)
    body = await (await http.get("/api/v1/users/808/segments")).json()
    assert body["segments"] == []


async def _removed(stack, user, s):
    found = [e for e in stack.collector.membership_events()
             if e["user_id"] == user and e["slug"] == s and e["change"] == "removed"]
    return found[0] if found else None


async def test_readyz_is_503_while_kafka_is_unreachable(stack):
    from service.dev.embedded import free_port

    settings = stack.settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"] == {"postgres": "ok", "kafka": "unreachable"}
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_the_api_serves_its_documents(stack, http):
    openapi = await (await http.get("/openapi.json")).json()
    assert openapi["openapi"].startswith("3.1") and "/api/v1/users/{user_id}/segments" in openapi["paths"]
    asyncapi = await (await http.get("/asyncapi.json")).json()
    assert asyncapi["asyncapi"] == "3.0.0"
    assert stack.settings.commands_topic in {c["address"] for c in asyncapi["channels"].values()}
    docs = await http.get("/docs")
    assert docs.status == 200 and "swagger-ui" in await docs.text()
