"""The rollout bucket: a fixed, documented hash anyone can reproduce offline.

bucket(salt, user_id) = int(sha256(f"{salt}:{user_id}").hexdigest()[:8], 16) % 10000

The same formula is the SQL function `segment_bucket` (migrations/010_fan_out_per_row.sql), used by set-based
fan-outs; a test checks that both agree.

Layers: the segments of a layer share the salt `layer:<name>`; each owns a contiguous range of that hash's
buckets, allocated first-fit and kept (same start) when its percent changes.
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


def layer_salt(layer: str) -> str:
    """The salt every segment of a layer hashes with: one bucket per user for the whole layer."""
    return f"layer:{layer}"


Range = tuple[int, int]  # [start, end) of bucket numbers


def first_fit(taken: list[Range], size: int) -> int | None:
    """The lowest start of `size` free buckets between the `taken` ranges; None if no gap is that wide."""
    position = 0
    for start, end in sorted(r for r in taken if r[1] > r[0]):
        if start - position >= size:
            return position
        position = max(position, end)
    return position if BUCKETS - position >= size else None


def layer_range(taken: list[Range], start: int | None, size: int) -> Range | None:
    """A segment's range for `size` buckets: its `start` kept if it has one, else first-fit; None if the space
    is held by `taken` (the other live segments of the layer) or runs past the last bucket."""
    if start is None:
        start = first_fit(taken, size)
        return None if start is None else (start, start + size)
    end = start + size
    if end > BUCKETS or any(s < end and start < e for s, e in taken if e > s):
        return None
    return start, end
