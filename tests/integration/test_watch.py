"""`segmentation watch` through the command line against the real broker: filters, the start, each event once."""
import asyncio
import json
import sys
from datetime import UTC, datetime

from typer.testing import CliRunner

from schemas import CommandResult, MembershipChanged, SegmentChanged
from service.cli.main import app
from service.infra import kafka
from tests.support.helpers import ROOT, settings_env

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def membership(event_id: str, user_id: int, slug: str, change: str = "added") -> MembershipChanged:
    return MembershipChanged(event_id=event_id, change=change, user_id=user_id, slug=slug, reason="command",
                             expires_at=None, occurred_at=NOW, command_id=None)


async def publish(settings, *messages) -> None:
    topics = {MembershipChanged: settings.membership_topic, SegmentChanged: settings.segment_topic,
              CommandResult: settings.results_topic}
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for m in messages:
            key = str(getattr(m, "user_id", None) or getattr(m, "slug", None) or m.command_id).encode()
            await producer.send_and_wait(topics[type(m)], m.model_dump_json().encode(), key=key)
    finally:
        await producer.stop()


async def watch(settings, *args: str, started: asyncio.Event | None = None) -> list[dict]:
    """The values `watch` prints (it must stop by itself: give --limit)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "watch", *args, env=settings_env(settings), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    err = b""
    while b"watching" not in err and (line := await asyncio.wait_for(proc.stderr.readline(), 60)):
        err += line
    if started is not None:
        started.set()
    out, rest = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (err + rest).decode()
    return [json.loads(line)["value"] for line in out.decode().splitlines()]


async def test_watch_filters_by_user_slug_type_and_change_and_prints_each_event_once(settings):
    a, b = "WATCH_A", "WATCH_B"
    created = SegmentChanged(event_id="s1", change="created", slug=a, description=None, auto_percent=0,
                             occurred_at=NOW, command_id="c1")
    result = CommandResult(command_id="c1", type="CreateSegment", status="applied", error=None, events=0,
                           processed_at=NOW)
    first = membership("e1", 11, a)
    await publish(settings, first, first, membership("e2", 11, b, "removed"), membership("e3", 12, a),
                  membership("e0", 13, a), created, result)  # e1 twice: a relay publishing it again
    started = asyncio.Event()

    async def later() -> None:
        await started.wait()
        await publish(settings, membership("e4", 13, b))

    by_user, segment, added_to_a, results, from_end, _ = await asyncio.gather(
        watch(settings, "--from-beginning", "--user", "11", "--limit", "2"),
        watch(settings, "--from-beginning", "--slug", a, "--type", "SegmentChanged", "--limit", "1"),
        watch(settings, "--from-beginning", "--slug", a, "--change", "added", "--limit", "3"),
        watch(settings, "--from-beginning", "--type", "CreateSegment", "--limit", "1"),
        watch(settings, "--user", "13", "--limit", "1", started=started),
        later())
    assert [v["event_id"] for v in by_user] == ["e1", "e2"]  # in order, the duplicate left out
    assert segment == [created.model_dump(mode="json")]
    assert sorted(v["event_id"] for v in added_to_a) == ["e0", "e1", "e3"]
    assert results == [result.model_dump(mode="json")]
    assert [v["event_id"] for v in from_end] == ["e4"]  # not e0: it was there before watch started


def test_watch_refuses_filters_that_nothing_can_match():
    runner = CliRunner()
    for args, message in ((["--topic", "dlq", "--user", "1"], "can match"), (["--type", "Added"], "unknown --type"),
                          (["--change", "gone"], "unknown --change"), (["--topic", "events"], "unknown topic")):
        done = runner.invoke(app, ["watch", *args])
        assert done.exit_code == 2 and message in done.output, (args, done.output)
