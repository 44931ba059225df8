"""A real aiosmtpd server on a loopback port, run in a thread: the test relay for our mails.

Bound with loop.create_server(port=0) because aiosmtpd's Controller does not report the port
the OS chose (STYLE.md, traps).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]


@dataclass
class Handler:
    """Records each mail; `answer` may turn the relay away (a reply code string)."""

    captured: list[Captured] = field(default_factory=list)
    answer: str = "250 OK"
    on_mail: Callable[[Captured], None] | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.answer.startswith("250"):
            return self.answer
        got = Captured(
            str(envelope.mail_from),
            list(envelope.rcpt_tos),
            bytes(envelope.original_content or envelope.content or b""),
        )
        self.captured.append(got)
        if self.on_mail:
            self.on_mail(got)
        return "250 OK"


class Relay:
    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler or Handler()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.AbstractServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def start(self, port: int = 0) -> Relay:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(port), self.loop).result(10)
        return self

    async def _serve(self, port: int) -> int:
        factory: Any = lambda: SMTP(self.handler, enable_SMTPUTF8=True, hostname="relay.test")  # noqa: E731
        self.server = await self.loop.create_server(factory, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    def pause(self) -> None:
        """Stop listening: connections are refused until resume()."""
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)

    def resume(self) -> None:
        asyncio.run_coroutine_threadsafe(self._serve(self.port), self.loop).result(10)

    async def _close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def captured(self) -> list[Captured]:
        return self.handler.captured
