"""The `make run` stack as a user runs it: `segmentation dev`, a plain Kafka client, plain HTTP, the CLI."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.support.helpers import ROOT, wait_until


async def test_plain_kafka_client_and_http(dev):
    bootstrap, base = dev.kafka_bootstrap_servers, f"http://127.0.0.1:{dev.http_port}"
    events = AIOKafkaConsumer(dev.membership_topic, dev.results_topic, bootstrap_servers=bootstrap,
                              auto_offset_reset="earliest")
    await events.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    slug = f"E2E_{uuid.uuid4().hex[:6]}"
    commands = [
        (slug, {"type": "CreateSegment", "command_id": "e2e-create", "slug": slug}),
        ("2001", {"type": "UpdateUserSegments", "command_id": "e2e-add", "user_id": 2001, "add": [slug]}),
    ]
    received: list = []
    try:
        for key, body in commands:
            await producer.send_and_wait(dev.commands_topic, json.dumps(body).encode(), key=key.encode())

            async def result_of(command_id=body["command_id"]):
                batch = await events.getmany(timeout_ms=200)
                received.extend(json.loads(m.value) for ms in batch.values() for m in ms)
                return next((r for r in received if r.get("command_id") == command_id and "status" in r), None)

            result = await wait_until(result_of, timeout=60, message=body["command_id"])
            assert result["status"] == "applied", result
        async def added():
            batch = await events.getmany(timeout_ms=200)
            received.extend(json.loads(m.value) for ms in batch.values() for m in ms)
            return [e for e in received if e.get("type") == "MembershipChanged" and e["slug"] == slug]

        event = (await wait_until(added, timeout=30, message="the event"))[0]
        assert (event["change"], event["user_id"], event["reason"]) == ("added", 2001, "command")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/v1/users/2001/segments") as resp:
                body = await resp.json()
            assert [s["slug"] for s in body["segments"]] == [slug]
            async with http.get(f"{base}/api/v1/commands/e2e-add") as resp:
                assert (await resp.json())["status"] == "applied"
    finally:
        await producer.stop()
        await events.stop()


def cli(dev, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"KAFKA_BOOTSTRAP_SERVERS": dev.kafka_bootstrap_servers, "HTTP_PORT": str(dev.http_port)}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_send_waits_and_exits_non_zero_on_rejection(dev):
    slug = f"CLI_{uuid.uuid4().hex[:6]}"
    done = cli(dev, "send", "create-segment", slug, "--description", "from the CLI")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "applied"
    done = cli(dev, "send", "update-user", "3001", "--add", slug, "--add", "NO_SUCH_SEGMENT")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "SEGMENT_NOT_FOUND"
    done = cli(dev, "send", "raw", json.dumps({"type": "UpdateUserSegments", "user_id": 3001, "add": [slug]}))
    assert done.returncode == 0, done.stderr
    done = cli(dev, "report", time.strftime("%Y-%m", time.gmtime()), "--user", "3001")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "user_id;segment;operation;timestamp;reason"
    assert [line.split(";")[:3] for line in lines[1:]] == [["3001", slug, "added"]]


def _servers_on(port: int) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])]


def _postgres_under(folder: str) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [""])[0].endswith("/postgres") and folder in " ".join(p.info["cmdline"])]


@pytest.mark.parametrize("after, sig", [(0.5, signal.SIGTERM), (3.0, signal.SIGTERM), (3.0, signal.SIGINT)])
def test_sigterm_stops_every_server_it_started_even_during_start_up(after, sig, tmp_path):
    from service.dev.embedded import free_port

    port = free_port()
    env = os.environ | {"DEV_KAFKA_PORT": str(port), "HTTP_PORT": str(free_port()), "LOG_LEVEL": "WARNING",
                        "TMPDIR": str(tmp_path)}  # its PostgreSQL lives under tmp_path: we can tell it apart
    env.pop("DATABASE_URL", None)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    # Started as a background job of a non-interactive shell is: with SIGINT ignored.
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "dev"], env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 20
        while not (_servers_on(port) and _postgres_under(str(tmp_path))) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(after)
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:  # the signal under test did not stop it: SIGTERM does, servers included
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    time.sleep(0.5)
    assert _servers_on(port) == []
    assert _postgres_under(str(tmp_path)) == []


def test_cli_exit_codes_for_bad_input_and_no_broker():
    from service.dev.embedded import free_port

    env = os.environ | {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    bad = subprocess.run([sys.executable, "-m", "service.cli", "send", "update-user", "1", "--add", "A@soon"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "whole number of seconds" in bad.stderr
    down = subprocess.run([sys.executable, "-m", "service.cli", "send", "create-segment", "X"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert down.returncode == 3 and "cannot reach Kafka" in down.stderr
    watch = subprocess.run([sys.executable, "-m", "service.cli", "watch"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert watch.returncode == 3 and "cannot reach Kafka" in watch.stderr and "Traceback" not in watch.stderr
