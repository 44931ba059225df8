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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from gateway.app import App, build_app
from gateway.config import Settings
from gateway.inbound import imap, smtp
from gateway.store.files import probe_dir
from gateway.web.server import Web, build_server

log = logging.getLogger("gateway")

SHUTDOWN_GRACE = 10.0  # seconds in-flight SMTP sessions get to finish


class ServiceError(Exception):
    """The service cannot start; the message says why in one line."""


class Worker:
    """The spool processor and the outbox sender, in a process of their own: parsing and
    applying are CPU work, and on the listeners' interpreter they would hold its lock while
    SMTP sessions wait for their 250.

    The two processes share one pipe and nothing else. A byte on it wakes the worker; its end
    of file stops it, and comes as well when `serve` dies by SIGKILL, so no orphan goes on
    working. A pipe, not a multiprocessing Event: setting an Event blocks for good once a
    process that waited on it has died, and a worker killed by the kernel (out of memory)
    would then freeze every SMTP session at its 250.
    """

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.environ = dict(environ)
        self.context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.process: BaseProcess | None = None
        self.writer: Connection | None = None

    def start(self) -> Worker:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            name="ecr-worker",
            daemon=False,  # it has a child of its own (the rendering process); it stops on EOF
            args=(self.settings, self.environ, reader),
        )
        process.start()
        reader.close()  # the worker has its own copy: closing ours lets it see end of file
        os.set_blocking(writer.fileno(), False)
        self.process, self.writer = process, writer
        return self

    def wake(self) -> None:
        """Never blocks, from any thread: a full pipe already holds a wake-up, and a dead
        worker is restarted by `watch`, which processes whatever is waiting."""
        try:
            assert self.writer is not None
            self.writer.send_bytes(b"")  # 4 bytes: a pipe writes them whole or not at all
        except (BlockingIOError, OSError):
            pass

    async def watch(self) -> None:
        """Restart the worker whenever it dies (killed by the kernel, a bug): accepted mail
        must not wait in the spool for the next start of `serve`."""
        while True:
            await asyncio.sleep(1.0)
            assert self.process is not None and self.writer is not None
            if not self.process.is_alive():
                log.error("worker exited with code %s; starting another", self.process.exitcode)
                self.writer.close()
                self.start()

    def join(self) -> None:
        if self.writer is None or self.process is None:
            return
        self.writer.close()
        self.process.join(60)
        if self.process.is_alive():  # it ignores SIGTERM (see _worker_main)
            log.warning("worker did not stop in 60s; killing it")
            self.process.kill()
            self.process.join(10)


def _worker_main(settings: Settings, environ: dict[str, str], wakes: Connection) -> None:
    # The parent decides when we stop, by closing the pipe: a signal to the whole process
    # group (a terminal's ^C, systemd's SIGTERM to the unit) must not cut the worker short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # Acceptance is what senders wait for; processing has the spool to queue in. Under load
    # the listeners' process gets the CPU first: the lowest priority measured best (SMTP
    # throughput about a third higher than at nice 10), and the worker still has every cycle
    # the listeners leave, which outside a burst is nearly all of them.
    os.nice(19)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop, wake = threading.Event(), threading.Event()
    threading.Thread(target=_listen_for_wakes, args=(wakes, stop, wake), daemon=True).start()
    make = lambda: build_app(settings, environ=environ)  # noqa: E731 - one App per thread
    # A daemon: a send the relay never answers must not keep the worker from exiting (the
    # mail stays queued, and goes after the restart).
    sender = threading.Thread(
        target=_logged("outbox", lambda: _send(make, stop)), name="outbox", daemon=True
    )
    sender.start()
    try:
        _process(make, stop, wake)
    finally:
        stop.set()
        sender.join(30)


def _listen_for_wakes(wakes: Connection, stop: threading.Event, wake: threading.Event) -> None:
    try:
        while True:
            wakes.recv_bytes()
            wake.set()
    except (EOFError, OSError):  # the parent closed its end, or is gone
        stop.set()
        wake.set()


def run(settings: Settings, environ: Mapping[str, str]) -> None:
    """Start everything, block until a signal, then stop in order: listeners first."""
    imap.parse_mailboxes(settings.imap.mailboxes, environ)  # a bad table stops us before anything
    app = build_app(settings, environ=environ)
    try:
        app.renderer.check()
        _check_writable(app)
        recovered = app.pipeline.recover()
    finally:
        app.close()
    log.info("recovery: %d accepted mails processed", len(recovered))
    worker = Worker(settings, environ).start()
    try:
        asyncio.run(_serve(settings, environ, worker))
    finally:
        worker.join()
    log.info("ecr-gateway stopped")


def _check_writable(app: App) -> None:
    """Listening while every mail would be answered 451 is worse than not starting. The
    stores' roots are probed: new directories are made there."""
    for what, root in (("spool", app.pipeline.spool.root), ("attachments", app.blobs.root)):
        try:
            probe_dir(root)
        except OSError as exc:
            raise OSError(f"the {what} at {root} is not writable: {exc.strerror}") from None


async def _serve(settings: Settings, environ: Mapping[str, str], worker: Worker) -> None:
    make = lambda: build_app(settings, environ=environ)  # noqa: E731 - one App per thread
    watching = asyncio.create_task(worker.watch())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    listeners = Listeners()
    try:  # a listener that cannot start (a port taken) stops the ones started before it
        await _listen(settings, environ, make, worker.wake, listeners)
        log.info("ecr-gateway serving: %s", "; ".join(listeners.summary))
        await stopping.wait()
        log.info("stopping: no new connections; in-flight sessions get %.0fs", SHUTDOWN_GRACE)
    finally:
        await listeners.close()
        watching.cancel()


@dataclass
class Listeners:
    summary: list[str] = field(default_factory=list)
    servers: list[smtp.Receiving] = field(default_factory=list)
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
        for receiving in self.servers:
            if cut := await receiving.close(SHUTDOWN_GRACE):
                log.warning("%d SMTP sessions in a mail at %.0fs: cut", cut, SHUTDOWN_GRACE)
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
        receiving = await smtp.start_server(
            smtp_policy(settings), out.acceptor, settings.smtp.host, settings.smtp.port
        )
        out.servers.append(receiving)
        host, port = receiving.server.sockets[0].getsockname()[:2]
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


def _process(make: Callable[[], App], stop: threading.Event, wake: threading.Event) -> None:
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
    failures = 0
    while not stop.is_set():
        try:
            app = make()
        except Exception:  # the store locked at start-up: notifications wait, not for good
            failures += 1
            log.exception("outbox: cannot open the store; trying again")
            stop.wait(imap.backoff(failures))
            continue
        _send_with(app, stop)
        return


def _send_with(app: App, stop: threading.Event) -> None:
    pool = app.render_pool()
    try:
        app.sender(pool).run(stop)
    finally:
        pool.close()
        app.close()


def _logged(name: str, target: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            target()
        except Exception:
            log.exception("%s thread failed", name)

    return run
