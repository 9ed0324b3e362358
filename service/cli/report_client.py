"""Client side of the history report: stream the CSV from the API to a file or stdout, with progress."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import aiohttp

TOKEN_VARIABLE = "SEGMENTATION_API_TOKEN"  # the bearer token, when the API has API_TOKENS set


async def download(base_url: str, params: dict[str, str], output: Path | None) -> int:
    """Stream the CSV of `params` (year and month, or from and to; user_id, slug); a progress bar on stderr
    when it is a terminal. Returns an exit code."""
    token = os.environ.get(TOKEN_VARIABLE)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: ASYNC230 - once, before any I/O
    show = sys.stderr.isatty()
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{base_url.rstrip('/')}/api/v1/reports/history.csv", params=params) as resp:
                if resp.status != 200:
                    print(f"report failed: HTTP {resp.status}: {await resp.text()}", file=sys.stderr)
                    return 1
                written = rows = 0
                progress = _Progress() if show else None
                async for chunk in resp.content.iter_chunked(1 << 16):
                    sink.write(chunk)
                    written += len(chunk)
                    rows += chunk.count(b"\n")
                    if progress:
                        progress.update(rows, written)
                if progress:
                    progress.done(rows, written)
    finally:
        if output:
            sink.close()
        else:
            sink.flush()
    return 0


class _Progress:
    def __init__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("history"), BarColumn(pulse_style="cyan"),
                                 TextColumn("{task.fields[rows]:,} rows, {task.fields[mb]:.1f} MB"),
                                 TimeElapsedColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("report", total=None, rows=0, mb=0.0)

    def update(self, rows: int, size: int) -> None:
        self.progress.update(self.task, rows=max(0, rows - 1), mb=size / 1e6)

    def done(self, rows: int, size: int) -> None:
        self.update(rows, size)
        self.progress.stop()
