"""What an exception means for the work in hand. The one place that classifies errors.

- `UNAVAILABLE`: PostgreSQL is down, unreachable or refusing work (shutting down, out of resources, a
  connection lost or timed out). Nothing was decided: try again later (the API answers 503).
- `RETRYABLE`: the same work, done again, can succeed: everything `UNAVAILABLE`, plus a transaction that
  PostgreSQL rolled back for concurrency (deadlock, serialization failure), a `lock_timeout` (the command
  waited behind a fan-out; it is not wrong), a `statement_timeout` (query canceled: fan-outs are cut into
  slices so that no statement of a valid command runs into it), a read-only transaction (a failover onto a
  standby) and a cached statement the schema invalidated. A batch that meets one is rolled back and retried
  whole; no command is judged on it.
- `is_stored_meanwhile`: a unique violation on the inbox key: the same command id was stored at once by
  another partition. The command is not wrong: done again, it is answered as seen (a duplicate or conflict).
- `is_connection_loss`: the retryable errors that say nothing about the work (the server cannot be reached
  or is refusing all work). Any other retryable error (a timeout, a lock wait, a deadlock, ...) may be one
  record's doing: the worker retries a batch that keeps meeting one a few times, then record by record.
- `DATABASE_FAILURE`: anything a call to PostgreSQL can raise; the loops of the processes (the worker's
  batch retry, a leader's lock loop, waiting for the server) retry all of it.
- `is_content_error`, an allow-list: the database refused the command's own data (SQLSTATE class 22 data
  exception, class 23 integrity violation, class 54 program limit) or asyncpg refused an argument
  (its client-side `DataError`). Done again it gives the same answer: the command is rejected for good.
- Anything else (an internal error of the server, an unknown SQLSTATE, a ValueError of the code) is no
  decision about the command: its record is quarantined (a dead letter, its id stays free for a replay).
  Rules say what they decide by raising `CommandRejectedError`.
"""
from __future__ import annotations

import asyncpg
from asyncpg import exceptions as pg
from asyncpg.exceptions import _base

INBOX_KEY = "processed_commands_pkey"  # a unique violation on it: the id was stored meanwhile, not a bad command
CONTENT_CLASSES = ("22", "23", "54")  # data exception, integrity constraint violation, program limit exceeded

UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    pg.OperatorInterventionError,  # admin shutdown, cannot connect now, query canceled
    pg.InsufficientResourcesError,  # disk full, out of memory, too many connections
)
RETRYABLE: tuple[type[BaseException], ...] = UNAVAILABLE + (
    pg.TransactionRollbackError,  # deadlock, serialization failure
    pg.LockNotAvailableError,  # lock_timeout: the command waited behind another transaction, it is not wrong
    pg.ReadOnlySQLTransactionError,  # 25006: connected to a standby (a failover); the next connection may not be
    pg.InvalidCachedStatementError,  # 0A000 after a schema change: asyncpg says to retry
)
DATABASE_FAILURE: tuple[type[BaseException], ...] = (
    TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
)


class UnfinishedWorkError(Exception):
    """Work that was started and committed in part, and must be finished, failed (a rollout's later pass): never a
    rejection nor a dead letter, the worker retries the batch whatever the cause (`__cause__`)."""


RETRIED: tuple[type[BaseException], ...] = (*DATABASE_FAILURE, UnfinishedWorkError)  # what the worker's loop retries


def is_stored_meanwhile(exc: BaseException) -> bool:
    return isinstance(exc, pg.UniqueViolationError) and exc.constraint_name == INBOX_KEY


def is_connection_loss(exc: BaseException) -> bool:
    return is_retryable(exc) and isinstance(exc, UNAVAILABLE) and not isinstance(exc, pg.QueryCanceledError)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _base.DataError):  # an InterfaceError, but a deterministic refusal of the command's values
        return False
    return isinstance(exc, RETRYABLE)


def is_content_error(exc: BaseException) -> bool:
    """The database (or asyncpg) refused the command's data: reject the command, store its rejection."""
    if isinstance(exc, _base.DataError):
        return True
    if not isinstance(exc, asyncpg.PostgresError) or is_retryable(exc) or is_stored_meanwhile(exc):
        return False
    return (exc.sqlstate or "")[:2] in CONTENT_CLASSES
