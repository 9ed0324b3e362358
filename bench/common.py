"""Shared bench plumbing: the dev stack (`segmentation dev`) on free ports, percentiles."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.dev.supervisor import child_stack as dev_stack  # noqa: E402,F401


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
