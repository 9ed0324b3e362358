"""The client library (`producers.client`) against the real broker and a running worker and relay."""
import asyncio
import json
import uuid

import pytest

from producers.client import InvalidMessageError, ResultTimeoutError, SegmentationClient
from schemas import CommandResult, CreateSegment, MembershipChanged, SegmentChanged, UpdateUserSegments
from service.infra import kafka
from tests.support.harness import Stack, cid
from tests.support.helpers import fast_settings, new_database


@pytest.fixture(scope="module")
async def stack(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    async with Stack(settings) as s:
        yield s


async def test_send_with_wait_returns_the_typed_result_and_a_rejection_is_a_result_too(stack):
    slug = f"CL_{uuid.uuid4().hex[:6]}"
    async with SegmentationClient(stack.settings) as client:
        created = await client.send(CreateSegment(command_id=cid(), slug=slug), wait=True, timeout=30)
        assert isinstance(created, CommandResult) and (created.status, created.type) == ("applied", "CreateSegment")
        as_dict = {"type": "UpdateUserSegments", "command_id": cid(), "user_id": 7001, "add": [slug, "NO_SUCH"]}
        rejected = await client.request(as_dict, timeout=30)
        assert rejected.status == "rejected" and rejected.error is not None
        assert (rejected.error.code, rejected.error.details) == ("SEGMENT_NOT_FOUND", {"slugs": ["NO_SUCH"]})
        assert await client.send(UpdateUserSegments(command_id=cid(), user_id=7001, add=[slug])) is None
        assert client.pending == {}


async def test_request_without_a_worker_times_out_with_a_clear_error(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)  # topics nobody serves
    await kafka.create_topics(settings)
    command = CreateSegment(command_id=cid(), slug="NOBODY_LISTENS")
    async with SegmentationClient(settings) as client:
        with pytest.raises(ResultTimeoutError, match=f"no result for {command.command_id} within 1.0 s") as caught:
            await client.request(command, timeout=1.0)
        assert isinstance(caught.value, TimeoutError) and caught.value.command_id == command.command_id
        assert client.pending == {}  # nothing left waiting
        waiting = asyncio.create_task(client.request(CreateSegment(command_id=cid(), slug="NOBODY"), timeout=30))
        await asyncio.sleep(0.5)
        waiting.cancel()  # a caller's own deadline, or its task cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert client.pending == {}  # a cancelled request leaves nothing behind either
        closing = asyncio.create_task(client.request(CreateSegment(command_id=cid(), slug="NOBODY"), timeout=30))
        await asyncio.sleep(0.5)
    with pytest.raises(ConnectionError, match="closed"):  # closing the client ends its requests at once
        await asyncio.wait_for(closing, 5)


async def test_subscribe_yields_typed_events_once_each_from_the_end_or_the_beginning(stack):
    s, slug = stack.settings, f"SUB_{uuid.uuid4().hex[:6]}"
    async with SegmentationClient(s) as client, client.subscribe() as events:
        await client.request(CreateSegment(command_id=cid(), slug=slug))
        await client.request(UpdateUserSegments(command_id=cid(), user_id=7002, add=[slug]))
        got = await _of(events, slug, 2)
        assert {type(e) for e in got} == {MembershipChanged, SegmentChanged}
        added = next(e for e in got if isinstance(e, MembershipChanged))
        assert (added.change, added.user_id, added.slug, added.reason) == ("added", 7002, slug, "command")
        record = events.record
        assert record is not None and events.position == f"{record.topic}/{record.partition}@{record.offset}"
        # The relay publishing the event again (at least once), then a later event with a field this version of
        # the schemas does not know yet, in the same partition: the duplicate is skipped, the new field ignored.
        producer = kafka.producer(s)
        await producer.start()
        try:
            duplicate = added.model_dump_json().encode()
            later = json.dumps(json.loads(duplicate) | {"event_id": cid(), "change": "removed", "future": 1}).encode()
            for value in (duplicate, b"not an event", later):
                await producer.send_and_wait(s.membership_topic, value, key=b"7002")
        finally:
            await producer.stop()
        with pytest.raises(InvalidMessageError, match="not a valid MembershipChanged"):
            await asyncio.wait_for(anext(events), 30)
        [removed] = await _of(events, slug, 1)  # the duplicate was skipped; the iterator goes on
        assert isinstance(removed, MembershipChanged) and (removed.change, removed.slug) == ("removed", slug)
    async with SegmentationClient(s) as client, client.subscribe(["membership"], from_beginning=True) as events:
        ours = await _of(events, slug, 2, skip_invalid=True)
        assert [(e.event_id, e.change) for e in ours] == [(added.event_id, "added"), (removed.event_id, "removed")]


async def _of(events, slug: str, n: int, skip_invalid: bool = False) -> list:
    """The next `n` events of `slug` (others, e.g. of the module's other tests, are passed over)."""
    ours: list = []
    while len(ours) < n:
        try:
            event = await asyncio.wait_for(anext(events), 30)
        except InvalidMessageError:
            if not skip_invalid:
                raise
            continue
        if getattr(event, "slug", None) == slug:
            ours.append(event)
    return ours
