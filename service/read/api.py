"""The read-only HTTP API (aiohttp, GET only)."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from swagger_ui.utils import SWAGGER_UI_PY_ROOT

from schemas import openapi
from schemas.http import (
    ErrorBody,
    Excluded,
    Explain,
    ExplainedSegment,
    ExplainedUserSegments,
    Member,
    MemberPage,
    ReportLink,
    Scheduled,
    SegmentChange,
    SegmentHistory,
    SegmentInfo,
    SegmentList,
)
from service.infra import db, errors, metrics
from service.infra.settings import Settings
from service.read import auth, params, views
from service.read.answers import UserAnswers, earliest_expiry
from service.read.params import InputError
from service.read.waiters import CommandWaiters

log = logging.getLogger("segmentation.api")

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
GATE = web.AppKey("gate", asyncio.Semaphore)  # one place per pooled connection, taken in turn: see _acquire
REPORTS = web.AppKey("reports", asyncio.Semaphore)  # streams in progress: each holds a connection throughout
WAITERS = web.AppKey("waiters", CommandWaiters)
ANSWERS = web.AppKey("answers", UserAnswers)  # each user's answer now, dropped by NOTIFY: service/read/answers.py
TOKENS = web.AppKey("tokens", tuple)  # SHA-256 digests of the accepted bearer tokens; empty: open
ACQUIRE_TIMEOUT = 5.0
# Everything under it needs a token when API_TOKENS is set; probes, metrics and the documents stay open.
PROTECTED_PREFIX = "/api/v1/"
SERVER = "segmentation"  # no version banner


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error={"code": code, "message": message}).model_dump_json()
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def answer(model) -> web.Response:
    return web.Response(text=model.model_dump_json(), content_type="application/json")


@web.middleware
async def observe(request: web.Request, handler):
    """Errors as the contract's body (a 405 keeps its Allow header), an unexpected one a 500; metrics by route and
    status."""
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except InputError as exc:
        response = error(400, "BAD_REQUEST", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error(exc.status, exc.reason.upper().replace(" ", "_"), exc.text or exc.reason, allow)
        else:
            raise
    except errors.UNAVAILABLE as exc:  # down or busy (503, try again), not a query that fails (500, a bug)
        log.warning("database unavailable", extra={"path": request.path, "error": repr(exc)})
        response = error(503, "UNAVAILABLE", "the database is unavailable, try again")
    except asyncpg.PostgresError:
        log.exception("query failed", extra={"path": request.path})
        response = error(500, "INTERNAL", "internal error")
    except ConnectionError:  # the client went away (a stream cut short): nothing to answer
        raise
    except Exception:  # a bug: the contract's body, and counted (the 5xx alert reads the counter)
        log.exception("request failed", extra={"path": request.path})
        response = error(500, "INTERNAL", "internal error")
    _count(route, request.method, response.status, time.perf_counter() - started)
    return response


_COUNTERS: dict[tuple[str, str, int], tuple] = {}


def _count(route: str, method: str, status: int, seconds: float) -> None:
    """One request in the metrics; each (route, method, status)'s label children looked up once, not per request."""
    key = (route, method, status)
    if (children := _COUNTERS.get(key)) is None:
        children = _COUNTERS[key] = (metrics.HTTP_REQUESTS.labels(route, method, str(status)),
                                     metrics.HTTP_LATENCY.labels(route))
    children[0].inc()
    children[1].observe(seconds)


@web.middleware
async def authorize(request: web.Request, handler):
    """With API_TOKENS set, /api/v1/ needs `Authorization: Bearer <token>` (the token is never logged)."""
    allowed = request.app[TOKENS]
    if allowed and request.path.startswith(PROTECTED_PREFIX):
        if not auth.accepted(auth.bearer(request.headers.get("Authorization")), allowed):
            return error(401, "UNAUTHORIZED", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _no_banner(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER


class _acquire:
    """`async with _acquire(request) as conn`: a pooled connection, waiting at most `timeout`. Every user of the
    pool passes a FIFO gate as wide as the pool first, so that one who waits is served in turn: asyncpg's queue
    lets a newcomer take a connection released to a woken waiter, which then waits again at the back (the p99
    under load). Past the gate a place in the pool is free; when a connected one waits idle, the pool's untimed
    acquire takes it (it saves the Task and timer of asyncpg's timed one, Python 3.11, on every request); otherwise
    the pool has to connect (a connection dropped by a partition, a failover, the idle timeout), and that is bounded
    by what is left of `timeout` like the gate's wait (asyncpg's own connect timeout is 60 s)."""

    __slots__ = ("app", "timeout", "checkout")

    def __init__(self, request: web.Request, timeout: float | None = None):
        self.app, self.timeout = request.app, ACQUIRE_TIMEOUT if timeout is None else timeout

    async def __aenter__(self) -> asyncpg.Connection:
        gate, loop = self.app[GATE], asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if gate.locked():
            await asyncio.wait_for(gate.acquire(), self.timeout)
        else:
            await gate.acquire()  # returns at once
        try:
            pool = self.app[POOL]
            if pool.get_idle_size():
                self.checkout = pool.acquire()
            else:
                self.checkout = pool.acquire(timeout=max(0.0, deadline - loop.time()))
            return await self.checkout.__aenter__()
        except BaseException:
            gate.release()
            raise

    async def __aexit__(self, *exc) -> None:
        try:
            await self.checkout.__aexit__(*exc)
        finally:
            self.app[GATE].release()


async def get_user_segments(request: web.Request) -> web.Response:
    user_id = params.user_id(request.match_info["user_id"])
    q = request.query
    at = params.instant(q["at"], datetime.now(UTC)) if "at" in q else None
    explain = params.flag(q.get("explain"), "explain")
    wait_ms = params.wait_ms(q.get("wait_ms"))
    after = params.command_id(q["after"], "after") if "after" in q else None
    rows: list | None = None
    if after is not None:
        waiters = request.app[WAITERS]
        with waiters.registered(after) as done:
            async with _acquire(request) as conn:  # processed already (the usual case): one connection, no wait
                if await views.processed(conn, [after]):
                    rows = await views.user_segments(conn, user_id, at, explain)
            if rows is None and not await waiters.wait(done, wait_ms / 1000):  # waits holding no connection
                return error(409, "NOT_YET_APPLIED", f"command {after} was not processed within {wait_ms} ms")
    if rows is None:
        if at is None and not explain and after is None:  # after a wait too: memory may lag the commit it saw
            return _json(await _user_segments_now(request, user_id))
        async with _acquire(request) as conn:
            rows = await views.user_segments(conn, user_id, at, explain)
    if not explain:
        return _json(user_segments_body(user_id, rows))
    moment = at or datetime.now(UTC)
    return answer(ExplainedUserSegments(
        user_id=user_id, segments=[_explained(r, moment) for r in rows if r["kind"] == "segment"],
        excluded=[Excluded(slug=r["slug"], since=r["added_at"], bucket=r["bucket"], threshold=r["threshold"])
                  for r in rows if r["kind"] == "excluded"],
        scheduled=[Scheduled(slug=r["slug"], starts_at=r["added_at"], expires_at=r["expires_at"])
                   for r in rows if r["kind"] == "scheduled"],
    ))


async def _user_segments_now(request: web.Request, user_id: int) -> bytes:
    """The hottest request: from memory when kept, else read and kept (service/read/answers.py)."""
    answers = request.app[ANSWERS]
    if (body := answers.get(user_id)) is not None:
        return body
    epoch = answers.epoch  # before the query: a commit it misses notifies after this
    async with _acquire(request) as conn:
        rows = await views.user_segments(conn, user_id)
    body = user_segments_body(user_id, rows)
    answers.put(user_id, epoch, body, earliest_expiry(rows))
    return body


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def user_segments_body(user_id: int, rows: list) -> bytes:
    """The UserSegments JSON written by hand (same fields, same order as the model; a test holds them equal):
    the hottest route, and the values come from the database's own types. The times are PostgreSQL's, in UTC:
    orjson writes them as format_time does (RFC 3339, `Z`, microseconds unless zero)."""
    return orjson.dumps({"user_id": user_id, "segments": [
        {"slug": r["slug"], "added_at": r["added_at"], "expires_at": r["expires_at"], "source": r["source"]}
        for r in rows]}, option=orjson.OPT_UTC_Z)


def _explained(row, moment: datetime) -> ExplainedSegment:
    expires = row["expires_at"]
    return ExplainedSegment(
        slug=row["slug"], added_at=row["added_at"], expires_at=expires, source=row["source"], explain=Explain(
            source=row["source"], bucket=row["bucket"], threshold=row["threshold"], layer=row["layer"],
            expires_in_seconds=None if expires is None else round((expires - moment).total_seconds(), 3)))


async def get_segments(request: web.Request) -> web.Response:
    include_deleted = params.flag(request.query.get("include_deleted"), "include_deleted")
    async with _acquire(request) as conn:
        rows = await views.segments(conn, include_deleted)
    return answer(SegmentList(segments=[SegmentInfo(**r) for r in rows]))


def _not_found(slug: str, what: str = "never existed") -> web.Response:
    return error(404, "SEGMENT_NOT_FOUND", f"segment {slug} {what}")


async def get_segment(request: web.Request) -> web.Response:
    slug = params.slug(request.match_info["slug"])
    async with _acquire(request) as conn:
        row = await views.segment(conn, slug)
    return answer(SegmentInfo(**row)) if row else _not_found(slug)


async def get_segment_history(request: web.Request) -> web.Response:
    slug = params.slug(request.match_info["slug"])
    async with _acquire(request) as conn:
        rows = await views.segment_history(conn, slug)
    if not rows:
        return _not_found(slug)
    return answer(SegmentHistory(slug=slug, changes=[SegmentChange(**r) for r in rows]))


async def get_members(request: web.Request) -> web.Response:
    slug = params.slug(request.match_info["slug"])
    limit = params.page_limit(request.query.get("limit"))
    after = params.decode_cursor(request.query.get("cursor"))
    async with _acquire(request) as conn:
        segment_id = await views.live_segment_id(conn, slug)
        if segment_id is None:
            return _not_found(slug, "is not live")
        rows = await views.members_page(conn, segment_id, after, limit + 1)  # one more: is there a next page?
    page = rows[:limit]
    cursor = params.encode_cursor(page[-1]["user_id"]) if len(rows) > limit else None
    return answer(MemberPage(slug=slug, members=[Member(**r) for r in page], next_cursor=cursor))


async def _stream_csv(request: web.Request, filename: str, produce) -> web.StreamResponse:
    """A streamed CSV download. `produce(conn, start)` may answer an error before it calls `start()`, which sends
    the headers and gives the function that writes the body. Each stream holds a connection throughout, so
    only so many run at once."""
    reports = request.app[REPORTS]
    if reports.locked():  # slow readers must not take every connection from the other endpoints
        return error(503, "TOO_MANY_REPORTS", "too many reports are streaming; try again shortly")
    response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                           "Content-Disposition": f'attachment; filename="{filename}"'})
    response.enable_chunked_encoding()

    async def start():
        await response.prepare(request)
        return response.write

    async with reports, _acquire(request) as conn:
        if (refused := await produce(conn, start)) is not None:
            return refused
    await response.write_eof()
    return response


async def get_members_csv(request: web.Request) -> web.StreamResponse:
    slug = params.slug(request.match_info["slug"])

    async def produce(conn, start) -> web.Response | None:
        segment_id = await views.live_segment_id(conn, slug)
        if segment_id is None:
            return _not_found(slug, "is not live")
        await views.stream_members_csv(conn, segment_id, await start())
        return None

    return await _stream_csv(request, f"members-{slug}.csv", produce)


async def get_command(request: web.Request) -> web.Response:
    command_id = params.command_id(request.match_info["command_id"])
    async with _acquire(request) as conn:
        result = await views.command_result(conn, command_id)
    if result is None:
        return error(404, "COMMAND_NOT_FOUND", f"no result for command {command_id}")
    return web.Response(text=result, content_type="application/json")


async def get_report_link(request: web.Request) -> web.Response:
    period = params.period(request.query)
    base = request.app[SETTINGS].public_base_url or f"{request.scheme}://{request.host}"
    return answer(ReportLink(url=f"{base.rstrip('/')}/api/v1/reports/history.csv?{urlencode(period.query())}"))


async def get_report_csv(request: web.Request) -> web.StreamResponse:
    period = params.period(request.query)

    async def produce(conn, start) -> None:
        await views.stream_history_csv(conn, period.start, period.end, period.user_id, period.slug, await start())

    return await _stream_csv(request, period.filename(), produce)


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
        async with _acquire(request, timeout=1.0) as conn:
            await conn.fetchval("SELECT 1", timeout=1.0)
        checks["postgres"] = "ok"
    except errors.DATABASE_FAILURE as exc:
        checks["postgres"] = f"unreachable: {exc!r}"
    checks["kafka"] = "ok" if await _kafka_reachable(request.app[SETTINGS].kafka_bootstrap_servers) else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def get_metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(_metrics_registry()), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _metrics_registry() -> CollectorRegistry:
    """This process's metrics; with several API processes (PROMETHEUS_MULTIPROC_DIR, set by `api_children`),
    the sum over all of them, whichever answers the scrape."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


async def get_asyncapi(request: web.Request) -> web.Response:
    from schemas.asyncapi import document

    return web.json_response(document(request.app[SETTINGS]))


async def get_docs(request: web.Request) -> web.Response:
    return web.Response(text=openapi.SWAGGER_HTML, content_type="text/html")


async def _database(app: web.Application):
    settings = app[SETTINGS]
    # Read-only, no session state: a released connection needs no reset query (a round trip per request).
    app[POOL] = await db.create_pool(settings, "api", settings.db_pool_min, settings.db_pool_max, session_reset=False)
    app[GATE] = asyncio.Semaphore(settings.db_pool_max)
    app[REPORTS] = asyncio.Semaphore(max(1, settings.db_pool_max // 2))
    app[ANSWERS] = UserAnswers(settings.read_cache_mb * 1024 * 1024)
    app[WAITERS] = CommandWaiters(settings.database_url, app[ANSWERS])
    await app[WAITERS].start()
    yield
    await app[WAITERS].stop()
    await app[POOL].close()


def create_app(settings: Settings) -> web.Application:
    """The app factory: state through AppKey, the pool and the command listener through cleanup_ctx."""
    app = web.Application(middlewares=[observe, authorize])
    app[SETTINGS] = settings
    app[TOKENS] = auth.digests(settings.api_tokens)
    app.cleanup_ctx.append(_database)
    app.on_response_prepare.append(_no_banner)
    r = app.router
    r.add_get("/api/v1/users/{user_id}/segments", get_user_segments)
    r.add_get("/api/v1/segments", get_segments)
    r.add_get("/api/v1/segments/{slug}", get_segment)
    r.add_get("/api/v1/segments/{slug}/members", get_members)
    r.add_get("/api/v1/segments/{slug}/members.csv", get_members_csv)
    r.add_get("/api/v1/segments/{slug}/history", get_segment_history)
    r.add_get("/api/v1/commands/{command_id}", get_command)
    r.add_get("/api/v1/reports/history", get_report_link)
    r.add_get("/api/v1/reports/history.csv", get_report_csv)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", get_metrics)
    r.add_get("/openapi.json", get_openapi)
    r.add_get("/asyncapi.json", get_asyncapi)
    r.add_get("/docs", get_docs)
    r.add_static("/docs/static", SWAGGER_UI_PY_ROOT / "static")  # Swagger UI 5, served from the wheel
    return app


async def main(settings: Settings) -> None:
    """`segmentation api`: serve until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    await db.wait_for(settings.database_url)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    # Several processes share the port (Linux SO_REUSEPORT spreads the connections); one alone keeps the
    # "address in use" error of a second server started by mistake.
    site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=settings.api_processes > 1)
    await site.start()
    log.info("api listening", extra={"url": f"http://{settings.http_host}:{settings.http_port}"})
    stopped = asyncio.Event()
    try:
        await run_until_signalled(stopped.wait(), stopped.set)
    finally:
        await runner.cleanup()
