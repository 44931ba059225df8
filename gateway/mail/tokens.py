"""Signed tokens for reply addresses and score links (PRODUCT §2.4 rung 1, §4, §6).

A token packs purpose, ECR, contact, a counter (the resolution number for score links) and an
expiry day, and a truncated HMAC-SHA256 over all of it, so neither purpose nor expiry can be
changed without the key. It is lower-case base32: reply tokens live in an address's local part,
which some mail systems fold to lower case. Several keys verify (rotation); the first signs.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

VERSION = 1
MAC_BYTES = 10  # 80 bits: far beyond guessing within any sender's rate limit
_BODY = struct.Struct(">BBIIHH")  # version, purpose, ecr, contact, counter, expiry day
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


class Purpose(enum.IntEnum):
    REPLY = 1
    SCORE = 2


class TokenError(Exception):
    """Why a token does not verify: malformed, tampered, another purpose, or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Token:
    purpose: Purpose
    ecr_id: int
    contact_id: int
    counter: int
    expires: datetime


def issue(
    key: bytes,
    purpose: Purpose,
    ecr_id: int,
    contact_id: int,
    counter: int,
    now: datetime,
    valid_for: timedelta,
) -> str:
    day = min((now + valid_for - EPOCH).days + 1, 0xFFFF)
    body = _BODY.pack(VERSION, purpose, ecr_id, contact_id, counter & 0xFFFF, day)
    return _b32(body + _mac(key, body))


def verify(keys: list[bytes], text: str, purpose: Purpose, now: datetime) -> Token:
    raw = _unb32(text)
    if raw is None or len(raw) != _BODY.size + MAC_BYTES:
        raise TokenError("malformed")
    body, mac = raw[: _BODY.size], raw[_BODY.size :]
    if not any(hmac.compare_digest(_mac(k, body), mac) for k in keys):
        raise TokenError("tampered")
    version, got, ecr_id, contact_id, counter, day = _BODY.unpack(body)
    if version != VERSION or got != purpose:
        raise TokenError("wrong purpose")
    expires = EPOCH + timedelta(days=day)
    if now >= expires:
        raise TokenError("expired")
    return Token(Purpose(got), ecr_id, contact_id, counter, expires)


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes | None:
    text = text.strip().upper()
    if not text or len(text) > 100 or not text.isalnum():
        return None
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (ValueError, TypeError):
        return None
