"""Shared field types of the contract."""
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_USER_ID = 2**63 - 1


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+23:59
        raise ValueError("the time is out of range in UTC") from None


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, microseconds kept."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcTime = Annotated[
    AwareDatetime, AfterValidator(_utc), PlainSerializer(format_time, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Slug = Annotated[str, Field(pattern=SLUG_PATTERN, examples=["AVITO_VOICE_MESSAGES"])]
UserId = Annotated[int, Field(ge=1, le=MAX_USER_ID, strict=True, examples=[1000])]
# No NUL: PostgreSQL text cannot hold it.
CommandId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$",
                                 examples=["7f8e2a6c-4d8b-4d8e-9c57-1f0cf6f2b1a1"])]
Description = Annotated[str, Field(max_length=1000, pattern=r"^[^\x00]*$")]
Percent = Annotated[
    Decimal,
    Field(ge=0, le=100, max_digits=5, decimal_places=2, examples=[10, 12.5]),
    PlainSerializer(float, return_type=float),
    # No "multipleOf": 0.01: with binary floats validators reject 0.07 and the like.
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": 100, "description": "percent, at most 2 decimals"}),
]


class Message(BaseModel):
    """Base of every wire message: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_serialization_defaults_required=True)
