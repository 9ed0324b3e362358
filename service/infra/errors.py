"""What an exception means for the work in hand. The one place that classifies errors.

- `UNAVAILABLE`: PostgreSQL is down, unreachable or refusing work (shutting down, out of resources, a
  connection lost or timed out). Nothing was decided: try again later (the API answers 503).
- `RETRYABLE`: the same work, done again, can succeed: everything `UNAVAILABLE`, plus a transaction that
  PostgreSQL rolled back for concurrency (deadlock, serialization failure). A batch that meets one is rolled
  back and retried whole; no command is judged on it. A `lock_timeout` is one (the command waited behind a
  fan-out; it is not wrong), and so is a `statement_timeout` (query canceled): fan-outs are cut into slices
  so that no statement of a valid command runs into it.
- `DATABASE_FAILURE`: anything a call to PostgreSQL can raise; the loops of the processes (the worker's
  batch retry, a leader's lock loop, waiting for the server) retry all of it.
- Everything else a command's transaction raises is the command's own fault (`is_content_error`): its data
  broke a rule of the database or of the code; doing it again gives the same answer.
"""
from __future__ import annotations

import asyncpg
from asyncpg import exceptions as pg

UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    pg.OperatorInterventionError,  # admin shutdown, cannot connect now, query canceled
    pg.InsufficientResourcesError,  # disk full, out of memory, too many connections
)
RETRYABLE: tuple[type[BaseException], ...] = UNAVAILABLE + (
    pg.TransactionRollbackError,  # deadlock, serialization failure
    pg.LockNotAvailableError,  # lock_timeout: the command waited behind another transaction, it is not wrong
)
DATABASE_FAILURE: tuple[type[BaseException], ...] = (
    TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE)


def is_content_error(exc: BaseException) -> bool:
    """The database refused the command's data, or a rule met values it cannot handle: reject the command."""
    return isinstance(exc, asyncpg.PostgresError | ArithmeticError | ValueError) and not is_retryable(exc)
