"""Security headers on every response, as plain ASGI middleware (no per-request objects).

Pages load nothing but our own stylesheet and run no script, so the policy can be strict:
nothing from anywhere else, no framing, forms post only to us. `no-store` because a score
page is reached through a capability URL and an API answer may carry patient data.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: tuple[tuple[bytes, bytes], ...] = tuple(
    (k.encode("latin-1"), v.encode("latin-1"))
    for k, v in (
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    )
)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = _merged(list(message.get("headers", [])))
            await send(message)

        await self.app(scope, receive, with_headers)


def _merged(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Ours added; a route that set one of them itself (a stricter CSP) keeps its own."""
    present = {k.lower() for k, _ in headers}
    return headers + [(k, v) for k, v in HEADERS if k not in present]
