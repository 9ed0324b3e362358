"""The README tried as a new user would: every block marked `<!-- runnable -->` runs, in the README's order,
against the `make run` stack.

A `sh` block is run line by line (a line ending in a backslash goes on), each line by bash; a `python` block as a
script. Each must exit 0; curl gets `-sS --fail-with-body`, so an HTTP error fails it. A `# -> text` line says
what the command (or script) before it prints: `text` must be in its output. The README's addresses
(127.0.0.1:9092, 127.0.0.1:8080) are the stack's; so are the environment's KAFKA_BOOTSTRAP_SERVERS and HTTP_PORT.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.helpers import ROOT

MARKER = "<!-- runnable -->"
EXPECT = "# -> "


@dataclass
class Step:
    """One command of a sh block, or one python block, with what it must print."""

    line: int  # in README.md
    language: str
    code: str
    expected: list[str] = field(default_factory=list)


def runnable_steps(readme: str) -> list[Step]:
    """The steps of every block marked runnable, in the README's order."""
    lines = readme.splitlines()
    steps: list[Step] = []
    for n, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[n + 1]
        assert fence.startswith("```"), f"README.md:{n + 1}: {MARKER} must sit right above a code block"
        language = fence[3:].strip()
        end = lines.index("```", n + 2)
        body = list(enumerate(lines[n + 2:end], start=n + 3))
        if language == "python":
            steps.append(Step(n + 3, language, "\n".join(text for _, text in body),
                              [text.strip()[len(EXPECT):] for _, text in body if text.strip().startswith(EXPECT)]))
        elif language == "sh":
            steps += _shell_steps(body)
        else:
            raise AssertionError(f"README.md:{n + 1}: a runnable block is sh or python, not {language!r}")
    return steps


def _shell_steps(body: list[tuple[int, str]]) -> list[Step]:
    steps: list[Step] = []
    continued = False
    for number, text in body:
        stripped = text.strip()
        if continued:
            steps[-1].code += "\n" + text
        elif stripped.startswith(EXPECT):
            assert steps, f"README.md:{number}: an expectation needs a command above it"
            steps[-1].expected.append(stripped[len(EXPECT):])
            continue
        elif stripped and not stripped.startswith("#"):
            steps.append(Step(number, "sh", text))
        else:
            continue
        continued = text.endswith("\\")
    return steps


def test_the_readme_markers_pick_sh_commands_python_scripts_and_their_expectations():
    readme = "\n".join([
        "text", MARKER, "```sh", "# a comment", "echo one   # trailing", "# -> one", "printf '%s' \\", "  two",
        "```", "```sh", "not marked", "```", MARKER, "```python", "print('three')", "# -> three", "```"])
    steps = runnable_steps(readme)
    assert [(s.line, s.language, s.code, s.expected) for s in steps] == [
        (5, "sh", "echo one   # trailing", ["one"]), (7, "sh", "printf '%s' \\\n  two", []),
        (15, "python", "print('three')\n# -> three", ["three"])]


def test_every_runnable_example_of_the_readme_runs_in_order_against_the_dev_stack(dev, tmp_path):
    bootstrap, http = dev.kafka_bootstrap_servers, f"127.0.0.1:{dev.http_port}"
    steps = runnable_steps((ROOT / "README.md").read_text())
    languages = {s.language for s in steps}
    assert languages == {"sh", "python"} and any("SegmentationClient" in s.code for s in steps), languages
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # `source .venv/bin/activate` as in a clone
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"PYTHONPATH": str(ROOT),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "HTTP_PORT": str(dev.http_port), "LOG_LEVEL": "WARNING",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for step in steps:
        code = step.code.replace("127.0.0.1:9092", bootstrap).replace("127.0.0.1:8080", http)
        if step.language == "sh":
            code = re.sub(r"^curl ", "curl -sS --fail-with-body ", code)
            argv = ["bash", "-c", f"set -eo pipefail\n{code}"]
        else:
            script = tmp_path / f"readme_{step.line}.py"
            script.write_text(code)
            argv = [sys.executable, str(script)]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        where = f"README.md:{step.line}: {step.code}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"
        assert done.returncode == 0, where
        for text in step.expected:
            assert text in done.stdout, f"{text!r} not printed\n{where}"
