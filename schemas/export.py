"""Write the JSON Schema of every message and the AsyncAPI and OpenAPI documents (`segmentation export-schemas`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.asyncapi import EVENT_MODELS, document
from schemas.commands import COMMAND_MODELS, Command

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def message_schemas() -> dict[str, dict[str, Any]]:
    """Message name -> its JSON Schema: commands as accepted, events and results as published."""
    schemas = {m.__name__: m.model_json_schema(mode="validation") for m in COMMAND_MODELS}
    schemas["Command"] = TypeAdapter(Command).json_schema(mode="validation") | {"title": "Command"}
    schemas |= {m.__name__: m.model_json_schema(mode="serialization") for m in EVENT_MODELS}
    return {name: {"$schema": JSON_SCHEMA_DIALECT} | schema for name, schema in schemas.items()}


def dumps(doc: Any) -> str:
    """Stable JSON text: indented, keys sorted, trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(out: Path, settings: Any = None) -> list[Path]:
    """Write `out/schemas/<Message>.json`, `out/asyncapi.json` and `out/openapi.json`; returns the paths."""
    from schemas import openapi
    from schemas.topics import DefaultTopics

    # Defaults, not the environment: the checked-in documents must not depend on who ran the export.
    settings = settings if settings is not None else DefaultTopics()
    files = {Path("schemas", f"{name}.json"): schema for name, schema in sorted(message_schemas().items())}
    files[Path("asyncapi.json")] = document(settings)
    files[Path("openapi.json")] = openapi.document()
    (out / "schemas").mkdir(parents=True, exist_ok=True)
    written = []
    for relative, doc in files.items():
        path = out / relative
        path.write_text(dumps(doc), encoding="utf-8")
        written.append(path)
    return written
