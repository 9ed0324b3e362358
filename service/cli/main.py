"""The `segmentation` command line: send and watch commands, write reports, run each process."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from service.infra.settings import Settings

if TYPE_CHECKING:
    from service.write.outbox import Kind

app = typer.Typer(help="segmentation: commands in through Kafka, memberships in PostgreSQL, events out.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
send_app = typer.Typer(help="Publish a command and wait for its result (exit 1 if it is rejected).",
                       no_args_is_help=True)
app.add_typer(send_app, name="send")
dlq_app = typer.Typer(help="Read and replay the dead-letter topic.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def _settings() -> Settings:
    from service.infra import logs

    settings = Settings()
    logs.setup(settings.log_level, settings.log_format)
    return settings


def _new_id() -> str:
    return str(uuid.uuid4())


# ---- processes ----------------------------------------------------------------------------------------

def _run_process(main_coroutine) -> None:
    """A long-running process on uvloop (asyncpg round trips and aiohttp cost a third less client CPU), with the
    garbage collector tuned for it (`runtime.tune_gc`)."""
    import uvloop

    from service.infra import runtime

    runtime.tune_gc()
    uvloop.run(main_coroutine)


def _run_with_metrics(main) -> None:
    from service.infra import metrics

    settings = _settings()
    metrics.serve(settings.metrics_port)
    _run_process(main(settings))


@app.command()
def worker() -> None:
    """Run a command worker (one member of the consumer group)."""
    from consumers.worker import main

    _run_with_metrics(main)


@app.command()
def relay() -> None:
    """Run the outbox relay (several share the outbox shards; each key's rows leave from one of them)."""
    from producers.relay import main

    _run_with_metrics(main)


@app.command()
def ttl() -> None:
    """Run the TTL producer (one active at a time; others stand by)."""
    from producers.ttl import main

    _run_with_metrics(main)


@app.command()
def api(processes: int | None = typer.Option(
        None, min=1, help="Processes to start on the one port (default: API_PROCESSES, 1).")) -> None:
    """Run the read-only HTTP API (metrics at /metrics)."""
    settings = _settings()
    count = settings.api_processes if processes is None else processes
    if count > 1:
        from service.dev import supervisor

        raise typer.Exit(supervisor.serve_api(count))
    from service.read.api import main

    _run_process(main(settings))


@app.command()
def migrate(create_database: bool = typer.Option(False, help="Create the database first if it is missing.")) -> None:
    """Apply the database migrations."""
    from service.infra import db

    settings = _settings()

    async def go() -> list[str]:
        if create_database:
            await db.ensure_database(settings.database_url)  # waits for the server itself
        else:
            await db.wait_for(settings.database_url)
        return await db.migrate(settings.database_url)

    applied = asyncio.run(go())
    typer.echo(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")


@app.command()
def topics() -> None:
    """Create the service's Kafka topics (those missing)."""
    from service.infra import kafka

    created = asyncio.run(kafka.create_topics(_settings()))
    typer.echo(f"topics created: {', '.join(created) or 'none (all exist)'}")


@app.command()
def dev(workers: int = typer.Option(1, min=1, help="Worker processes to start."),
        relays: int = typer.Option(1, min=1, help="Relay processes to start (they share the outbox shards)."),
        api_processes: int = typer.Option(2, min=1, envvar="API_PROCESSES",
                                          help="API processes to start on the one HTTP port.")) -> None:
    """Everything on one machine: embedded PostgreSQL and broker, topics, migrations, all processes."""
    from service.dev import supervisor as dev_stack

    os.environ.setdefault("LOG_FORMAT", "text")  # a person reads these logs; the processes inherit it
    _settings()
    raise typer.Exit(dev_stack.run(workers, relays, api_processes))


@app.command("export-schemas")
def export_schemas(out: Path = typer.Option(Path("docs"), help="Folder to write into.")) -> None:
    """Write the JSON Schema of every message, the OpenAPI and the AsyncAPI documents."""
    from schemas.export import export

    for path in export(out):
        typer.echo(path)


# ---- send ---------------------------------------------------------------------------------------------

def _send(command_json: dict, wait: bool, timeout: float) -> None:
    from pydantic import ValidationError

    from producers.client import ResultTimeoutError, SegmentationClient
    from schemas import COMMAND_ADAPTER, CommandResult

    try:
        command = COMMAND_ADAPTER.validate_python(command_json)
    except ValidationError as exc:
        typer.echo(f"not a valid command: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = Settings()

    async def go() -> CommandResult | None:
        async with SegmentationClient(settings) as client:
            return await client.send(command, wait=wait, timeout=timeout)

    from aiokafka.errors import KafkaError, MessageSizeTooLargeError

    try:
        result = asyncio.run(go())
    except ResultTimeoutError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(3) from None
    except MessageSizeTooLargeError:
        size = len(command.model_dump_json(exclude_none=True).encode())
        typer.echo(f"the command is too large for Kafka: {size} bytes, over the broker's topic limit or "
                   f"KAFKA_MAX_REQUEST_SIZE={settings.kafka_max_request_size} (split it)", err=True)
        raise typer.Exit(2) from None
    except KafkaError as exc:
        typer.echo(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc}", err=True)
        raise typer.Exit(3) from None
    if result is None:
        typer.echo(json.dumps({"command_id": command.command_id, "status": "sent"}))
        return
    typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    if result.status != "applied":
        raise typer.Exit(1)


WAIT = typer.Option(True, "--wait/--no-wait", help="Wait for the command's result.")
TIMEOUT = typer.Option(30.0, help="Seconds to wait for the result.")
COMMAND_ID = typer.Option(None, "--command-id", help="Idempotency key (default: a new UUID).")


@send_app.command("raw")
def send_raw(body: str = typer.Argument(..., help="The command as JSON, or - to read it from stdin."),
             wait: bool = WAIT, timeout: float = TIMEOUT) -> None:
    """Publish any command given as JSON (a missing command_id gets a new UUID)."""
    text = sys.stdin.read() if body == "-" else body
    try:
        obj = json.loads(text)
    except ValueError as exc:
        typer.echo(f"not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    if isinstance(obj, dict):
        obj.setdefault("command_id", _new_id())
    _send(obj, wait, timeout)


@send_app.command("create-segment")
def send_create_segment(slug: str, description: str | None = None,
                        percent: Decimal | None = typer.Option(None, help="Roll out to this percent of users."),
                        layer: str | None = typer.Option(None, help="Exclusive rollout with this layer's segments."),
                        command_id: str | None = COMMAND_ID, wait: bool = WAIT, timeout: float = TIMEOUT) -> None:
    """CreateSegment."""
    _send({"type": "CreateSegment", "command_id": command_id or _new_id(), "slug": slug,
           "description": description, "auto_percent": percent, "layer": layer}, wait, timeout)


@send_app.command("update-segment")
def send_update_segment(slug: str, description: str | None = None, percent: Decimal | None = None,
                        command_id: str | None = COMMAND_ID, wait: bool = WAIT, timeout: float = TIMEOUT) -> None:
    """UpdateSegment: a new description or rollout percent."""
    _send({"type": "UpdateSegment", "command_id": command_id or _new_id(), "slug": slug,
           "description": description, "auto_percent": percent}, wait, timeout)


@send_app.command("delete-segment")
def send_delete_segment(slug: str, command_id: str | None = COMMAND_ID, wait: bool = WAIT,
                        timeout: float = TIMEOUT) -> None:
    """DeleteSegment: every member leaves it."""
    _send({"type": "DeleteSegment", "command_id": command_id or _new_id(), "slug": slug}, wait, timeout)


@send_app.command("update-user")
def send_update_user(
    user_id: int,
    add: list[str] = typer.Option([], "--add", help="Slug to add; SLUG@SECONDS gives it a TTL."),
    remove: list[str] = typer.Option([], "--remove", help="Slug to remove."),
    ttl: int | None = typer.Option(None, help="Default TTL in seconds for every added slug."),
    command_id: str | None = COMMAND_ID, wait: bool = WAIT, timeout: float = TIMEOUT,
) -> None:
    """UpdateUserSegments: add and remove in one atomic step."""
    adds = []
    for item in add:
        slug, _, seconds = item.partition("@")
        if seconds and not seconds.isdigit():
            typer.echo(f"--add {item}: the TTL after @ must be a whole number of seconds", err=True)
            raise typer.Exit(2)
        adds.append({"slug": slug, "ttl_seconds": int(seconds)} if seconds else slug)
    _send({"type": "UpdateUserSegments", "command_id": command_id or _new_id(), "user_id": user_id,
           "add": adds, "remove": remove, "ttl_seconds": ttl}, wait, timeout)


@send_app.command("update-segment-members",
                  context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def send_update_segment_members(
    ctx: typer.Context,
    slug: str,
    add_file: Path | None = typer.Option(None, "--add-file", help="File of user ids to add, one a line."),
    ttl: int | None = typer.Option(None, help="TTL in seconds for every added user."),
    expires_at: str | None = typer.Option(None, "--expires-at", help="Expiry (RFC 3339) for every added user."),
    starts_at: str | None = typer.Option(None, "--starts-at", help="Start (RFC 3339) for every added user."),
    command_id: str | None = COMMAND_ID, wait: bool = WAIT, timeout: float = TIMEOUT,
) -> None:
    """UpdateSegmentMembers: --add 1 2 3 --remove 4 (several ids after each), for one segment in one atomic step."""
    lists: dict[str, list[int]] = {"--add": [], "--remove": []}
    current = None
    for token in ctx.args:
        if token in lists:
            current = lists[token]
        elif current is not None and token.isdigit():
            current.append(int(token))
        else:
            typer.echo(f"unexpected {token!r}: give user ids after --add or --remove", err=True)
            raise typer.Exit(2)
    if add_file is not None:
        try:
            lines = add_file.read_text().split()
        except OSError as exc:
            typer.echo(f"--add-file: {exc}", err=True)
            raise typer.Exit(2) from None
        bad = [x for x in lines if not x.isdigit()]
        if bad:
            typer.echo(f"--add-file: not a user id: {bad[0]!r}", err=True)
            raise typer.Exit(2)
        lists["--add"] += [int(x) for x in lines]
    _send({"type": "UpdateSegmentMembers", "command_id": command_id or _new_id(), "slug": slug,
           "add": lists["--add"], "remove": lists["--remove"], "ttl_seconds": ttl, "expires_at": expires_at,
           "starts_at": starts_at}, wait, timeout)


@send_app.command("register-users")
def send_register_users(user_ids: list[int], command_id: str | None = COMMAND_ID, wait: bool = WAIT,
                        timeout: float = TIMEOUT) -> None:
    """RegisterUsers: make users known so rollouts reach them with events."""
    _send({"type": "RegisterUsers", "command_id": command_id or _new_id(), "user_ids": user_ids}, wait, timeout)


# ---- dead letters -------------------------------------------------------------------------------------

DLQ_CODE = typer.Option(None, "--code", help="Only letters with this error.code (e.g. INVALID_FIELDS).")
DLQ_LIMIT = typer.Option(0, "--limit", min=0, help="At most this many letters (0: all).")


def _kafka_call(coro):
    from aiokafka.errors import KafkaError

    settings = Settings()
    try:
        return asyncio.run(coro(settings))
    except KafkaError as exc:
        typer.echo(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc}", err=True)
        raise typer.Exit(3) from None


@dlq_app.command("list")
def dlq_list(code: str | None = DLQ_CODE, limit: int = DLQ_LIMIT) -> None:
    """Print the dead letters, one JSON line each: position, code, message, key, the start of the value."""
    from producers.dlq import letters

    async def go(settings: Settings) -> int:
        count = 0
        async for letter in letters(settings, code, limit):
            typer.echo(json.dumps(letter.summary()))
            count += 1
        return count

    typer.echo(f"{_kafka_call(go)} dead letters", err=True)


@dlq_app.command("replay")
def dlq_replay(code: str | None = DLQ_CODE, limit: int = DLQ_LIMIT,
               dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be sent; send nothing.")) -> None:
    """Publish dead letters again to their source topic (original key and bytes, a replayed-from header), up to
    the end of the dead-letter topic as it is now. Truncated letters are listed, not replayed."""
    from producers.dlq import replay

    def show(letter) -> None:
        if letter.truncated or not letter.headers.get("source.topic"):
            action = "skipped (truncated)" if letter.truncated else "skipped (no source.topic)"
        else:
            action = "would replay" if dry_run else "replayed"
        typer.echo(json.dumps({"action": action} | letter.summary(60)))

    async def go(settings: Settings):
        return await replay(settings, code, limit, dry_run, show)

    report = _kafka_call(go)
    verb = "would replay" if dry_run else "replayed"
    typer.echo(f"{verb} {report.sent} dead letters; {report.truncated} truncated (not replayed)"
               + (f"; {report.no_source} without source.topic (not replayed)" if report.no_source else ""))


# ---- watch and report ---------------------------------------------------------------------------------

# What the messages of each topic carry, for the filters of `watch`: their `type` values (None: any command
# type) and the fields the other filters look at.
WATCH_TYPES: dict[Kind, set[str] | None] = {"membership": {"MembershipChanged"}, "segment": {"SegmentChanged"},
                                           "result": None, "dlq": set()}
WATCH_FIELDS: dict[Kind, set[str]] = {"membership": {"user_id", "slug", "change"}, "segment": {"slug", "change"},
                                      "result": set(), "dlq": set()}
CHANGES = ("added", "removed", "created", "updated", "deleted")


@app.command()
def watch(
    topic: list[str] = typer.Option([], "--topic", help="membership, segment, result (or results), dlq "
                                    "(repeatable; default: every topic whose messages can match the filters)."),
    user: list[int] = typer.Option([], "--user", help="Only events of this user id (repeatable)."),
    slug: list[str] = typer.Option([], "--slug", help="Only events of this segment (repeatable)."),
    type_: list[str] = typer.Option([], "--type", help="Only messages of this type: MembershipChanged, "
                                    "SegmentChanged, or a command's type for results (repeatable)."),
    change: list[str] = typer.Option([], "--change", help="Only events of this change: added, removed, created, "
                                     "updated, deleted (repeatable)."),
    from_beginning: bool = typer.Option(False, help="Start at the oldest message, not the newest."),
    limit: int = typer.Option(0, help="Stop after this many messages (0: never)."),
) -> None:
    """Print events, results and dead letters as they arrive, one JSON line each, each once (deduplicated by
    event_id). A message is printed when it matches every filter given (any value of a repeated one)."""
    from producers.client import InvalidMessageError, Subscription
    from schemas.commands import COMMAND_TYPES

    kinds = [{"results": "result"}.get(t, t) for t in topic] or list(WATCH_TYPES)  # "results": its first name
    known_types = {"MembershipChanged", "SegmentChanged", *COMMAND_TYPES}
    problems = [f"unknown topic {t!r} (one of membership, segment, result, dlq)" for t in kinds
                if t not in WATCH_TYPES]
    problems += [f"unknown --type {t!r} (one of {', '.join(sorted(known_types))})" for t in type_
                 if t not in known_types]
    problems += [f"unknown --change {c!r} (one of {', '.join(CHANGES)})" for c in change if c not in CHANGES]
    if problems:
        typer.echo("; ".join(problems), err=True)
        raise typer.Exit(2)
    wanted: dict[str, set] = {"user_id": set(user), "slug": set(slug), "change": set(change), "type": set(type_)}
    fields = {name for name, values in wanted.items() if values} - {"type"}
    matching = [k for k in WATCH_TYPES if k in kinds and fields <= WATCH_FIELDS[k]
                and (not type_ or (types := WATCH_TYPES[k]) is None or bool(types & wanted["type"]))]
    if not matching:
        typer.echo(f"no message of {', '.join(kinds)} can match these filters", err=True)
        raise typer.Exit(2)
    filtered = any(wanted.values())
    settings = Settings()

    def selected(item: object) -> bool:
        return all(getattr(item, name, None) in values for name, values in wanted.items() if values)

    async def go() -> None:
        printed = 0
        async with Subscription(settings, matching, from_beginning=from_beginning) as messages:
            typer.echo(f"watching {', '.join(matching)} from the {'beginning' if from_beginning else 'end'}",
                       err=True)
            while not limit or printed < limit:
                error = None
                try:
                    if not selected(await anext(messages)):
                        continue
                except InvalidMessageError as exc:  # printed as it is, unless a filter asks for fields
                    if filtered:
                        continue
                    error = str(exc)
                assert messages.record is not None  # set by every message read
                typer.echo(json.dumps(_watch_line(messages.record, error, settings.dlq_topic)))
                printed += 1

    try:
        _kafka_call(lambda _settings: go())
    except KeyboardInterrupt:
        pass


def _watch_line(record, error: str | None, dlq_topic: str) -> dict:
    """What `watch` prints of one record: where it is, its key, its value as published (and a letter's headers)."""
    try:
        value = json.loads(record.value) if record.value is not None else None  # None: a tombstone
    except ValueError:
        value = record.value.decode(errors="replace")
    line = {"topic": record.topic, "partition": record.partition, "offset": record.offset,
            "key": record.key.decode(errors="replace") if record.key else None, "value": value}
    if record.topic == dlq_topic:
        line["headers"] = {k: v.decode(errors="replace") for k, v in record.headers}
    if error is not None:
        line["error"] = error
    return line


@app.command()
def report(
    month: str = typer.Argument(..., help="YYYY-MM (UTC)."),
    to: str | None = typer.Option(None, "--to", help="The last month YYYY-MM of a period (at most 120 months)."),
    user: int | None = typer.Option(None, "--user", help="Only this user's rows."),
    slug: str | None = typer.Option(None, "--slug", help="Only this segment's rows."),
    api_url: str | None = typer.Option(None, "--api", help="Base URL of the API (default: HTTP_HOST:HTTP_PORT)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="File to write (default: stdout)."),
) -> None:
    """Write a month's (or a period's) membership history CSV, streamed from the API. With the API's
    API_TOKENS set, give the token in SEGMENTATION_API_TOKEN."""
    from service.cli.report_client import download

    for value in (month, to):
        year, _, mon = (value or "2000-01").partition("-")
        if not (len(year) == 4 and year.isdigit() and len(mon) == 2 and mon.isdigit() and 1 <= int(mon) <= 12):
            typer.echo("months must look like 2026-11", err=True)
            raise typer.Exit(2)
    year, _, mon = month.partition("-")
    params = {"from": month, "to": to} if to else {"year": year, "month": str(int(mon))}
    params |= ({"user_id": str(user)} if user else {}) | ({"slug": slug} if slug else {})
    settings = Settings()
    base = api_url or f"http://{settings.http_host}:{settings.http_port}"
    raise typer.Exit(asyncio.run(download(base, params, output)))

