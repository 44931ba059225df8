"""Running the web app under uvicorn: inside `serve`'s event loop, or alone on a thread (tests).

The socket is bound before uvicorn starts, so its port (0 = chosen by the OS) is known at once.
Signals are left to the caller: `serve` owns SIGTERM/SIGINT and stops everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass

import uvicorn

from gateway.config import Settings
from gateway.pipeline import Clock, utcnow
from gateway.web.app import create_app


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would install its own handlers and re-raise the signal when it stops;
        # `serve` has its own, and stops us with should_exit.
        yield


@dataclass
class Web:
    server: Server
    sock: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def serve(self) -> None:
        """Serve until stop(); `await` it from the caller's loop."""
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True


def build_server(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    clock: Clock = utcnow,
    sock: socket.socket | None = None,
) -> Web:
    """The app (built now: a broken page template raises here) under an unstarted server."""
    h = settings.http
    config = uvicorn.Config(
        create_app(settings, environ, clock),
        host=h.host,
        port=h.port,
        log_level="warning",
        access_log=False,  # a score URL is a capability: never in a log
        proxy_headers=True,
        forwarded_allow_ips=h.forwarded_allow_ips,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    return Web(Server(config), sock or bind(h.host, h.port))


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it every response sent in two writes waits for a delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Running:
    """The web app alone on a thread with its own event loop (tests, benchmarks)."""

    def __init__(self, web: Web) -> None:
        self.web = web
        self.thread = threading.Thread(target=self._run, name="web", daemon=True)
        self.started = threading.Event()
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host, port = self.web.address
        return f"http://{host}:{port}"

    def start(self, timeout: float = 30) -> Running:
        self.thread.start()
        if not self.started.wait(timeout) or self.error:
            raise RuntimeError(f"web server did not start: {self.error!r}")
        return self

    def stop(self, timeout: float = 30) -> None:
        self.web.stop()
        self.thread.join(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); a thread has no one else to tell
            self.error = exc
            self.started.set()

    async def _serve(self) -> None:
        task = asyncio.create_task(self.web.serve())
        while not self.web.server.started and not task.done():
            await asyncio.sleep(0.01)
        self.started.set()
        await task


def serve_alone(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    clock: Clock = utcnow,
    sock: socket.socket | None = None,
) -> Running:
    """Start the web app on its own thread and return once it answers."""
    return Running(build_server(settings, environ, clock, sock)).start()
