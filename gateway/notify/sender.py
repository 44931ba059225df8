"""The outbox sender: its sole purpose in life is to deliver due outbox rows, with retries.

4xx replies and connection errors are retried with exponential backoff for
`outbound.retry_hours`; a 5xx fails the row at once, with a note on the ECR. A row is marked
sent only after the relay accepted it, so a crash in between sends it again, with the same
Message-ID and the same bytes (a duplicate, which mail clients fold together).

Rows go in batches of `batch_size`: rendered together, then sent one by one, each marked sent
in its own commit as soon as the relay took it. A crash therefore resends at most the one mail
in flight (the commit is cheap: no fsync, see Database.write). With a RenderPool, all but the
first few rows are rendered in the pool's process while the ones before them are delivered.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime, timedelta

from gateway.notify.pool import MailOrFailure, RenderPool
from gateway.notify.transport import PermFail, TempFail, Transport
from gateway.store.db import Row
from gateway.store.outbox import Outbox, backoff
from gateway.store.records import from_iso

log = logging.getLogger(__name__)

BATCH_SIZE = 25  # rendered together: the templates and the MIME code stay hot in the caches
FIRST_ROWS = 10  # rendered by the sender while the pool renders the first batch after them
AHEAD = 4  # batches in the pool at a time: it never waits, and holds little finished mail


class Sender:
    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        clock: Callable[[], datetime],
        retry_hours: int,
        message: Callable[[str], bytes],
        batch_size: int = BATCH_SIZE,
        pool: RenderPool | None = None,
        first_rows: int = FIRST_ROWS,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.clock = clock
        self.give_up_after = timedelta(hours=retry_hours)
        self.message = message  # an outbox row's spec -> the mail's bytes
        self.batch_size = batch_size
        self.pool = pool
        self.first_rows = first_rows

    def run_once(self, limit: int = 2000, stop: threading.Event | None = None) -> int:
        """Send what is due now, or until `stop`; returns how many were delivered."""
        rows = self.outbox.due(self.clock(), limit)
        if not rows:
            return 0
        # The first rows are rendered here while the pool starts on the ones after them; a
        # handful (the usual case outside a burst) never waits for the other process at all.
        first = len(rows) if self.pool is None else min(len(rows), self.first_rows)
        rest = self._batches(rows[first:])
        ahead = Ahead(self.pool, rest) if self.pool and rest else None
        delivered = 0
        try:
            for batch in self._batches(rows[:first]):
                delivered += self._send_batch(batch, [self._render(row) for row in batch], stop)
            for batch, rendering in ahead or ():
                delivered += self._send_batch(batch, self._rendered(batch, rendering), stop)
        finally:
            if ahead:
                ahead.cancel()
            self.transport.close()
        return delivered

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                sent = self.run_once(stop=stop)
            except Exception:  # the loop must outlive a bad row or a broken relay
                log.exception("outbox sender failed; retrying")
                sent = 0
            if not sent:
                stop.wait(interval)

    def _send_batch(
        self, rows: list[Row], mails: list[bytes | None], stop: threading.Event | None = None
    ) -> int:
        """A batch rendered beforehand, all of it (each step with its own code and data hot in
        the CPU caches, instead of the two evicting each other once per mail), sent; on
        `stop`, no further mail (a relay that does not answer takes its timeout for each)."""
        delivered = 0
        for row, raw in zip(rows, mails, strict=True):
            if stop is not None and stop.is_set():
                break
            if raw is not None and self._send(row, raw):
                self.outbox.sent(int(row["id"]), self.clock())
                delivered += 1
        return delivered

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        return [rows[n : n + self.batch_size] for n in range(0, len(rows), self.batch_size)]

    def _rendered(
        self, rows: list[Row], rendering: Future[list[MailOrFailure]]
    ) -> list[bytes | None]:
        try:
            results = rendering.result()
        except Exception as exc:  # the process died with the batch: render it here
            log.warning("rendering process failed (%s); rendering here", type(exc).__name__)
            return [self._render(row) for row in rows]
        return [self._mail(row, r) for row, r in zip(rows, results, strict=True)]

    def _render(self, row: Row) -> bytes | None:
        try:
            return self.message(row["spec"])
        except Exception as exc:  # a template that broke after the start-up check
            return self._mail(row, type(exc).__name__)

    def _mail(self, row: Row, rendered: MailOrFailure) -> bytes | None:
        if isinstance(rendered, bytes):
            return rendered
        self.outbox.failed(int(row["id"]), f"cannot be rendered: {rendered}", self.clock())
        log.error("outbox %d cannot be rendered: %s", row["id"], rendered)
        return None

    def _send(self, row: Row, raw: bytes) -> bool:
        """True when the relay accepted the mail; the caller marks the row sent."""
        outbox_id = int(row["id"])
        try:
            self.transport.send(row["envelope_from"], row["recipient"], raw)
        except PermFail as exc:
            self.outbox.failed(outbox_id, str(exc), self.clock())
            log.warning("outbox %d to %s refused for good: %s", outbox_id, row["recipient"], exc)
            return False
        except TempFail as exc:
            self._later(outbox_id, row, str(exc))
            return False
        log.info("outbox %d sent to %s", outbox_id, row["recipient"])
        return True

    def _later(self, outbox_id: int, row: Row, error: str) -> None:
        now = self.clock()
        created = from_iso(row["created_at"]) or now
        if now - created >= self.give_up_after:
            self.outbox.failed(outbox_id, f"gave up after {self.give_up_after}: {error}", now)
            return
        self.outbox.retry_later(outbox_id, error, now + backoff(int(row["attempts"])))
        log.info("outbox %d to %s deferred: %s", outbox_id, row["recipient"], error)


class Ahead:
    """Batches rendered in the pool's process, in order, AHEAD at a time, while the ones
    before them are sent: the pool never waits for the sender, nor holds more than a few
    batches of finished mail."""

    def __init__(self, pool: RenderPool, batches: list[list[Row]]) -> None:
        self.pool = pool
        self.waiting = deque(batches)
        self.rendering: deque[tuple[list[Row], Future[list[MailOrFailure]]]] = deque()
        self._top_up()

    def __iter__(self) -> Iterator[tuple[list[Row], Future[list[MailOrFailure]]]]:
        while self.rendering:
            batch, rendering = self.rendering.popleft()
            self._top_up()
            yield batch, rendering

    def cancel(self) -> None:
        for _, rendering in self.rendering:
            rendering.cancel()

    def _top_up(self) -> None:
        while self.waiting and len(self.rendering) < AHEAD:
            batch = self.waiting.popleft()
            self.rendering.append((batch, self.pool.render([row["spec"] for row in batch])))
