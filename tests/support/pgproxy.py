"""A PostgreSQL outage on demand: a Unix-socket proxy in front of the real server that can be cut and restored."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path


class PgProxy:
    """Forwards `<folder>/.s.PGSQL.5432` to the real server's socket; `cut()` drops every connection and
    refuses new ones until `restore()`."""

    def __init__(self, database_url: str, folder: Path):
        self.target_dir = re.search(r"host=([^&]+)", database_url).group(1)
        self.folder = folder
        self.url = database_url.replace(self.target_dir, str(folder))
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.folder / ".s.PGSQL.5432"))

    async def cut(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        (self.folder / ".s.PGSQL.5432").unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(f"{self.target_dir}/.s.PGSQL.5432")
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.writers -= {writer, up_writer}
