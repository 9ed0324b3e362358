"""Parsing and checking the read API's path and query parameters; bad input raises InputError (a 400)."""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.common import MAX_USER_ID, SLUG_PATTERN

_SLUG = re.compile(SLUG_PATTERN)
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
MIN_YEAR, MAX_YEAR = 1970, 9998  # 9998: the month after the last one must exist too
MAX_REPORT_MONTHS = 120
MAX_WAIT_MS = 10_000
DEFAULT_WAIT_MS = 5_000
MAX_PAGE, DEFAULT_PAGE = 10_000, 1_000


class InputError(Exception):
    """Bad input: answered 400 with the contract's error body."""


_DIGITS = re.compile(r"[0-9]{1,19}")


def integer(value: str | None, name: str, low: int, high: int, required: bool = True) -> int | None:
    if value is None:  # absent; given but empty is not a number
        if required:
            raise InputError(f"{name} is required")
        return None
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise InputError(f"{name} must be an integer from {low} to {high}")
    return int(value)


def required_integer(value: str | None, name: str, low: int, high: int) -> int:
    number = integer(value, name, low, high)
    assert number is not None  # required: integer() raised InputError otherwise
    return number


def user_id(value: str | None) -> int:
    return required_integer(value, "user_id", 1, MAX_USER_ID)


def flag(value: str | None, name: str) -> bool:
    text = "false" if value is None else value.lower()
    if text not in ("true", "false", "1", "0"):
        raise InputError(f"{name} must be true or false")
    return text in ("true", "1")


def slug(value: str, name: str = "slug") -> str:
    if not _SLUG.fullmatch(value):
        raise InputError(f"{name} is not a valid slug: {value!r}")
    return value


def command_id(value: str, name: str = "command_id") -> str:
    if not 1 <= len(value) <= 128 or "\x00" in value:
        raise InputError(f"{name} must have 1 to 128 characters, none of them NUL")
    return value


def instant(value: str, now: datetime, name: str = "at") -> datetime:
    """An RFC 3339 time, not in the future."""
    text = value.upper()
    if not _RFC3339.fullmatch(text):
        raise InputError(f"{name} must be an RFC 3339 time, e.g. 2026-11-03T10:00:00Z")
    head, dot, rest = text.partition(".")
    if dot:  # Python keeps microseconds: cut longer fractions
        digits = re.match(r"[0-9]+", rest)
        assert digits is not None  # the pattern requires digits after the dot
        text = f"{head}.{digits.group()[:6]}{rest[digits.end():]}"
    try:
        moment = datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError):
        raise InputError(f"{name} is not a valid time: {value!r}") from None
    if moment > now:
        raise InputError(f"{name} is in the future")
    return moment


def wait_ms(value: str | None) -> int:
    number = integer(value, "wait_ms", 0, MAX_WAIT_MS, required=False)
    return DEFAULT_WAIT_MS if number is None else number


def page_limit(value: str | None) -> int:
    number = integer(value, "limit", 1, MAX_PAGE, required=False)
    return DEFAULT_PAGE if number is None else number


def encode_cursor(last_user_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_user_id}".encode()).decode().rstrip("=")


def decode_cursor(value: str | None) -> int:
    """The user id a page starts after (0: the first page)."""
    if value is None:
        return 0
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InputError("cursor is not one this API gave") from None
    match = re.fullmatch(r"after:([0-9]{1,19})", text)
    if not match or not 1 <= int(match.group(1)) <= MAX_USER_ID:
        raise InputError("cursor is not one this API gave")
    return int(match.group(1))


@dataclass(frozen=True)
class Period:
    """The UTC months of a history report, first to last (both included), and its filters."""

    first: tuple[int, int]
    last: tuple[int, int]
    by_months: bool  # asked with from/to rather than year/month
    user_id: int | None
    slug: str | None

    @property
    def start(self) -> datetime:
        return datetime(*self.first, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        year, month = self.last
        return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)

    def query(self) -> dict[str, str | int]:
        """The same query, for the link."""
        if self.by_months:
            out: dict[str, str | int] = {"from": _month_text(self.first), "to": _month_text(self.last)}
        else:
            out = {"year": self.first[0], "month": self.first[1]}
        if self.user_id is not None:
            out["user_id"] = self.user_id
        if self.slug is not None:
            out["slug"] = self.slug
        return out

    def filename(self) -> str:
        span = _month_text(self.first) + ("" if self.first == self.last else f"--{_month_text(self.last)}")
        return (f"history-{span}" + (f"-user-{self.user_id}" if self.user_id else "")
                + (f"-{self.slug}" if self.slug else "") + ".csv")


def _month_text(month: tuple[int, int]) -> str:
    return f"{month[0]:04d}-{month[1]:02d}"


def _month(value: str | None, name: str) -> tuple[int, int]:
    match = _MONTH.fullmatch(value or "")
    if not match or not MIN_YEAR <= int(match.group(1)) <= MAX_YEAR or not 1 <= int(match.group(2)) <= 12:
        raise InputError(f"{name} must be a month YYYY-MM from {MIN_YEAR}-01 to {MAX_YEAR}-12")
    return int(match.group(1)), int(match.group(2))


def period(query) -> Period:
    """year and month, or from and to (at most MAX_REPORT_MONTHS months); user_id and slug optional."""
    by_months = "from" in query or "to" in query
    if by_months and ("year" in query or "month" in query):
        raise InputError("give either year and month, or from and to")
    if by_months:
        first, last = _month(query.get("from"), "from"), _month(query.get("to"), "to")
        months = (last[0] - first[0]) * 12 + last[1] - first[1] + 1
        if months < 1:
            raise InputError("from must not come after to")
        if months > MAX_REPORT_MONTHS:
            raise InputError(f"at most {MAX_REPORT_MONTHS} months from `from` to `to`")
    else:
        year = required_integer(query.get("year"), "year", MIN_YEAR, MAX_YEAR)
        first = last = (year, required_integer(query.get("month"), "month", 1, 12))
    slug_filter = query.get("slug")
    return Period(first, last, by_months, integer(query.get("user_id"), "user_id", 1, MAX_USER_ID, required=False),
                  None if slug_filter is None else slug(slug_filter))
