"""Who may use the staff API: named bearer tokens from the config, so one can be revoked alone."""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Mapping
from pathlib import Path

from gateway.config import ConfigError, HttpSettings


class ApiTokens:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        # Compared as digests: equal length, so compare_digest leaks nothing about length.
        self._digests = [(name, _digest(token)) for name, token in tokens.items() if token]

    def __len__(self) -> int:
        return len(self._digests)

    def name(self, authorization: str | None) -> str | None:
        """The token's name for an `Authorization: Bearer <token>` header, else None."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip())
        found = None
        for name, digest in self._digests:  # every one compared: no early exit to time
            if hmac.compare_digest(given, digest):
                found = name
        return found


def load_tokens(http: HttpSettings) -> ApiTokens:
    """`http.api_tokens` and the tokens in `http.api_tokens_file` (name = "token" lines)."""
    tokens = dict(http.api_tokens)
    if http.api_tokens_file:
        tokens.update(_read_file(Path(http.api_tokens_file)))
    for name, token in tokens.items():
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(f"http.api_tokens: the token named {name!r} is shorter than 16")
    return ApiTokens(tokens)


def _read_file(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"http.api_tokens_file: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"http.api_tokens_file: {path} is not valid TOML: {exc}") from None
    if not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f'http.api_tokens_file: {path} must hold name = "token" lines')
    return dict(data)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
