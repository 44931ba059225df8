"""`ecr-gateway serve`: the listeners (SMTP, IMAP watchers, HTTP) in this process, the spool
processor and the outbox sender in a worker process; stopped cleanly by SIGTERM or SIGINT.

Each thread has its own App (SQLite connections stay in the thread that opened them): the SMTP
sessions and the web app live on the event loop, SMTP sessions hand messages to the acceptor
thread, each IMAP mailbox has a watcher thread, and whatever accepts a mail wakes the worker.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.app import App, build_app
from gateway.config import Settings
from gateway.inbound import imap, smtp
from gateway.web.server import Web, build_server

log = logging.getLogger("gateway")

SHUTDOWN_GRACE = 10.0  # seconds in-flight SMTP sessions get to finish


class EventLike(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class ServiceError(Exception):
    """The service cannot start; the message says why in one line."""


class Worker:
    """The spool processor and the outbox sender, in a process of their own: parsing and
    applying are CPU work, and on the listeners' interpreter they would hold its lock while
    SMTP sessions wait for their 250."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.stop = context.Event()
        self.wake = context.Event()
        self.process = context.Process(
            target=_worker_main,
            name="ecr-worker",
            daemon=True,
            args=(settings, dict(environ), self.stop, self.wake, os.getpid()),
        )

    def start(self) -> Worker:
        self.process.start()
        return self

    def join(self) -> None:
        self.stop.set()
        self.wake.set()
        self.process.join(60)
        if self.process.is_alive():
            log.warning("worker did not stop in 60s; terminating it")
            self.process.terminate()


def _worker_main(
    settings: Settings, environ: dict[str, str], stop: EventLike, wake: EventLike, parent: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _die_with(parent, stop, wake)  # the pid from the parent: it may be gone already
    # Acceptance is what senders wait for; processing has the spool to queue in. Under load
    # the listeners' process gets the CPU first.
    os.nice(10)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    make = lambda: build_app(settings, environ=environ)  # noqa: E731 - one App per thread
    halt = threading.Event()
    sender = threading.Thread(target=_logged("outbox", lambda: _send(make, halt)), name="outbox")
    sender.start()
    try:
        _process(make, stop, wake)
    finally:
        halt.set()
        sender.join(30)


def run(settings: Settings, environ: Mapping[str, str]) -> None:
    """Start everything, block until a signal, then stop in order: listeners first."""
    imap.parse_mailboxes(settings.imap.mailboxes, environ)  # a bad table stops us before anything
    app = build_app(settings, environ=environ)
    try:
        app.renderer.check()
        recovered = app.pipeline.recover()
    finally:
        app.close()
    log.info("recovery: %d accepted mails processed", len(recovered))
    worker = Worker(settings, environ).start()
    try:
        asyncio.run(_serve(settings, environ, worker.wake.set))
    finally:
        worker.join()
    log.info("ecr-gateway stopped")


async def _serve(settings: Settings, environ: Mapping[str, str], wake: Callable[[], None]) -> None:
    make = lambda: build_app(settings, environ=environ)  # noqa: E731 - one App per thread
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    listeners = Listeners()
    try:  # a listener that cannot start (a port taken) stops the ones started before it
        await _listen(settings, environ, make, wake, listeners)
        log.info("ecr-gateway serving: %s", "; ".join(listeners.summary))
        await stopping.wait()
        log.info("stopping: no new connections; in-flight sessions get %.0fs", SHUTDOWN_GRACE)
    finally:
        await listeners.close()


@dataclass
class Listeners:
    summary: list[str] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)
    acceptor: smtp.Acceptor | None = None
    watchers: list[threading.Thread] = field(default_factory=list)
    watching: threading.Event = field(default_factory=threading.Event)  # set = stop watching
    web: Web | None = None
    web_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        self.watching.set()
        if self.web and self.web_task:
            self.web.stop()  # uvicorn lets in-flight requests finish
            await self.web_task
        for server in self.servers:
            server.close()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE)
            except TimeoutError:
                log.warning("SMTP sessions still open after %.0fs; closing", SHUTDOWN_GRACE)
        for thread in self.watchers:  # a watcher finishes the batch it is accepting
            await asyncio.to_thread(thread.join, SHUTDOWN_GRACE)
        if self.acceptor:
            self.acceptor.stop()  # after the sessions: their last messages are accepted first


async def _listen(
    settings: Settings,
    environ: Mapping[str, str],
    make: Callable[[], App],
    wake: Callable[[], None],
    out: Listeners,
) -> None:
    if settings.smtp.enabled:
        out.acceptor = smtp.Acceptor(lambda: make().pipeline, wake).start()
        server = await smtp.start_server(
            smtp_policy(settings), out.acceptor, settings.smtp.host, settings.smtp.port
        )
        out.servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        out.summary.append(f"SMTP on {host}:{port}")
    out.watchers = imap.start_watchers(settings, environ, out.watching, wake)
    if out.watchers:
        out.summary.append(f"IMAP: {len(out.watchers)} mailbox(es)")
    if settings.http.enabled:
        out.web = build_server(settings, environ)
        out.web_task = asyncio.create_task(out.web.serve())
        host, port = out.web.address
        out.summary.append(f"HTTP on {host}:{port}")
    out.summary.append(f"notifications to {settings.outbound.relay_host or 'data/sent/'}")
    out.summary.append(f"data in {settings.data_dir}")


def smtp_policy(settings: Settings) -> smtp.SmtpPolicy:
    s = settings.smtp
    return smtp.SmtpPolicy(
        domain=settings.gateway.domain.lower(),
        own_addresses=settings.own_addresses,
        max_message_size=s.max_message_size,
        max_recipients=s.max_recipients,
        max_connections_per_peer=s.max_connections_per_peer,
        idle_timeout=float(s.idle_timeout),
        session_timeout=float(s.session_timeout),
        tls_context=_tls(s.tls_cert, s.tls_key),
    )


def _tls(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ServiceError("smtp.tls_cert and smtp.tls_key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ServiceError(f"smtp.tls_cert/tls_key cannot be loaded: {exc}") from None
    return context


def _die_with(parent: int, stop: EventLike, wake: EventLike) -> None:
    """A `serve` killed with SIGKILL cannot stop its worker: the worker watches for that and
    stops itself (mid-transaction is safe: SQLite rolls back), so no orphan keeps working."""

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                log.warning("serve is gone; worker stopping")
                stop.set()
                wake.set()
                return
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _process(make: Callable[[], App], stop: EventLike, wake: EventLike) -> None:
    """The spool processor: wakes on each accepted batch, and every second regardless."""
    app = make()
    try:
        while not stop.is_set():
            wake.wait(1.0)
            wake.clear()
            try:
                app.pipeline.process_waiting(batch=16, stop=stop.is_set)
            except Exception:  # e.g. the database locked for too long: try again next turn
                log.exception("spool processing failed; retrying")
    finally:
        app.close()


def _send(make: Callable[[], App], stop: threading.Event) -> None:
    app = make()
    try:
        app.sender().run(stop)
    finally:
        app.close()


def _logged(name: str, target: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            target()
        except Exception:
            log.exception("%s thread failed", name)

    return run
