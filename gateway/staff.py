"""What staff do to ECRs (CLI and API alike): each change and the mails it causes, atomically."""

from __future__ import annotations

from gateway.model import Status
from gateway.notify.notifier import Notifier
from gateway.pipeline import Clock
from gateway.store.records import Records

NOTE_REQUIRED = (Status.PENDING, Status.RESOLVED)


class StaffError(Exception):
    """A staff request that cannot be carried out; the message says why."""


class Staff:
    def __init__(self, records: Records, notifier: Notifier, clock: Clock) -> None:
        self.records = records
        self.notifier = notifier
        self.clock = clock

    def set_status(self, ecr_id: int, status: Status, note: str, by: str) -> int:
        """Change the status; returns how many notifications were queued."""
        if status is Status.REACTIVATED:
            raise StaffError("staff set active, pending or resolved; reactivated is the practice's")
        if status in NOTE_REQUIRED and not note.strip():
            what = "what is needed" if status is Status.PENDING else "the resolution"
            raise StaffError(f"a note is required for {status}: {what}")
        now = self.clock()
        with self.records.db.write():
            happened = self.records.set_status(ecr_id, status, note.strip(), by, now)
            return self.notifier.queue(happened, now)
