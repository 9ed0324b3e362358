"""The classification of the write path's failures (`errors`, `batch.next_step`): which are retried, which
reject the command for good (stored), which quarantine its record (its id stays free)."""
import asyncpg
import pytest
from asyncpg import exceptions as pg
from asyncpg.exceptions import _base

from service.infra.errors import is_connection_loss
from service.write.batch import Step, next_step
from service.write.decoding import InboundRecord, decode


def server_error(sqlstate: str, constraint: str | None = None) -> asyncpg.PostgresError:
    fields = {"C": sqlstate, "M": "refused"} | ({"n": constraint} if constraint else {})
    return asyncpg.PostgresError.new(fields)


def one_command():
    body = b'{"type": "UpdateUserSegments", "command_id": "c1", "user_id": 1, "add": [], "remove": []}'
    return [decode(InboundRecord("commands", 0, 0, None, body))]


@pytest.mark.parametrize("exc", [
    server_error("22003"),  # numeric value out of range
    server_error("23514"),  # check violation
    server_error("23505", "segments_slug_key"),  # a unique violation on the command's own data
    server_error("54000"),  # program limit exceeded
    _base.DataError("invalid input for query argument $1"),  # asyncpg's client-side refusal
])
def test_the_commands_data_refused_rejects_it(exc):
    assert next_step(exc, one_command(), first_attempt=True) is Step.REJECT


@pytest.mark.parametrize("exc", [
    server_error("25006"),  # read-only transaction: a failover onto a standby
    pg.InvalidCachedStatementError("cached statement plan is invalid"),  # 0A000, asyncpg says retry
    server_error("55P03"),  # lock_timeout
    server_error("40P01"),  # deadlock
    ConnectionResetError(),
])
def test_what_may_succeed_again_retries_the_batch(exc):
    assert next_step(exc, one_command(), first_attempt=True) is Step.RETRY_BATCH


@pytest.mark.parametrize("exc", [
    server_error("XX000"),  # internal error
    server_error("XX001"),  # data corrupted
    server_error("ZZ999"),  # unknown
    server_error("0A000"),  # feature not supported: the code's fault, not the command's
    server_error("42703"),  # undefined column: a bug or a missing migration
    ValueError("a bug"),
    ArithmeticError("a bug"),
    KeyError("a bug"),
])
def test_anything_else_quarantines_the_record(exc):
    assert next_step(exc, one_command(), first_attempt=True) is Step.QUARANTINE


def test_an_id_stored_meanwhile_is_redone_then_answered_as_seen():
    exc = server_error("23505", "processed_commands_pkey")  # another partition stored the same id at once
    assert next_step(exc, one_command(), first_attempt=True) is Step.REDO
    assert next_step(exc, one_command(), first_attempt=False) is Step.QUARANTINE


@pytest.mark.parametrize("exc", [pg.QueryCanceledError("statement timeout"), server_error("55P03"),
                                 server_error("40P01")])
def test_redone_record_by_record_a_retryable_error_that_is_not_connection_loss_quarantines(exc):
    assert not is_connection_loss(exc)
    assert next_step(exc, one_command(), first_attempt=True, alone=False) is Step.RETRY_BATCH
    assert next_step(exc, one_command(), first_attempt=True, alone=True) is Step.QUARANTINE


@pytest.mark.parametrize("exc", [ConnectionResetError(), TimeoutError(), pg.AdminShutdownError("shutdown"),
                                 asyncpg.ConnectionDoesNotExistError("closed")])
def test_a_connection_loss_retries_even_record_by_record(exc):
    assert is_connection_loss(exc)
    assert next_step(exc, one_command(), first_attempt=True, alone=True) is Step.RETRY_BATCH


def test_a_client_side_data_error_is_no_connection_loss():
    assert not is_connection_loss(_base.DataError("invalid input for query argument $1"))
