"""The IMAP watchers' memory: per mailbox a cursor (UIDVALIDITY, last UID) and its health, and
the messages we decided never to fetch. The only module with SQL for `imap_state` and
`imap_skipped` (migration 4).

The cursor is what keeps a re-scan cheap; it is not what prevents duplicates (the inbound
dedupe key does that), so losing it costs time, never correctness.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gateway.store.db import Database, Row
from gateway.store.records import iso


@dataclass(frozen=True)
class Cursor:
    uidvalidity: int | None  # None: this mailbox was never read
    last_uid: int  # every UID up to this one has been handled


class ImapState:
    def __init__(self, db: Database) -> None:
        self.db = db

    def cursor(self, mailbox: str) -> Cursor:
        row = self.db.row(
            "SELECT uidvalidity, last_uid FROM imap_state WHERE mailbox = ?", [mailbox]
        )
        if row is None:
            return Cursor(None, 0)
        return Cursor(row["uidvalidity"], int(row["last_uid"]))

    def advance(self, mailbox: str, uidvalidity: int, last_uid: int, now: datetime) -> None:
        """Move the cursor; a new UIDVALIDITY with last_uid 0 starts a re-scan."""
        with self.db.write():
            self._ensure(mailbox)
            self.db.execute(
                "UPDATE imap_state SET uidvalidity = ?, last_uid = ?, last_success = ? "
                "WHERE mailbox = ?",
                [uidvalidity, last_uid, iso(now), mailbox],
            )

    def reachable(self, mailbox: str, now: datetime) -> None:
        with self.db.write():
            self._ensure(mailbox)
            self.db.execute(
                "UPDATE imap_state SET last_success = ?, last_error = NULL WHERE mailbox = ?",
                [iso(now), mailbox],
            )

    def unreachable(self, mailbox: str, error: str) -> None:
        """A failed connection or pass: counted, and its error kept for the operator."""
        with self.db.write():
            self._ensure(mailbox)
            self.db.execute(
                "UPDATE imap_state SET last_error = ?, reconnects = reconnects + 1 "
                "WHERE mailbox = ?",
                [error[:500], mailbox],
            )

    def health(self) -> list[Row]:
        return self.db.rows(
            "SELECT mailbox, uidvalidity, last_uid, last_success, last_error, reconnects "
            "FROM imap_state ORDER BY mailbox"
        )

    # --- messages never to fetch ---------------------------------------------------------

    def skipped(self, mailbox: str, uidvalidity: int, uids: Iterable[int]) -> set[int]:
        """Which of these UIDs were already decided about (oversize, unfetchable)."""
        wanted = list(uids)
        found: set[int] = set()
        for start in range(0, len(wanted), 500):  # SQLite's bound on parameters
            chunk = wanted[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            found |= {
                int(r["uid"])
                for r in self.db.rows(
                    f"SELECT uid FROM imap_skipped WHERE mailbox = ? AND uidvalidity = ? "
                    f"AND uid IN ({marks})",
                    [mailbox, uidvalidity, *chunk],
                )
            }
        return found

    def skip(self, mailbox: str, uidvalidity: int, uid: int, reason: str, now: datetime) -> bool:
        """Record a decision, in the caller's transaction; False when it was already made."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO imap_skipped (mailbox, uidvalidity, uid, reason, at) "
            "VALUES (?, ?, ?, ?, ?)",
            [mailbox, uidvalidity, uid, reason[:500], iso(now)],
        )
        return bool(cur.rowcount)

    def skip_now(
        self, mailbox: str, uidvalidity: int, uid: int, reason: str, now: datetime
    ) -> bool:
        with self.db.write():
            return self.skip(mailbox, uidvalidity, uid, reason, now)

    def skips(self, mailbox: str) -> list[Row]:
        return self.db.rows(
            "SELECT uidvalidity, uid, reason, at FROM imap_skipped WHERE mailbox = ? "
            "ORDER BY uidvalidity, uid",
            [mailbox],
        )

    def _ensure(self, mailbox: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO imap_state (mailbox) VALUES (?)", [mailbox])
