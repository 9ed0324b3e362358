"""The rollout bucket: a fixed, documented hash anyone can reproduce offline.

bucket(salt, user_id) = int(sha256(f"{salt}:{user_id}").hexdigest()[:8], 16) % 10000

The same formula is the SQL function `segment_bucket` (migrations/001_init.sql), used by set-based
fan-outs; a test checks that both agree.
"""
from decimal import Decimal
from hashlib import sha256

BUCKETS = 10_000


def bucket(salt: str, user_id: int) -> int:
    """The user's bucket 0..9 999 for a segment salt."""
    return int(sha256(f"{salt}:{user_id}".encode()).hexdigest()[:8], 16) % BUCKETS


def threshold(auto_percent: Decimal | float | int) -> int:
    """The bucket line of a percent: users with a bucket below it are in the rollout."""
    return int(Decimal(str(auto_percent)) * 100)


def in_rollout(salt: str, user_id: int, auto_percent: Decimal | float | int) -> bool:
    return bucket(salt, user_id) < threshold(auto_percent)


def segment_salt(slug: str, segment_id: int) -> str:
    """The default salt: the slug plus its incarnation id, so a re-created slug draws anew."""
    return f"{slug}:{segment_id}"
