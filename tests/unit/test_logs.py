"""Log calls: no `extra` key may be one LogRecord owns (logging raises KeyError at the call, killing the caller)."""
import ast
import logging

from service.infra.logs import _STANDARD
from tests.support.helpers import ROOT

SOURCES = ["schemas", "service", "consumers", "producers", "bench", "tests"]


def extra_arguments() -> list[tuple[str, ast.expr]]:
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                        "debug", "info", "warning", "error", "exception", "critical", "log"):
                    found += [(f"{path.relative_to(ROOT)}:{node.lineno}", k.value) for k in node.keywords
                              if k.arg == "extra"]
    return found


def test_the_reserved_names_are_the_ones_logging_refuses():
    record = logging.getLogger("t").makeRecord("t", logging.INFO, "f", 1, "m", (), None)
    assert set(vars(record)) <= _STANDARD
    for name in ("args", "process", "message", "name", "msg"):
        try:
            logging.getLogger("t").makeRecord("t", logging.INFO, "f", 1, "m", (), None, extra={name: 1})
        except KeyError:
            continue
        raise AssertionError(f"{name} was accepted")
    assert {"args", "process", "message", "name", "msg"} <= _STANDARD


def test_no_log_call_passes_an_extra_key_that_logrecord_owns():
    calls = extra_arguments()
    assert len(calls) > 20  # the scan sees the project's log calls
    not_literal = [where for where, value in calls if not isinstance(value, ast.Dict)]
    assert not_literal == [], "write `extra` as a dict literal so its keys can be checked"
    clashes = [(where, key.value) for where, value in calls for key in value.keys
               if isinstance(key, ast.Constant) and key.value in _STANDARD]
    assert clashes == []
    assert all(isinstance(key, ast.Constant) for _, value in calls for key in value.keys)
