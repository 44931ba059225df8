"""Rendering outbox mails in a process of its own, while the sender delivers others.

Rendering (Jinja2 and the email library's MIME generator) costs about as much CPU as
delivering, and both are Python: in one process they take turns on one core. The sender hands
each batch after its first to this process one batch ahead, so a burst of notifications is
rendered on a second core while the previous batch goes to the relay. A batch of one (the usual
case outside a burst) never waits for the other process.

The process reads the same templates as the service's own check at start-up, once, as the
service does. When it dies (the kernel's out-of-memory killer), the batch it held is rendered
in the sender's thread instead and the next batch starts a new process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from gateway.notify import compose
from gateway.notify.render import Renderer

log = logging.getLogger(__name__)

MailOrFailure = bytes | str  # the mail, or the name of the exception that stopped it

_renderer: Renderer | None = None  # in the pool's process: built once, by _start


class RenderPool:
    def __init__(self, templates: Path | None) -> None:
        self.templates = templates
        self._executor = self._start_executor()
        self._executor.submit(int)  # start the process now, not when the first burst waits

    def _start_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded process
            initializer=_start,
            initargs=(self.templates, os.getpid()),
        )

    def render(self, specs: list[str]) -> Future[list[MailOrFailure]]:
        try:
            return self._executor.submit(_render_all, specs)
        except RuntimeError:  # broken by a dead process (BrokenProcessPool is one)
            log.warning("the rendering process is gone; starting another")
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start_executor()
            return self._executor.submit(_render_all, specs)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _start(templates: Path | None, parent: int) -> None:
    """`parent`: the pid of the process that started us, as it said (had it died before we
    asked the system, ours would already be another: we would wait for the wrong one)."""
    global _renderer
    _renderer = Renderer(templates)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """The pool's pipes stay open in this process itself, so a parent killed with SIGKILL
    leaves no end of file here to stop on: once it is gone, this process has a new parent."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _render_all(specs: list[str]) -> list[MailOrFailure]:
    assert _renderer is not None
    out: list[MailOrFailure] = []
    for spec in specs:
        try:
            out.append(compose.message(_renderer, spec))
        except Exception as exc:  # the row fails alone, in the sender
            out.append(type(exc).__name__)
    return out
