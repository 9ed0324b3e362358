"""The read side's options and endpoints: the past (at=), explain, members, segment history, report periods,
tokens and HTTP hygiene. Commands are fed straight to the batch processor (real PostgreSQL, no broker)."""
import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from schemas import openapi
from service.bucket import bucket
from service.infra import db
from service.infra.settings import Settings
from service.read import api
from service.read.api import create_app
from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import api_client, wait_until


@pytest.fixture
async def http(database_url):
    async with api_client(Settings(database_url=database_url, public_base_url="http://api")) as client:
        yield client


def now() -> datetime:
    return datetime.now(UTC)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def segments_of(http, user_id: int, query: str = "") -> dict:
    resp = await http.get(f"/api/v1/users/{user_id}/segments{query}")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def salt(conn, slug: str) -> str:
    return await conn.fetchval("SELECT salt FROM segments WHERE slug = $1 AND deleted_at IS NULL", slug)


def user_with_bucket(salt_: str, low: int, high: int, start: int = 1) -> int:
    return next(u for u in range(start, 10**6) if low <= bucket(salt_, u) < high)


# ---- at= ---------------------------------------------------------------------------------------------------

async def test_a_scripted_life_read_back_at_each_instant_equals_what_the_api_said_then(conn, http):
    f = Feeder(conn, now=now())
    await f.apply(create("A"), create("R", percent=10))
    r_salt = await salt(conn, "R")
    user = user_with_bucket(r_salt, 1000, 9000)  # out of R at 10 %, in at 90 %
    stranger = user_with_bucket(r_salt, 1000, 9000, start=user + 1)  # never in any command
    seen: list[tuple[datetime, dict, dict]] = []

    async def snapshot():
        said = await segments_of(http, user), await segments_of(http, stranger)
        seen.append((now(), *said))
        return said

    answers = http.server.app[api.ANSWERS]

    async def step(*commands):
        # The plain GET may answer from memory until the commit's notification reaches the API process (the
        # contract allows 1 s; clients that need their write use after=): each step waits for it.
        f.now, epoch = now(), answers.epoch
        await f.apply(*commands)
        await wait_until(lambda: _above(answers, epoch), timeout=5, message="the change's notification")
        return await snapshot()

    mine, _ = await step(update_user("add-ttl", user, add=[{"slug": "A", "ttl_seconds": 2}]))
    assert [(s["slug"], s["source"]) for s in mine["segments"]] == [("A", "manual")] and mine["segments"][0]["expires_at"]
    expires_at = mine["segments"][0]["expires_at"]
    await wait_until(lambda: _past(expires_at), timeout=10, message="the TTL")
    mine, _ = await step({"type": "ExpireMembership", "command_id": "exp", "user_id": user, "slug": "A",
                          "expires_at": expires_at})
    assert mine["segments"] == []
    mine, theirs = await step({"type": "UpdateSegment", "command_id": "raise", "slug": "R", "auto_percent": 90})
    assert [s["slug"] for s in mine["segments"]] == ["R"] and [s["slug"] for s in theirs["segments"]] == ["R"]
    mine, _ = await step(update_user("remove-R", user, remove=["R"]))
    assert mine["segments"] == []
    await step(update_user("add-A", user, add=["A"]), {"type": "DeleteSegment", "command_id": "del-A", "slug": "A"})
    mine, _ = await step(create("A", cid="create-A-again"), update_user("add-A-again", user, add=["A"]))
    assert [s["slug"] for s in mine["segments"]] == ["A"]

    for instant, mine, theirs in seen:
        assert await segments_of(http, user, f"?at={stamp(instant)}") == mine, instant
        assert await segments_of(http, stranger, f"?at={stamp(instant)}") == theirs, instant
    before = seen[0][0] - timedelta(days=1)
    assert (await segments_of(http, user, f"?at={stamp(before)}"))["segments"] == []


async def _above(answers, epoch: int) -> bool:
    return answers.epoch > epoch


async def _past(moment: str) -> bool:
    return datetime.fromisoformat(moment) < now()


async def test_at_reads_the_percent_and_exclusions_as_they_were(conn, http):
    f = Feeder(conn, now=datetime(2026, 1, 1, tzinfo=UTC))
    await f.apply(create("R", percent=50))
    r_salt = await salt(conn, "R")
    inside = user_with_bucket(r_salt, 0, 1000)  # in at 10 % and at 50 %
    edge = user_with_bucket(r_salt, 1000, 5000)  # in at 50 % only
    f.now = datetime(2026, 2, 1, tzinfo=UTC)
    await f.apply({"type": "UpdateSegment", "command_id": "lower", "slug": "R", "auto_percent": 10})
    f.now = datetime(2026, 3, 1, tzinfo=UTC)
    await f.apply(update_user("out", inside, remove=["R"]))

    async def slugs(user: int, at: str) -> list[str]:
        return [s["slug"] for s in (await segments_of(http, user, f"?at={at}"))["segments"]]

    assert await slugs(edge, "2026-01-15T00:00:00Z") == ["R"]
    assert await slugs(edge, "2026-02-15T00:00:00Z") == []
    assert await slugs(inside, "2026-02-15T00:00:00Z") == ["R"]
    assert await slugs(inside, "2026-03-15T00:00:00Z") == []
    assert await slugs(inside, "2025-12-31T23:59:59.999999Z") == []
    explained = await segments_of(http, inside, "?at=2026-03-15T00:00:00%2B01:00&explain=true")
    assert explained["excluded"] == [{"slug": "R", "since": "2026-03-01T00:00:00Z",
                                      "bucket": bucket(r_salt, inside), "threshold": 1000}]


@pytest.mark.parametrize("at", ["2999-01-01T00:00:00Z", "yesterday", "2026-01-01", "2026-01-01T00:00:00",
                                "0001-01-01T00:00:00+23:59"])
async def test_an_at_in_the_future_or_not_rfc_3339_is_a_400(http, at):
    resp = await http.get("/api/v1/users/1/segments", params={"at": at})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "BAD_REQUEST"


async def test_at_shows_the_expiry_a_bulk_add_gave(conn, http):
    f = Feeder(conn, now=datetime(2026, 6, 1, tzinfo=UTC))
    await f.apply(create("BULK"), {"type": "UpdateSegmentMembers", "command_id": "bulk", "slug": "BULK",
                                   "add": [1, 2, 3], "ttl_seconds": 3600})
    for user in (1, 3):
        body = await segments_of(http, user, "?at=2026-06-01T00:30:00Z")
        assert body["segments"] == [{"slug": "BULK", "added_at": "2026-06-01T00:00:00Z",
                                     "expires_at": "2026-06-01T01:00:00Z", "source": "manual"}]
    assert (await segments_of(http, 2, "?at=2026-06-01T01:00:00Z"))["segments"] == []  # expired by then


# ---- explain -----------------------------------------------------------------------------------------------

async def test_explain_says_why_for_each_segment_and_lists_exclusions(conn, http):
    f = Feeder(conn, now=now())
    await f.apply(create("M"), create("R", percent=100), create("Q", percent=100))
    await f.apply(update_user("c", 5, add=[{"slug": "M", "ttl_seconds": 3600}], remove=["Q"]))
    body = await segments_of(http, 5, "?explain=true")
    by_slug = {s["slug"]: s for s in body["segments"]}
    assert sorted(by_slug) == ["M", "R"]
    m = by_slug["M"]["explain"]
    assert m["source"] == "manual" and m["bucket"] is None and m["threshold"] is None and m["layer"] is None
    assert 3590 < m["expires_in_seconds"] <= 3600
    assert by_slug["R"]["explain"] == {"source": "auto_percent", "bucket": bucket(await salt(conn, "R"), 5),
                                       "threshold": 10000, "layer": None, "expires_in_seconds": None}
    assert [(x["slug"], x["threshold"]) for x in body["excluded"]] == [("Q", 10000)]
    assert body["excluded"][0]["bucket"] == bucket(await salt(conn, "Q"), 5)
    assert body["scheduled"] == []
    plain = await segments_of(http, 5)
    assert all(set(s) == {"slug", "added_at", "expires_at", "source"} for s in plain["segments"])
    assert set(plain) == {"user_id", "segments"}


@pytest.mark.parametrize("path", ["/api/v1/segments?include_deleted=", "/api/v1/users/1/segments?explain=",
                                  "/api/v1/segments?include_deleted=yes", "/api/v1/segments/S/members?limit=",
                                  "/api/v1/users/1/segments?after=c&wait_ms=",
                                  "/api/v1/reports/history?year=2026&month=1&user_id="])
async def test_an_empty_or_odd_flag_or_number_is_a_400_not_the_default(http, path):
    assert (await http.get(path)).status == 400


async def test_explain_and_at_in_a_layer_and_a_scheduled_start(conn, http):
    f = Feeder(conn, now=now())
    await f.apply(create("ONE") | {"layer": "exp", "auto_percent": 30}, create("TWO") | {"layer": "exp", "auto_percent": 30},
                  create("LATER"))
    user = user_with_bucket("layer:exp", 3000, 6000)  # in TWO's range [3000, 6000), not in ONE's [0, 3000)
    starts = now() + timedelta(hours=1)
    await f.apply(update_user("sched", user, add=[{"slug": "LATER", "starts_at": stamp(starts)}]))
    instant = now()
    body = await segments_of(http, user, "?explain=true")
    assert [(s["slug"], s["source"]) for s in body["segments"]] == [("TWO", "auto_percent")]
    assert body["segments"][0]["explain"] == {"source": "auto_percent", "bucket": bucket("layer:exp", user),
                                              "threshold": 6000, "layer": "exp", "expires_in_seconds": None}
    assert body["scheduled"] == [{"slug": "LATER", "starts_at": stamp(starts), "expires_at": None}]
    assert body["excluded"] == []
    at = await segments_of(http, user, f"?at={stamp(instant)}&explain=true")
    assert at["segments"] == body["segments"] and at["scheduled"] == body["scheduled"]
    history = await (await http.get("/api/v1/segments/TWO/history")).json()
    assert [(c["change"], c["layer"]) for c in history["changes"]] == [("created", "exp")]
    await f.apply(update_user("out", user, remove=["TWO"]))
    body = await segments_of(http, user, "?explain=true")
    assert body["segments"] == [] and [(x["slug"], x["threshold"]) for x in body["excluded"]] == [("TWO", 6000)]


# ---- members -----------------------------------------------------------------------------------------------

async def test_members_come_a_page_at_a_time_and_as_csv(conn, http):
    f = Feeder(conn, now=now())
    await f.apply(create("S"), *[update_user(f"c{u}", u, add=["S"]) for u in (3, 1, 2, 10, 7)])
    page = await (await http.get("/api/v1/segments/S/members?limit=2")).json()
    assert [m["user_id"] for m in page["members"]] == [1, 2] and page["slug"] == "S"
    assert page["members"][0]["source"] == "manual" and page["next_cursor"]
    page = await (await http.get(f"/api/v1/segments/S/members?limit=2&cursor={page['next_cursor']}")).json()
    assert [m["user_id"] for m in page["members"]] == [3, 7]
    page = await (await http.get(f"/api/v1/segments/S/members?limit=2&cursor={page['next_cursor']}")).json()
    assert [m["user_id"] for m in page["members"]] == [10] and page["next_cursor"] is None
    resp = await http.get("/api/v1/segments/S/members.csv")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    lines = (await resp.text()).splitlines()
    assert lines[0] == "user_id;added_at;expires_at;source"
    assert [line.split(";")[0] for line in lines[1:]] == ["1", "2", "3", "7", "10"]
    assert lines[1].split(";")[2:] == ["", "manual"]
    for path in ("/api/v1/segments/nope/members", "/api/v1/segments/nope/members.csv"):
        resp = await http.get(path)
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "SEGMENT_NOT_FOUND"
    for query in ("limit=0", "limit=10001", "cursor=garbage!", "cursor=YWZ0ZXI6eA"):
        assert (await http.get(f"/api/v1/segments/S/members?{query}")).status == 400, query


async def test_paging_under_concurrent_adds_and_removes_returns_each_steady_member_once(conn, http, database_url):
    import asyncpg

    f = Feeder(conn, now=now())
    steady = list(range(1, 4000, 2))  # odd ids stay throughout; even ids come and go
    await f.apply(create("S"), *[update_user(f"s{u}", u, add=["S"]) for u in steady])
    writer = await asyncpg.connect(database_url)
    churn = Feeder(writer, now=now())
    stop = asyncio.Event()

    async def churning():
        round_ = 0
        while not stop.is_set():
            round_ += 1
            evens = range(2 + 2 * (round_ % 7), 4100, 14)
            await churn.apply(*[update_user(f"a{round_}-{u}", u, add=["S"]) for u in evens])
            await churn.apply(*[update_user(f"r{round_}-{u}", u, remove=["S"]) for u in evens])
            await asyncio.sleep(0)

    task = asyncio.create_task(churning())
    seen: list[int] = []
    try:
        cursor = None
        while True:
            query = "limit=97" + (f"&cursor={cursor}" if cursor else "")
            page = await (await http.get(f"/api/v1/segments/S/members?{query}")).json()
            seen += [m["user_id"] for m in page["members"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        await task
        await writer.close()
    assert seen == sorted(set(seen))  # by user id, nobody twice
    assert set(steady) <= set(seen)
    assert churn.offsets[0] > 0


# ---- segment history ---------------------------------------------------------------------------------------

async def test_segment_history_lists_every_incarnation_oldest_first(conn, http):
    f = Feeder(conn, now=datetime(2026, 5, 1, tzinfo=UTC))
    await f.apply(create("H", cid="c1"))
    f.now += timedelta(hours=1)
    await f.apply({"type": "UpdateSegment", "command_id": "u1", "slug": "H", "description": "d", "auto_percent": 5})
    f.now += timedelta(hours=1)
    await f.apply({"type": "DeleteSegment", "command_id": "d1", "slug": "H"})
    f.now += timedelta(hours=1)
    await f.apply(create("H", cid="c2", percent=1.5))
    body = await (await http.get("/api/v1/segments/H/history")).json()
    assert body["slug"] == "H"
    changes = body["changes"]
    assert [(c["change"], c["command_id"], c["auto_percent"], c["description"]) for c in changes] == [
        ("created", "c1", 0, None), ("updated", "u1", 5, "d"), ("deleted", "d1", 5, "d"), ("created", "c2", 1.5, None)]
    assert changes[0]["segment_id"] == changes[2]["segment_id"] != changes[3]["segment_id"]
    assert [c["occurred_at"] for c in changes] == ["2026-05-01T00:00:00Z", "2026-05-01T01:00:00Z",
                                                  "2026-05-01T02:00:00Z", "2026-05-01T03:00:00Z"]
    assert all(c["layer"] is None for c in changes)
    assert (await http.get("/api/v1/segments/never/history")).status == 404


# ---- report periods ----------------------------------------------------------------------------------------

async def test_a_report_over_a_period_and_one_slug(conn, http):
    f = Feeder(conn, now=datetime(2026, 1, 31, 23, 0, tzinfo=UTC))
    await f.apply(create("A"), create("B"), update_user("jan", 1, add=["A", "B"]))
    f.now = datetime(2026, 3, 1, tzinfo=UTC)
    await f.apply(update_user("mar", 2, add=["A"]))
    f.now = datetime(2026, 4, 1, tzinfo=UTC)
    await f.apply(update_user("apr", 3, add=["A"]))

    async def rows(query: str) -> list[tuple[str, str]]:
        resp = await http.get(f"/api/v1/reports/history.csv?{query}")
        assert resp.status == 200, await resp.text()
        return [tuple(line.split(";")[:2]) for line in (await resp.text()).splitlines()[1:]]

    assert await rows("from=2026-01&to=2026-03") == [("1", "A"), ("1", "B"), ("2", "A")]
    assert await rows("from=2026-01&to=2026-03&slug=B") == [("1", "B")]
    assert await rows("from=2026-02&to=2026-04&slug=A&user_id=3") == [("3", "A")]
    assert await rows("year=2026&month=1&slug=A") == [("1", "A")]
    resp = await http.get("/api/v1/reports/history.csv?from=2026-01&to=2026-03")
    assert 'filename="history-2026-01--2026-03.csv"' in resp.headers["Content-Disposition"]
    link = await (await http.get("/api/v1/reports/history?from=2026-01&to=2026-03&slug=A&user_id=1")).json()
    assert link == {"url": "http://api/api/v1/reports/history.csv?from=2026-01&to=2026-03&user_id=1&slug=A"}


@pytest.mark.parametrize("query", ["from=2026-01", "from=2026-03&to=2026-01", "from=2016-01&to=2026-01",
                                   "from=2026-1&to=2026-02", "year=2026&month=1&from=2026-01&to=2026-01",
                                   "year=2026&month=1&slug=bad slug", ""])
async def test_a_bad_period_is_a_400(http, query):
    for path in ("/api/v1/reports/history", "/api/v1/reports/history.csv"):
        assert (await http.get(f"{path}?{query}")).status == 400, (path, query)


async def test_ten_years_is_the_longest_period(http):
    assert (await http.get("/api/v1/reports/history.csv?from=2016-01&to=2025-12")).status == 200


# ---- tokens ------------------------------------------------------------------------------------------------

async def test_tokens_plain_and_sha256_and_the_open_endpoints(database_url):
    digest = hashlib.sha256(b"second-secret").hexdigest()
    settings = Settings(database_url=database_url, api_tokens=f"first-secret, sha256:{digest}",
                        public_base_url="http://api")
    async with api_client(settings) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zmlyc3Qtc2VjcmV0"},
                        {"Authorization": f"Bearer {digest}"}, {"Authorization": "Bearer"}):
            resp = await client.get("/api/v1/segments", headers=headers)
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"
        for token in ("first-secret", "second-secret"):
            resp = await client.get("/api/v1/segments", headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200, token
        link = await (await client.get("/api/v1/reports/history?year=2026&month=1",
                                       headers={"Authorization": "Bearer second-secret"})).json()
        assert (await client.get(link["url"].replace("http://api", ""),
                                 headers={"Authorization": "Bearer second-secret"})).status == 200
        for path in ("/healthz", "/metrics", "/openapi.json", "/asyncapi.json", "/docs"):
            assert (await client.get(path)).status == 200, path
        assert (await client.get("/readyz")).status in (200, 503)  # open: Kafka may be absent here
        metrics = await (await client.get("/metrics")).text()
        assert "first-secret" not in metrics and "second-secret" not in metrics
        assert 'status="401"' in metrics


def test_a_bad_sha256_entry_stops_the_api_from_starting():
    with pytest.raises(ValueError, match="64 hex"):
        create_app(Settings(api_tokens="sha256:abc"))


# ---- HTTP hygiene ------------------------------------------------------------------------------------------

async def test_every_documented_path_answers_other_methods_with_405_and_allow(http):
    for path in openapi.document()["paths"]:
        concrete = path.replace("{user_id}", "1").replace("{slug}", "S").replace("{command_id}", "c")
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            resp = await http.request(method, concrete)
            assert resp.status == 405, (method, path)
            assert "GET" in resp.headers["Allow"], (method, path)
            assert (await resp.json())["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_no_version_banner_and_swagger_ui_from_local_files(http):
    resp = await http.get("/docs")
    assert resp.headers["Server"] == "segmentation"
    html = await resp.text()
    assert "unpkg.com" not in html and "/docs/static/swagger-ui-bundle.js" in html
    bundle = await http.get("/docs/static/swagger-ui-bundle.js")
    assert bundle.status == 200 and len(await bundle.read()) > 100_000
    assert (await http.get("/api/v1/segments/x/members")).headers["Server"] == "segmentation"


async def test_the_cli_report_download_sends_the_token_from_its_variable(conn, database_url, tmp_path, monkeypatch):
    from service.cli import report_client

    f = Feeder(conn, now=datetime(2026, 1, 5, tzinfo=UTC))
    await f.apply(create("A"), update_user("c", 1, add=["A"]))
    async with api_client(Settings(database_url=database_url, api_tokens="cli-secret")) as client:
        base = str(client.make_url(""))
        out = tmp_path / "report.csv"
        assert await report_client.download(base, {"from": "2026-01", "to": "2026-02"}, out) == 1  # no token
        monkeypatch.setenv(report_client.TOKEN_VARIABLE, "cli-secret")
        assert await report_client.download(base, {"from": "2026-01", "to": "2026-02", "slug": "A"}, out) == 0
        assert out.read_text().splitlines()[1].startswith("1;A;added;2026-01-05T")


# ---- the hot path's round trips ------------------------------------------------------------------------------

async def _last_queries_of_the_api(conn) -> list[str]:
    return [r[0] for r in await conn.fetch(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE "
        "'segmentation-api-%' AND state = 'idle' AND query <> ''")]


async def test_a_users_segments_cost_one_round_trip(conn, http):
    """One statement per GET of a user's segments: the pool does not run asyncpg's session reset (advisory unlock,
    CLOSE ALL, UNLISTEN, RESET ALL: a second round trip) on each release, as the API changes no session state."""
    f = Feeder(conn, now=now())
    await f.apply(create("A"), update_user("u7", 7, add=["A"]))
    for _ in range(20):
        assert [s["slug"] for s in (await segments_of(http, 7))["segments"]] == ["A"]
    last = await _last_queries_of_the_api(conn)  # what each pooled connection ran last
    assert last and not [q for q in last if "RESET ALL" in q or "UNLISTEN" in q], last


async def test_a_connection_released_inside_a_transaction_comes_back_rolled_back(database_url):
    """Without the session reset, a connection given back inside a transaction (a handler cancelled mid-query)
    is still rolled back before it is reused."""
    pool = await db.create_pool(Settings(database_url=database_url), "api", 1, 1, session_reset=False)
    try:
        async with pool.acquire() as c:
            await c.execute("BEGIN; CREATE TABLE left_open (x int)")
        async with pool.acquire() as c:
            assert not c.is_in_transaction()
            assert await c.fetchval("SELECT to_regclass('left_open')") is None

        async def stuck():
            async with pool.acquire() as c, c.transaction():
                await c.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(stuck())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.acquire() as c:
            assert not c.is_in_transaction() and await c.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_a_free_connection_answers_at_once_and_a_pool_all_busy_answers_503_after_the_acquire_timeout(
        conn, settings, monkeypatch):
    """The hot path takes a free connection without asyncpg's timed acquire (a Task and a timer each); when
    none is free (here: taken by a report in progress, through the same gate), the wait is still bounded. No
    answer kept in memory (READ_CACHE_MB=0): each request needs a connection."""
    await Feeder(conn).apply(create("A"), update_user("u1", 7, add=["A"]))
    monkeypatch.setattr(api, "ACQUIRE_TIMEOUT", 0.3)
    async with api_client(settings.model_copy(update={"db_pool_min": 1, "db_pool_max": 1, "read_cache_mb": 0})) as http:
        app = http.server.app
        pool = app[api.POOL]
        for _ in range(3):  # the one connection, taken and given back each time
            r = await http.get("/api/v1/users/7/segments")
            assert r.status == 200 and [s["slug"] for s in (await r.json())["segments"]] == ["A"]
        assert pool.get_idle_size() == 1
        async with api._acquire(_Request(app)):
            started = asyncio.get_running_loop().time()
            busy = await http.get("/api/v1/users/7/segments")
            waited = asyncio.get_running_loop().time() - started
            assert busy.status == 503 and (await busy.json())["error"]["code"] == "UNAVAILABLE"
            assert 0.3 <= waited < 3
        r = await http.get("/api/v1/users/7/segments")
        assert r.status == 200 and pool.get_idle_size() == 1


async def test_requests_waiting_for_a_connection_are_served_in_their_order_of_arrival(conn, settings):
    await Feeder(conn).apply(create("A"), update_user("u1", 7, add=["A"]))
    async with api_client(settings.model_copy(update={"db_pool_min": 1, "db_pool_max": 1, "read_cache_mb": 0})) as http:
        app = http.server.app
        done: list[int] = []
        held = api._acquire(_Request(app))
        await held.__aenter__()
        waiting = []
        for n in range(4):
            task = asyncio.create_task(http.get("/api/v1/users/7/segments"))
            task.add_done_callback(lambda _, n=n: done.append(n))
            waiting.append(task)
            await wait_until(lambda n=n: _waiters(app[api.GATE], n + 1), message=f"request {n} waiting")
        await held.__aexit__(None, None, None)
        assert [r.status for r in await asyncio.gather(*waiting)] == [200] * 4
        assert done == [0, 1, 2, 3]


async def _waiters(gate, n: int) -> bool:
    return len(gate._waiters or ()) == n


class _Request:
    def __init__(self, app):
        self.app = app


async def test_an_unexpected_error_is_a_counted_500_in_the_contracts_body(http, monkeypatch):
    """A bug in a handler (not a database failure) still answers the contract's error body, and counts as a 500 in
    the metric the 5xx alert reads (aiohttp's own 500 page was neither)."""
    from prometheus_client import REGISTRY

    from service.read import views

    async def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    def count() -> float:
        return REGISTRY.get_sample_value("segmentation_http_requests_total", {
            "route": "/api/v1/users/{user_id}/segments", "method": "GET", "status": "500"}) or 0.0

    before = count()
    monkeypatch.setattr(views, "user_segments", broken)
    response = await http.get("/api/v1/users/7/segments")
    assert response.status == 500
    assert (await response.json())["error"]["code"] == "INTERNAL"
    assert count() == before + 1
