"""SMTP as a transport: the only module that imports aiosmtpd.

Its sole purpose: take mail for our addresses and answer 250 only once the message is accepted
(spooled, fsynced, its row committed), which the Acceptor does for many sessions at once (group
commit). Recipients are judged at RCPT, before any data is taken (never an open relay); any
fault of ours is a 451, never aiosmtpd's default 500, so the sending MTA retries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.model import Envelope as Mail
from gateway.pipeline import Pipeline
from gateway.store.db import STORE_ERRORS
from gateway.store.records import Accepted

log = logging.getLogger(__name__)
# aiosmtpd logs every DATA line at debug level, and at warning each unknown command it is
# sent, which is a line of the body when a client sends it after a refused DATA: mail bodies
# must never reach a log (patient data), so its logger says errors only, whatever the root
# level is.
logging.getLogger("mail.log").setLevel(logging.ERROR)


# Commands one session may send. An MTA reuses a connection for many mails, so the mail
# commands get a large budget; the session deadline bounds the rest.
CALL_LIMITS = {
    "*": 5000,
    "NOOP": 50,
    "VRFY": 5,
    "EXPN": 5,
    "HELP": 10,
    "EHLO": 10,
    "HELO": 10,
    "STARTTLS": 2,
    "AUTH": 0,
}


@dataclass(frozen=True)
class SmtpPolicy:
    domain: str
    own_addresses: frozenset[str]
    max_message_size: int
    max_recipients: int
    max_connections_per_peer: int
    idle_timeout: float
    session_timeout: float
    tls_context: ssl.SSLContext | None = None

    def ours(self, address: str) -> bool:
        """Our domain, or one of our addresses as configured or with a +tag. Only A-Z are
        lowered: casefolding makes `localhoſt` our `localhost`, and lower() the Kelvin sign
        a k; a look-alike of our domain is another domain."""
        address = address.translate(_ASCII_LOWER)
        local, at, domain = address.rpartition("@")
        base = f"{local.partition('+')[0]}@{domain}"
        return bool(at) and (
            domain == self.domain or address in self.own_addresses or base in self.own_addresses
        )


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
Waiting = tuple[Mail, concurrent.futures.Future[Accepted]]


class Acceptor:
    """Accepting for every SMTP session: one thread takes every message that ended its DATA
    while it was busy as one batch: one spool file, one sync and one commit for all of them
    (group commit), then answers each session."""

    def __init__(
        self,
        make_pipeline: Callable[[], Pipeline],
        wake: Callable[[], None],
        max_batch: int = 64,
    ) -> None:
        self.make_pipeline = make_pipeline
        self.wake = wake
        self.max_batch = max_batch
        self.queue: queue.Queue[Waiting | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="smtp-acceptor", daemon=True)

    def start(self) -> Acceptor:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(30)

    async def submit(self, mail: Mail) -> Accepted:
        future: concurrent.futures.Future[Accepted] = concurrent.futures.Future()
        self.queue.put((mail, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        pipeline: Pipeline | None = None  # its own SQLite connection, opened in this thread
        while (batch := self._next_batch()) is not None:
            if pipeline is None:
                try:
                    pipeline = self.make_pipeline()
                except Exception as exc:  # the store locked or unreadable: 451, try again
                    log.error("the SMTP acceptor cannot open the store: %s", exc)
                    self._fail(batch, exc)
                    continue
            # A session that went away while waiting (its client hung up, a timeout) has
            # cancelled its answer: no one waits for it, and its sender will send again.
            waiting = [(m, f) for m, f in batch if f.set_running_or_notify_cancel()]
            try:
                self._accept(pipeline, waiting)
            except Exception as exc:  # a bug: this thread is every session's way to a 250
                log.exception("the SMTP acceptor failed on a batch; going on")
                self._fail([w for w in waiting if not w[1].done()], exc)

    def _next_batch(self) -> list[Waiting] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # finish this batch, then stop
                break
            batch.append(item)
        return batch

    def _accept(self, pipeline: Pipeline, batch: list[Waiting]) -> None:
        """The batch in one group commit; if that fails because of what a message holds,
        each message alone, so that one that cannot be stored fails only its own session
        (451, its sender retries). A failure of the store itself fails them all at once: one
        by one, each would wait out a lock again."""
        if not batch:
            return
        try:
            accepted = pipeline.accept_many([m for m, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, STORE_ERRORS):
                for item in batch:
                    self._accept(pipeline, [item])
                return
            log.error("accepting %d SMTP messages failed: %s", len(batch), type(exc).__name__)
            self._fail(batch, exc)
            return
        for (_, future), a in zip(batch, accepted, strict=True):
            future.set_result(a)
        self.wake()


    @staticmethod
    def _fail(batch: list[Waiting], exc: Exception) -> None:
        """Every session of these answers 451, and its sender sends again."""
        for _, future in batch:
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(exc)


class Handler:
    """aiosmtpd hooks: RCPT is judged before data; DATA ends in the acceptor."""

    def __init__(
        self, policy: SmtpPolicy, acceptor: Acceptor, clock: Callable[[], datetime]
    ) -> None:
        self.policy = policy
        self.acceptor = acceptor
        self.clock = clock

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        try:  # bytes that are not UTF-8 (kept as surrogates) cannot be stored as text
            address.encode("utf-8")
        except UnicodeEncodeError:
            return "553 5.1.7 The sender address is not valid UTF-8"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self.policy.ours(address):
            return "550 5.7.1 Relaying denied: not an address of ours"
        if len(envelope.rcpt_tos) >= self.policy.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        mail = Mail(
            bytes(raw), "smtp", _address(envelope.mail_from), tuple(envelope.rcpt_tos), self.clock()
        )
        try:
            accepted = await self.acceptor.submit(mail)
        except Exception:  # already logged by the acceptor; never a 5xx for our own fault
            return "451 4.3.0 Local error, try again later"
        return f"250 2.0.0 OK queued as {accepted.inbound_id}"


def _address(value: Any) -> str:
    text = str(value or "")
    return "" if text in ("<>", "None") else text


ADDRESS_MEMORY = 4096  # distinct MAIL FROM / RCPT TO arguments remembered (see _getaddr)
_ADDRESSES: dict[tuple[str, int], tuple[str | None, str | None]] = {}


class Receiver(SMTP):
    """aiosmtpd's session with the limits it lacks: connections per peer, a session deadline,
    and an idle timeout that really means idle (aiosmtpd's also cuts a slow but steady DATA)."""

    def __init__(
        self, handler: Handler, policy: SmtpPolicy, peers: Counter[str], sessions: set[Receiver]
    ) -> None:
        super().__init__(
            handler,
            data_size_limit=policy.max_message_size,
            enable_SMTPUTF8=True,
            hostname=policy.domain,
            tls_context=policy.tls_context,
            timeout=policy.idle_timeout,
            command_call_limit=CALL_LIMITS,
        )
        self.policy = policy
        self.peers = peers
        self.sessions = sessions  # every open one, for the shutdown
        self.peer_ip = ""
        self.deadline: asyncio.TimerHandle | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.deadline is not None:  # STARTTLS re-enters here: one session, one deadline
            return
        self.peer_ip = str((transport.get_extra_info("peername") or ("?",))[0])
        self.peers[self.peer_ip] += 1
        self.sessions.add(self)
        self.deadline = self.loop.call_later(self.policy.session_timeout, self._expire)
        if self.peers[self.peer_ip] > self.policy.max_connections_per_peer:
            self.close_with(b"421 4.7.0 Too many connections from your address\r\n")

    def connection_lost(self, error: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.peers[self.peer_ip] -= 1
            if self.peers[self.peer_ip] <= 0:
                del self.peers[self.peer_ip]
            self.sessions.discard(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._reset_timeout()
        super().data_received(data)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's reading of a MAIL FROM or RCPT TO argument, remembered: it runs the email
        library's header parser and builds a class on every call (a fifth of a session's CPU),
        while the same relays send for the same practices to the same addresses of ours."""
        key = (arg, self.local_part_limit)
        found = _ADDRESSES.get(key)
        if found is None:
            if len(_ADDRESSES) >= ADDRESS_MEMORY:
                _ADDRESSES.clear()
            try:
                found = super()._getaddr(arg)
            except Exception:  # e.g. `<a@[1.2>` breaks the header parser: a syntax error
                found = (None, None)  # (553), not aiosmtpd's 500 quoting our exception
            _ADDRESSES[key] = found
        return found

    def _expire(self) -> None:
        self.close_with(b"421 4.4.2 Session time limit reached, closing\r\n")

    def between_mails(self) -> bool:
        """No mail under way: before MAIL FROM, or after the answer to its data."""
        return self.envelope is None or self.envelope.mail_from is None

    def close_with(self, line: bytes) -> None:
        if self.closing:
            return
        self.closing = True
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(line)
        if transport is not None:
            transport.close()


SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"


@dataclass
class Receiving:
    """The listener and its open sessions."""

    server: asyncio.Server
    sessions: set[Receiver]

    async def close(self, grace: float) -> int:
        """No new connections; each session is closed (421) once it is between mails, and
        any still in one after `grace` seconds regardless (no 250 was given for it: its
        sender sends it again). Returns how many were cut short."""
        self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.sessions and loop.time() < deadline:
            for session in list(self.sessions):
                if session.between_mails():
                    session.close_with(SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        cut = [s for s in self.sessions if not s.closing]
        for session in cut:
            session.close_with(SHUTTING_DOWN)
        return len(cut)


async def start_server(
    policy: SmtpPolicy,
    acceptor: Acceptor,
    host: str,
    port: int,
    clock: Callable[[], datetime] | None = None,
) -> Receiving:
    """Listen on host:port (0: the OS picks; read it from the server's sockets)."""
    handler = Handler(policy, acceptor, clock or (lambda: datetime.now(UTC).replace(microsecond=0)))
    peers: Counter[str] = Counter()
    sessions: set[Receiver] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Receiver(handler, policy, peers, sessions), host, port
    )
    return Receiving(server, sessions)
