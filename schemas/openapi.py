"""The OpenAPI 3.1 document of the read API, built from the pydantic answer models."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from schemas.http import ErrorBody, ReportLink, SegmentInfo, SegmentList, UserSegments
from schemas.results import CommandResult

SWAGGER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>segmentation API</title>
<link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""

_MODELS = (UserSegments, SegmentList, SegmentInfo, ReportLink, ErrorBody, CommandResult)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description)


# Every route that reads the database can also answer these (see service/api.py `observe`).
_DATABASE_ERRORS = {"500": _error("INTERNAL: a query failed"),
                    "503": _error("UNAVAILABLE: the database cannot be reached, try again")}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = True, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


_USER_ID = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
_READINESS = {"description": "ready", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"status": {"type": "string"},
                                     "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}
_REPORT_PARAMS = [
    _param("year", "query", {"type": "integer", "minimum": 1970, "maximum": 9998}),
    _param("month", "query", {"type": "integer", "minimum": 1, "maximum": 12}),
    _param("user_id", "query", _USER_ID, required=False, description="only this user's rows"),
]


@lru_cache
def document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS], ref_template="#/components/schemas/{model}")
    ok, bad, missing = "200", "400", "404"
    paths: dict[str, dict[str, Any]] = {
        "/api/v1/users/{user_id}/segments": {"get": {
            "summary": "A user's active segments (explicit and rollout), sorted by slug; any user id",
            "operationId": "getUserSegments",
            "parameters": [_param("user_id", "path", _USER_ID)],
            "responses": {ok: _json("UserSegments", "the user's segments"), bad: _error("bad user id")}}},
        "/api/v1/segments": {"get": {
            "summary": "All segments", "operationId": "listSegments",
            "parameters": [_param("include_deleted", "query", {"type": "boolean", "default": False}, required=False)],
            "responses": {ok: _json("SegmentList", "the segments"), bad: _error("bad flag")}}},
        "/api/v1/segments/{slug}": {"get": {
            "summary": "One segment (the live one, else its latest deleted incarnation)", "operationId": "getSegment",
            "parameters": [_param("slug", "path", {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"})],
            "responses": {ok: _json("SegmentInfo", "the segment"), bad: _error("bad slug"),
                          missing: _error("never existed")}}},
        "/api/v1/commands/{command_id}": {"get": {
            "summary": "The stored result of a command", "operationId": "getCommandResult",
            "parameters": [_param("command_id", "path", {"type": "string", "minLength": 1, "maxLength": 128})],
            "responses": {ok: _json("CommandResult", "the result, as on the results topic"),
                          bad: _error("bad command id"), missing: _error("unknown command id")}}},
        "/api/v1/reports/history": {"get": {
            "summary": "A link to the month's history CSV", "operationId": "getHistoryReportLink",
            "parameters": _REPORT_PARAMS,
            "responses": {ok: _json("ReportLink", "the link"), bad: _error("bad year or month")}}},
        "/api/v1/reports/history.csv": {"get": {
            "summary": "The month's membership history, streamed as CSV (`;`, UTC, oldest first)",
            "operationId": "getHistoryReportCsv", "parameters": _REPORT_PARAMS,
            "responses": {ok: {"description": "user_id;segment;operation;timestamp;reason",
                               "content": {"text/csv": {"schema": {"type": "string"}}}},
                          bad: _error("bad year or month"),
                          "503": _error("TOO_MANY_REPORTS (too many streaming now) or UNAVAILABLE; try again")}}},
        "/healthz": {"get": {"summary": "Liveness", "operationId": "healthz",
                             "responses": {ok: {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness: PostgreSQL and Kafka reachable", "operationId": "readyz",
                            "responses": {ok: _READINESS, "503": _READINESS | {"description": "not ready"}}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                  "responses": {ok: {"description": "OpenAPI 3.1",
                                                     "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/asyncapi.json": {"get": {"summary": "The AsyncAPI 3.0 document of every topic", "operationId": "asyncapi",
                                   "responses": {ok: {"description": "AsyncAPI 3.0",
                                                      "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/docs": {"get": {"summary": "Swagger UI", "operationId": "docs",
                          "responses": {ok: {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                             "responses": {ok: {"description": "text format",
                                                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    for route in paths.values():  # database-backed routes: the two server errors
        op = route["get"]
        if op["operationId"] not in ("healthz", "readyz", "metrics", "openapi", "asyncapi", "docs"):
            op["responses"] = _DATABASE_ERRORS | op["responses"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "segmentation read API", "version": "1.0.0",
                 "description": "Read-only: commands go to Kafka (see /asyncapi.json)."},
        "paths": paths,
        "components": {"schemas": defs["$defs"]},
    }
