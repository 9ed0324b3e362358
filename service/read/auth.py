"""Bearer tokens (API_TOKENS): plain entries or `sha256:<hex>` digests, compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
import re

_HEX = re.compile(r"[0-9a-f]{64}")


def digests(setting: str | None) -> tuple[bytes, ...]:
    """The SHA-256 digests of the accepted tokens (empty: the API is open). A bad `sha256:` entry raises."""
    out = []
    for entry in (setting or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.lower().startswith("sha256:"):
            digest = entry[len("sha256:"):].strip().lower()
            if not _HEX.fullmatch(digest):
                raise ValueError("API_TOKENS: a sha256: entry needs 64 hex digits")
            out.append(bytes.fromhex(digest))
        else:
            out.append(hashlib.sha256(entry.encode()).digest())
    return tuple(out)


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def accepted(token: str | None, allowed: tuple[bytes, ...]) -> bool:
    """Every entry is compared, digest to digest: the time says nothing about the token or which entry."""
    presented = hashlib.sha256((token or "").encode()).digest()
    matched = False
    for digest in allowed:
        matched |= hmac.compare_digest(presented, digest)
    return matched and token is not None
