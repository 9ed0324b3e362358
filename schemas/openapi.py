"""The OpenAPI 3.1 document of the read API, built from the pydantic answer models."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from schemas.common import SLUG_PATTERN
from schemas.http import (
    ErrorBody,
    ExplainedUserSegments,
    MemberPage,
    ReportLink,
    SegmentHistory,
    SegmentInfo,
    SegmentList,
    UserSegments,
)
from schemas.results import CommandResult

SWAGGER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>segmentation API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""

_MODELS = (UserSegments, ExplainedUserSegments, SegmentList, SegmentInfo, MemberPage, SegmentHistory, ReportLink,
           ErrorBody, CommandResult)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description)


# Every route that reads the database can also answer these (see service/read/api.py `observe`, `authorize`).
_DATABASE_ERRORS = {"500": _error("INTERNAL: a query failed"),
                    "503": _error("UNAVAILABLE: the database cannot be reached, try again")}
_UNAUTHORIZED = {"401": _error("UNAUTHORIZED: API_TOKENS is set and no valid bearer token was given") | {
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}}}
_OPEN = ("healthz", "readyz", "metrics", "openapi", "asyncapi", "docs")


def _param(name: str, where: str, schema: dict[str, Any], required: bool = True, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


_USER_ID = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
_SLUG = _param("slug", "path", {"type": "string", "pattern": SLUG_PATTERN})
_MONTH = {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$", "examples": ["2026-11"]}
_COMMAND_ID = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00]+$"}
_CSV = {"content": {"text/csv": {"schema": {"type": "string"}}}}
_USER_SEGMENTS_PARAMS = [
    _param("user_id", "path", _USER_ID),
    _param("at", "query", {"type": "string", "format": "date-time"}, required=False,
           description="the answer as it was at that instant (RFC 3339, not in the future: 400)"),
    _param("explain", "query", {"type": "boolean", "default": False}, required=False,
           description="why: each segment's explain, and the lists excluded and scheduled"),
    _param("after", "query", _COMMAND_ID, required=False,
           description="answer once this command is processed (read your writes), else 409 NOT_YET_APPLIED"),
    _param("wait_ms", "query", {"type": "integer", "minimum": 0, "maximum": 10000, "default": 5000},
           required=False, description="how long to wait for `after`"),
]
_READINESS = {"description": "ready", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"status": {"type": "string"},
                                     "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}
_REPORT_PARAMS = [
    _param("year", "query", {"type": "integer", "minimum": 1970, "maximum": 9998}, required=False,
           description="with month: one UTC month"),
    _param("month", "query", {"type": "integer", "minimum": 1, "maximum": 12}, required=False),
    _param("from", "query", _MONTH, required=False,
           description="instead of year and month: the first UTC month (YYYY-MM), with `to`"),
    _param("to", "query", _MONTH, required=False,
           description="the last UTC month, included; at most 120 months from `from`"),
    _param("user_id", "query", _USER_ID, required=False, description="only this user's rows"),
    _param("slug", "query", {"type": "string", "pattern": SLUG_PATTERN}, required=False,
           description="only this slug's rows"),
]
_REPORT_BAD = "neither year and month nor from and to, both, a period over 120 months, or a bad filter"


@lru_cache
def document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS], ref_template="#/components/schemas/{model}")
    ok, bad, missing = "200", "400", "404"
    paths: dict[str, dict[str, Any]] = {
        "/api/v1/users/{user_id}/segments": {"get": {
            "summary": "A user's active segments (explicit and rollout), sorted by slug; any user id",
            "operationId": "getUserSegments",
            "parameters": _USER_SEGMENTS_PARAMS,
            "responses": {ok: {"description": "the user's segments (with explain=true: ExplainedUserSegments)",
                               "content": {"application/json": {"schema": {"anyOf": [
                                   _ref("UserSegments"), _ref("ExplainedUserSegments")]}}}},
                          bad: _error("bad user id, `at` or flag; `at` in the future"),
                          "409": _error("NOT_YET_APPLIED: `after` was not processed within wait_ms")}}},
        "/api/v1/segments": {"get": {
            "summary": "All segments", "operationId": "listSegments",
            "parameters": [_param("include_deleted", "query", {"type": "boolean", "default": False}, required=False)],
            "responses": {ok: _json("SegmentList", "the segments"), bad: _error("bad flag")}}},
        "/api/v1/segments/{slug}": {"get": {
            "summary": "One segment (the live one, else its latest deleted incarnation)", "operationId": "getSegment",
            "parameters": [_SLUG],
            "responses": {ok: _json("SegmentInfo", "the segment"), bad: _error("bad slug"),
                          missing: _error("never existed")}}},
        "/api/v1/segments/{slug}/members": {"get": {
            "summary": "The live segment's known members now, by user id, a page at a time",
            "operationId": "getSegmentMembers",
            "parameters": [_SLUG,
                           _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10000,
                                                     "default": 1000}, required=False),
                           _param("cursor", "query", {"type": "string"}, required=False,
                                  description="next_cursor of the page before")],
            "responses": {ok: _json("MemberPage", "one page"), bad: _error("bad slug, limit or cursor"),
                          missing: _error("no live segment")}}},
        "/api/v1/segments/{slug}/members.csv": {"get": {
            "summary": "Every known member of the live segment now, streamed as CSV (`;`, by user id)",
            "operationId": "getSegmentMembersCsv", "parameters": [_SLUG],
            "responses": {ok: {"description": "user_id;added_at;expires_at;source"} | _CSV,
                          bad: _error("bad slug"), missing: _error("no live segment"),
                          "503": _error("TOO_MANY_REPORTS (too many streaming now) or UNAVAILABLE; try again")}}},
        "/api/v1/segments/{slug}/history": {"get": {
            "summary": "Every create, update and delete of every incarnation of the slug, oldest first",
            "operationId": "getSegmentHistory", "parameters": [_SLUG],
            "responses": {ok: _json("SegmentHistory", "the changes"), bad: _error("bad slug"),
                          missing: _error("never existed")}}},
        "/api/v1/commands/{command_id}": {"get": {
            "summary": "The stored result of a command", "operationId": "getCommandResult",
            "parameters": [_param("command_id", "path", _COMMAND_ID)],
            "responses": {ok: _json("CommandResult", "the result, as on the results topic"),
                          bad: _error("bad command id"), missing: _error("unknown command id")}}},
        "/api/v1/reports/history": {"get": {
            "summary": "A link to the history CSV of a month or a period (the same query)",
            "operationId": "getHistoryReportLink", "parameters": _REPORT_PARAMS,
            "responses": {ok: _json("ReportLink", "the link"), bad: _error(_REPORT_BAD)}}},
        "/api/v1/reports/history.csv": {"get": {
            "summary": "The membership history of a month or a period, streamed as CSV (`;`, UTC, oldest first)",
            "operationId": "getHistoryReportCsv", "parameters": _REPORT_PARAMS,
            "responses": {ok: {"description": "user_id;segment;operation;timestamp;reason"} | _CSV,
                          bad: _error(_REPORT_BAD),
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
    for route in paths.values():  # database-backed routes: the two server errors, and the token
        op = route["get"]
        if op["operationId"] not in _OPEN:
            op["responses"] = _DATABASE_ERRORS | _UNAUTHORIZED | op["responses"]
            op["security"] = [{}, {"bearer": []}]  # open unless API_TOKENS is set
    return {
        "openapi": "3.1.0",
        "info": {"title": "segmentation read API", "version": "1.0.0",
                 "description": "Read-only: commands go to Kafka (see /asyncapi.json)."},
        "paths": paths,
        "components": {"schemas": defs["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "one of API_TOKENS, when it is set"}}},
    }
