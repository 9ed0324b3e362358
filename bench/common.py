"""Shared bench plumbing: start the dev stack (`segmentation dev`) on free ports and talk to it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.embedded import free_port, wait_port  # noqa: E402
from service.settings import Settings  # noqa: E402


@contextmanager
def dev_stack(workers: int = 1, extra_env: dict | None = None):
    """Run `segmentation dev` with its own ports; yield Settings pointing at it."""
    kafka_port, http_port = free_port(), free_port()
    env = os.environ | {"DEV_KAFKA_PORT": str(kafka_port), "HTTP_PORT": str(http_port), "LOG_LEVEL": "WARNING"}
    env.pop("DATABASE_URL", None)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env |= extra_env or {}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "dev", "--workers", str(workers)], env=env,
                            start_new_session=True)
    try:
        wait_port("127.0.0.1", http_port, timeout=60, proc=proc)
        settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{kafka_port}", http_port=http_port)
        asyncio.run(wait_ready(f"http://127.0.0.1:{http_port}"))
        yield settings
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the API never became ready")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
