"""The read-only HTTP API (aiohttp, GET only)."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from urllib.parse import urlencode

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas import openapi
from schemas.common import MAX_USER_ID, SLUG_PATTERN, format_time
from schemas.http import ErrorBody, ReportLink, SegmentInfo, SegmentList
from service.infra import db, errors, metrics
from service.infra.settings import Settings
from service.read import views

log = logging.getLogger("segmentation.api")

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
REPORTS = web.AppKey("reports", asyncio.Semaphore)  # streams in progress: each holds a connection throughout
ACQUIRE_TIMEOUT = 5.0
_SLUG = re.compile(SLUG_PATTERN)


def error(status: int, code: str, message: str) -> web.Response:
    body = ErrorBody(error={"code": code, "message": message}).model_dump_json()
    return web.Response(status=status, text=body, content_type="application/json")


def answer(model) -> web.Response:
    return web.Response(text=model.model_dump_json(), content_type="application/json")


class InputError(Exception):
    """Bad input: answered 400 with the contract's error body."""


def _int(value: str | None, name: str, low: int, high: int, required: bool = True) -> int | None:
    if value is None or value == "":
        if required:
            raise InputError(f"{name} is required")
        return None
    if not re.fullmatch(r"[0-9]{1,19}", value) or not low <= int(value) <= high:
        raise InputError(f"{name} must be an integer from {low} to {high}")
    return int(value)


def _required_int(value: str | None, name: str, low: int, high: int) -> int:
    number = _int(value, name, low, high)
    assert number is not None  # required: _int raised InputError otherwise
    return number


@web.middleware
async def observe(request: web.Request, handler):
    """Errors as the contract's body; metrics by route and status."""
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except InputError as exc:
        response = error(400, "BAD_REQUEST", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            response = error(exc.status, exc.reason.upper().replace(" ", "_"), exc.text or exc.reason)
        else:
            raise
    except errors.UNAVAILABLE as exc:  # down or busy (503, try again), not a query that fails (500, a bug)
        log.warning("database unavailable", extra={"path": request.path, "error": repr(exc)})
        response = error(503, "UNAVAILABLE", "the database is unavailable, try again")
    except asyncpg.PostgresError:
        log.exception("query failed", extra={"path": request.path})
        response = error(500, "INTERNAL", "internal error")
    metrics.HTTP_REQUESTS.labels(route, request.method, str(response.status)).inc()
    metrics.HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


async def get_user_segments(request: web.Request) -> web.Response:
    user_id = _required_int(request.match_info["user_id"], "user_id", 1, MAX_USER_ID)
    async with request.app[POOL].acquire(timeout=ACQUIRE_TIMEOUT) as conn:
        rows = await views.user_segments(conn, user_id)
    return web.Response(body=user_segments_body(user_id, rows), content_type="application/json", charset="utf-8")


def user_segments_body(user_id: int, rows: list) -> bytes:
    """The UserSegments JSON written by hand (same fields, same order as the model; a test holds them equal):
    the hottest route, and the values come from the database's own types."""
    return orjson.dumps({"user_id": user_id, "segments": [
        {"slug": r["slug"], "added_at": format_time(r["added_at"]),
         "expires_at": None if r["expires_at"] is None else format_time(r["expires_at"]), "source": r["source"]}
        for r in rows]})


async def get_segments(request: web.Request) -> web.Response:
    flag = request.query.get("include_deleted", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise InputError("include_deleted must be true or false")
    async with request.app[POOL].acquire(timeout=ACQUIRE_TIMEOUT) as conn:
        rows = await views.segments(conn, flag in ("true", "1"))
    return answer(SegmentList(segments=[SegmentInfo(**r) for r in rows]))


async def get_segment(request: web.Request) -> web.Response:
    slug = request.match_info["slug"]
    if not _SLUG.fullmatch(slug):
        raise InputError(f"not a valid slug: {slug!r}")
    async with request.app[POOL].acquire(timeout=ACQUIRE_TIMEOUT) as conn:
        row = await views.segment(conn, slug)
    if row is None:
        return error(404, "SEGMENT_NOT_FOUND", f"segment {slug} never existed")
    return answer(SegmentInfo(**row))


async def get_command(request: web.Request) -> web.Response:
    command_id = request.match_info["command_id"]
    if not 1 <= len(command_id) <= 128 or "\x00" in command_id:
        raise InputError("command_id must have 1 to 128 characters, none of them NUL")
    async with request.app[POOL].acquire(timeout=ACQUIRE_TIMEOUT) as conn:
        result = await views.command_result(conn, command_id)
    if result is None:
        return error(404, "COMMAND_NOT_FOUND", f"no result for command {command_id}")
    return web.Response(text=result, content_type="application/json")


def _report_params(request: web.Request) -> tuple[int, int, int | None]:
    year = _required_int(request.query.get("year"), "year", 1970, 9998)  # 9998: the month after must exist too
    month = _required_int(request.query.get("month"), "month", 1, 12)
    user_id = _int(request.query.get("user_id"), "user_id", 1, MAX_USER_ID, required=False)
    return year, month, user_id


async def get_report_link(request: web.Request) -> web.Response:
    year, month, user_id = _report_params(request)
    query = {"year": year, "month": month} | ({"user_id": user_id} if user_id is not None else {})
    base = request.app[SETTINGS].public_base_url or f"{request.scheme}://{request.host}"
    return answer(ReportLink(url=f"{base.rstrip('/')}/api/v1/reports/history.csv?{urlencode(query)}"))


async def get_report_csv(request: web.Request) -> web.StreamResponse:
    year, month, user_id = _report_params(request)
    name = f"history-{year:04d}-{month:02d}" + (f"-user-{user_id}" if user_id else "") + ".csv"
    response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                           "Content-Disposition": f'attachment; filename="{name}"'})
    response.enable_chunked_encoding()
    reports = request.app[REPORTS]
    if reports.locked():  # slow readers must not take every connection from the other endpoints
        return error(503, "TOO_MANY_REPORTS", "too many reports are streaming; try again shortly")
    async with reports, request.app[POOL].acquire(timeout=ACQUIRE_TIMEOUT) as conn:
        await response.prepare(request)
        await views.stream_history_csv(conn, year, month, user_id, response.write)
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _kafka_reachable(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 1.0)
            writer.close()
            return True
        except (TimeoutError, OSError, ValueError):
            continue
    return False


async def readyz(request: web.Request) -> web.Response:
    checks = {}
    try:
        async with request.app[POOL].acquire(timeout=1.0) as conn:
            await conn.fetchval("SELECT 1", timeout=1.0)
        checks["postgres"] = "ok"
    except errors.DATABASE_FAILURE as exc:
        checks["postgres"] = f"unreachable: {exc!r}"
    checks["kafka"] = "ok" if await _kafka_reachable(request.app[SETTINGS].kafka_bootstrap_servers) else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def get_metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


async def get_asyncapi(request: web.Request) -> web.Response:
    from schemas.asyncapi import document

    return web.json_response(document(request.app[SETTINGS]))


async def get_docs(request: web.Request) -> web.Response:
    return web.Response(text=openapi.SWAGGER_HTML, content_type="text/html")


async def _database(app: web.Application):
    settings = app[SETTINGS]
    app[POOL] = await db.create_pool(settings, "api", settings.db_pool_min, settings.db_pool_max)
    app[REPORTS] = asyncio.Semaphore(max(1, settings.db_pool_max // 2))
    yield
    await app[POOL].close()


def create_app(settings: Settings) -> web.Application:
    """The app factory: state through AppKey, the pool through cleanup_ctx."""
    app = web.Application(middlewares=[observe])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_database)
    r = app.router
    r.add_get("/api/v1/users/{user_id}/segments", get_user_segments)
    r.add_get("/api/v1/segments", get_segments)
    r.add_get("/api/v1/segments/{slug}", get_segment)
    r.add_get("/api/v1/commands/{command_id}", get_command)
    r.add_get("/api/v1/reports/history", get_report_link)
    r.add_get("/api/v1/reports/history.csv", get_report_csv)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", get_metrics)
    r.add_get("/openapi.json", get_openapi)
    r.add_get("/asyncapi.json", get_asyncapi)
    r.add_get("/docs", get_docs)
    return app


async def main(settings: Settings) -> None:
    """`segmentation api`: serve until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    await db.wait_for(settings.database_url)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    log.info("api listening", extra={"url": f"http://{settings.http_host}:{settings.http_port}"})
    stopped = asyncio.Event()
    try:
        await run_until_signalled(stopped.wait(), stopped.set)
    finally:
        await runner.cleanup()
