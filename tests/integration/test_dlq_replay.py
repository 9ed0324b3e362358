"""Dead letters replayed: original key and bytes to their source topic, once, up to the end seen at the start."""
import asyncio
import json
import sys
import time

import pytest

from producers import dlq
from schemas import CreateSegment, UpdateUserSegments
from service.infra import kafka
from service.write import batch, decoding
from tests.support.harness import Stack, cid, read_all
from tests.support.helpers import ROOT, settings_env, wait_until

N = 500


def older_worker_decode(record):
    """A worker from before UpdateUserSegments existed: such commands are dead letters (UNKNOWN_TYPE)."""
    d = decoding.decode(record)
    if isinstance(d.command, UpdateUserSegments):
        return decoding.Decoded(record, None, d.command_id, d.body_hash, "UNKNOWN_TYPE", "unknown command type",
                                d.type)
    return d


async def dead_letters(stack: Stack) -> list:
    return stack.collector.messages[stack.settings.dlq_topic]


async def test_a_replay_of_1000_letters_applies_the_500_now_valid_and_does_not_loop(settings, monkeypatch):
    async with Stack(settings) as stack:
        seg = f"REPLAY_{cid()[:8]}"
        assert (await stack.request(CreateSegment(command_id=cid(), slug=seg))).status == "applied"
        monkeypatch.setattr(batch, "decode", older_worker_decode)
        commands = [UpdateUserSegments(command_id=f"replay-{i}", user_id=i, add=[seg]) for i in range(1, N + 1)]
        for i, c in enumerate(commands, 1):
            await stack.client.producer.send(settings.commands_topic, c.model_dump_json().encode(), key=str(i).encode())
            await stack.client.producer.send(settings.commands_topic, b"not json %d" % i, key=str(i).encode())
        await stack.client.producer.flush()
        await wait_until(lambda: _count(dead_letters(stack), 2 * N), 60, message="1000 dead letters")

        async def every_result():  # another topic: it may arrive a moment after the dead letters
            results = stack.collector.results()
            return results if all(results.get(c.command_id) for c in commands) else None

        rejected = await wait_until(every_result, 30, message="the 500 rejected results")
        assert all(rejected[c.command_id][0]["status"] == "rejected" for c in commands)

        monkeypatch.setattr(batch, "decode", decoding.decode)  # the fix is deployed
        report = await dlq.replay(settings)
        assert (report.sent, report.truncated) == (2 * N, 0)

        async def members() -> int:
            return (await stack.query(
                "SELECT count(*) FROM memberships m JOIN segments s ON s.id = m.segment_id WHERE s.slug = $1",
                seg))[0][0]
        await wait_until(lambda: _equal(members(), N), 60, message="the 500 replayed commands applied")

        async def all_applied() -> bool:
            results = stack.collector.results()
            return all(results[c.command_id][-1]["status"] == "applied" for c in commands)
        await wait_until(all_applied, 60, message="an applied result for each replayed command")
        # The 500 still broken are dead letters again, once: the replay stopped at the end it saw at its start.
        await wait_until(lambda: _count(dead_letters(stack), 3 * N), 60, message="500 dead letters again")
        await asyncio.sleep(2)
        assert len(await dead_letters(stack)) == 3 * N

    replayed = [r for r in await read_all(settings, settings.commands_topic) if r.headers]
    assert len(replayed) == 2 * N
    positions = {dict(r.headers)[dlq.REPLAYED_FROM].decode() for r in replayed}
    assert positions == {f"{settings.dlq_topic}/0@{o}" for o in range(2 * N)}
    for r in replayed:  # the original key and bytes
        value = r.value.decode()
        expected_key = value.split()[-1] if value.startswith("not json") else str(json.loads(value)["user_id"])
        assert r.key.decode() == expected_key

@pytest.mark.parametrize("skew", [8, -8], ids=["cli-clock-ahead", "cli-clock-behind"])
async def test_a_replay_sends_each_letter_once_whatever_the_clock_of_the_cli(settings, monkeypatch, skew):
    async with Stack(settings) as stack:
        for i in range(3):  # one batch: Tansu's end offset is its base offset plus one
            await stack.client.producer.send(settings.commands_topic, b"still broken %d" % i, key=b"1")
        await stack.client.producer.flush()
        await wait_until(lambda: _count(dead_letters(stack), 3), 60, message="the dead letters")
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + skew)  # the operator's laptop is off by 8 s
        report = await asyncio.wait_for(dlq.replay(settings), 60)
        await wait_until(lambda: _count(dead_letters(stack), 6), 60, message="the replayed letters dead again")
        await asyncio.sleep(3)
        assert (report.sent, len(await dead_letters(stack))) == (3, 6)


async def _count(messages, n: int) -> bool:
    return len(await messages) >= n


async def _equal(value, n: int) -> bool:
    return await value == n


async def test_dlq_list_and_a_dry_run_show_truncated_letters_and_send_nothing(settings):
    producer = kafka.producer(settings)
    await producer.start()
    try:
        base = [("source.topic", settings.commands_topic.encode()), ("error.message", b"why")]
        await producer.send_and_wait(settings.dlq_topic, b"x" * 10, key=b"7",
                                     headers=[("error.code", b"INVALID_JSON"), *base])
        await producer.send_and_wait(settings.dlq_topic, b"{}", key=b"8",
                                     headers=[("error.code", b"UNKNOWN_TYPE"), *base])
        await producer.send_and_wait(settings.dlq_topic, b"y" * 10, key=b"9",
                                     headers=[("error.code", b"INVALID_JSON"), ("error.truncated", b"2000000"), *base])
    finally:
        await producer.stop()

    async def cli(*args: str) -> tuple[int, list[str], str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "dlq", *args, env=settings_env(settings), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode().splitlines(), err.decode()

    code, lines, _ = await cli("list", "--code", "INVALID_JSON")
    listed = [json.loads(line) for line in lines]
    assert code == 0 and [(x["position"], x["key"], x["truncated"]) for x in listed] == [
        (f"{settings.dlq_topic}/0@0", "7", False), (f"{settings.dlq_topic}/0@2", "9", True)]
    assert listed[0]["message"] == "why" and listed[0]["value"] == "x" * 10
    code, lines, _ = await cli("list", "--limit", "1")
    assert code == 0 and len(lines) == 1
    code, lines, _ = await cli("replay", "--dry-run")
    assert code == 0 and lines[-1] == "would replay 2 dead letters; 1 truncated (not replayed)"
    assert [json.loads(line)["action"] for line in lines[:-1]] == ["would replay", "would replay",
                                                                  "skipped (truncated)"]
    assert await read_all(settings, settings.commands_topic) == []

