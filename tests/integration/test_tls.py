"""The Kafka security settings against a broker reachable only over TLS (mutual: client certificates required).

The worker and the relay run as processes configured the way a user configures them, by environment variables
(KAFKA_SECURITY_PROTOCOL=SSL, KAFKA_SSL_CAFILE, KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE), and so does the client
library (`SegmentationClient()`, the CLI's): commands go in, their results and the MembershipChanged event come
out, all through the TLS port (the broker advertises it, so no connection bypasses it). A client that does not
trust the broker's CA, or that has no client certificate, fails at once with an error that says so.
"""
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError

from producers.client import SegmentationClient
from schemas import CreateSegment, UpdateUserSegments
from service.infra import kafka
from tests.support.harness import cid
from tests.support.helpers import ROOT, fast_settings, new_database, settings_env
from tests.support.tls import make_certificates, tls_broker


@pytest.fixture(scope="module")
def tls_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def tls(tls_folder):
    with tls_broker(tls_folder) as broker:
        yield broker


@pytest.fixture(scope="module")
def other_ca(tls_folder) -> Path:
    """A CA that signed nothing the broker has."""
    return make_certificates(tls_folder / "other").ca


def security(bootstrap, certs, **changes) -> dict:
    """The security settings a user sets, as Settings fields (children get them as KAFKA_* variables)."""
    return dict(kafka_bootstrap_servers=bootstrap, kafka_security_protocol="SSL", kafka_ssl_cafile=str(certs.ca),
                kafka_ssl_certfile=str(certs.client_cert), kafka_ssl_keyfile=str(certs.client_key)) | changes


def start(name: str, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", name], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


async def test_worker_relay_and_client_over_tls_only(tls, tls_folder, pg_admin_url, template_db, monkeypatch):
    bootstrap, certs = tls
    settings = fast_settings(await new_database(pg_admin_url), bootstrap, **security(bootstrap, certs))
    env = settings_env(settings)
    assert (env["KAFKA_SECURITY_PROTOCOL"], env["KAFKA_SSL_CAFILE"]) == ("SSL", str(certs.ca))
    for name in (n.upper() for n in settings.model_dump()):  # the client reads them as a user's program does
        if name in env:
            monkeypatch.setenv(name, env[name])
        else:
            monkeypatch.delenv(name, raising=False)
    await kafka.create_topics(settings)  # the admin client over TLS
    procs = [start(name, env, tls_folder / f"{name}.log") for name in ("worker", "relay")]
    try:
        async with SegmentationClient() as client, client.subscribe(["membership"]) as events:
            assert client.settings.kafka_ssl_certfile == str(certs.client_cert)
            slug = f"TLS_{cid()[:8]}"
            created = await client.request(CreateSegment(command_id=cid(), slug=slug), timeout=60)
            assert created.status == "applied"
            added = await client.request(UpdateUserSegments(command_id=cid(), user_id=4343, add=[slug]))
            assert added.status == "applied" and added.events == 1
            event = await asyncio.wait_for(anext(events), 30)
            assert (event.user_id, event.slug, event.change) == (4343, slug, "added")
        assert all(p.poll() is None for p in procs), "a process exited"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
    for name in ("worker", "relay"):
        assert "Traceback" not in (tls_folder / f"{name}.log").read_text(), name


async def _refused(settings) -> str:
    started = time.monotonic()
    with pytest.raises(KafkaConnectionError) as refused:
        async with SegmentationClient(settings):
            pass
    assert time.monotonic() - started < 10
    return str(refused.value)


async def test_a_client_that_does_not_trust_the_ca_is_refused_and_told_why(tls, other_ca, database_url):
    bootstrap, certs = tls
    settings = fast_settings(database_url, bootstrap, **security(bootstrap, certs, kafka_ssl_cafile=str(other_ca)))
    message = await _refused(settings)
    assert "certificate verify failed" in message and bootstrap in message, message


async def test_a_client_without_a_certificate_is_refused_and_told_why(tls, database_url):
    bootstrap, certs = tls
    settings = fast_settings(database_url, bootstrap, **security(bootstrap, certs, kafka_ssl_certfile=None,
                                                                 kafka_ssl_keyfile=None))
    message = await _refused(settings)
    assert "certificate required" in message and bootstrap in message, message


async def test_the_cli_says_why_it_cannot_connect(tls, other_ca, database_url):
    bootstrap, certs = tls
    settings = fast_settings(database_url, bootstrap, **security(bootstrap, certs, kafka_ssl_cafile=str(other_ca)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "send", "create-segment", "NEVER", env=settings_env(settings), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 3
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith(f"cannot reach Kafka at {bootstrap}") and "certificate verify failed" in last, last
