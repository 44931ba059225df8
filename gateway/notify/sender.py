"""The outbox sender: its sole purpose in life is to deliver due outbox rows, with retries.

4xx replies and connection errors are retried with exponential backoff for
`outbound.retry_hours`; a 5xx fails the row at once, with a note on the ECR. A row is marked
sent only after the relay accepted it, so a crash in between sends it again, with the same
Message-ID (at most one duplicate, which mail clients fold together).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from gateway.notify.transport import PermFail, TempFail, Transport
from gateway.store.db import Row
from gateway.store.outbox import Outbox, backoff
from gateway.store.records import from_iso

log = logging.getLogger(__name__)


class Sender:
    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        clock: Callable[[], datetime],
        retry_hours: int,
        message: Callable[[str], bytes],
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.clock = clock
        self.give_up_after = timedelta(hours=retry_hours)
        self.message = message  # an outbox row's spec -> the mail's bytes

    def run_once(self, limit: int = 100) -> int:
        """Send what is due now; returns how many were delivered."""
        delivered = 0
        try:
            for row in self.outbox.due(self.clock(), limit):
                delivered += self._deliver(row)
        finally:
            self.transport.close()
        return delivered

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # the loop must outlive a bad row or a broken relay
                log.exception("outbox sender failed; retrying")
                sent = 0
            if not sent:
                stop.wait(interval)

    def _deliver(self, row: Row) -> int:
        outbox_id = int(row["id"])
        try:
            raw = self.message(row["spec"])
        except Exception as exc:  # a template that broke after the start-up check
            self.outbox.failed(outbox_id, f"cannot be rendered: {type(exc).__name__}", self.clock())
            log.error("outbox %d cannot be rendered: %s", outbox_id, type(exc).__name__)
            return 0
        try:
            self.transport.send(row["envelope_from"], row["recipient"], raw)
        except PermFail as exc:
            self.outbox.failed(outbox_id, str(exc), self.clock())
            log.warning("outbox %d to %s refused for good: %s", outbox_id, row["recipient"], exc)
            return 0
        except TempFail as exc:
            self._later(outbox_id, row, str(exc))
            return 0
        self.outbox.sent(outbox_id, self.clock())
        log.info("outbox %d sent to %s", outbox_id, row["recipient"])
        return 1

    def _later(self, outbox_id: int, row: Row, error: str) -> None:
        now = self.clock()
        created = from_iso(row["created_at"]) or now
        if now - created >= self.give_up_after:
            self.outbox.failed(outbox_id, f"gave up after {self.give_up_after}: {error}", now)
            return
        self.outbox.retry_later(outbox_id, error, now + backoff(int(row["attempts"])))
        log.info("outbox %d to %s deferred: %s", outbox_id, row["recipient"], error)
