"""Schemathesis (`--checks all`) against the live read API, tokens on: no failures."""
import asyncio
import re
import sys
from pathlib import Path

import pytest
from aiohttp import web

from schemas import openapi
from service.infra.settings import Settings
from service.read.api import create_app
from tests.support.batch import Feeder, create, update_user

TOKEN = "schemathesis-token"
# What the document cannot say, and so what a schema-valid request may still get:
# - `at` must not lie in the future (400); a random `after` was never sent (409); wait_ms is pinned to 0 so that
#   those 409s come at once instead of after the default 5 s;
# - a cursor is one the API gave (400 otherwise);
# - a report takes year and month or from and to, not both, not neither, and at most 120 months (400).
CONFIG = """
[[operations]]
include-operation-id = "getUserSegments"
parameters = { "query.wait_ms" = 0 }
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "409"]

[[operations]]
include-operation-id = "getSegmentMembers"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]

[[operations]]
include-operation-id-regex = "^getHistoryReport"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]
"""


@pytest.mark.timeout(900)
async def test_schemathesis_finds_nothing(conn, database_url, broker_bootstrap, tmp_path: Path, unused_tcp_port):
    f = Feeder(conn)
    await f.apply(create("AVITO_VOICE_MESSAGES", percent=30), update_user("c1", 1000, add=["AVITO_VOICE_MESSAGES"]))
    runner = web.AppRunner(create_app(Settings(database_url=database_url, kafka_bootstrap_servers=broker_bootstrap,
                                                  api_tokens=TOKEN)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
            f"http://127.0.0.1:{unused_tcp_port}/openapi.json", "--checks", "all", "--max-examples", "25",
            "--header", f"Authorization: Bearer {TOKEN}", "--no-color", "--workers", "2",
            "--generation-database", "none", "--request-timeout", "30",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path)
        out, _ = await asyncio.wait_for(proc.communicate(), 800)
    finally:
        await runner.cleanup()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-20000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", text)
    tested = re.search(r"Tested: (\d+)", text)
    assert selected and tested, text[-5000:]
    assert selected.group(1) == selected.group(2) == tested.group(1), text[-5000:]  # every operation exercised
    assert int(tested.group(1)) >= len(openapi.document()["paths"]) - 1  # (it leaves out its own /openapi.json)
