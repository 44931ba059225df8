"""The outbox: notification rows queued with the event that causes them, and their delivery state.

Also what notifications need to know of an ECR (its audience and thread) and the bounce marks
on contacts. Rows are written inside the caller's transaction; the sender uses its own
connection (its own thread) and only ever moves a row's state forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.model import Address
from gateway.store.db import Database, Row
from gateway.store.records import iso


@dataclass(frozen=True)
class Audience:
    """Who may hear about an ECR, and what the mails about it need to say."""

    ecr_id: int
    subject: str
    status: str
    resolution_no: int
    requester: Address | None
    participants: tuple[Address, ...]  # requester first
    contact_ids: dict[str, int]
    undeliverable: frozenset[str]
    thread: tuple[str, ...]  # Message-IDs in and out, oldest first
    last_inbound: str  # the practice's latest mail: what our mail answers


@dataclass(frozen=True)
class Queued:
    event_key: str
    recipient: str
    template: str
    ecr_id: int | None
    message_id: str
    envelope_from: str
    spec: str  # what the sender renders: template, context and headers, as JSON


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- what notifications need ---------------------------------------------------------

    def audience(self, ecr_id: int) -> Audience | None:
        ecr = self.db.row(
            "SELECT id, subject, status, resolution_no, requester_id FROM ecrs WHERE id = ?",
            [ecr_id],
        )
        if ecr is None:
            return None
        people = self.db.rows(
            "SELECT c.id, c.email, c.name, c.undeliverable_at FROM participants p "
            "JOIN contacts c ON c.id = p.contact_id WHERE p.ecr_id = ? "
            "ORDER BY p.role != 'requester', p.added_at, c.email",
            [ecr_id],
        )
        addresses = tuple(Address(p["email"], p["name"]) for p in people)
        requester = next(
            (a for a, p in zip(addresses, people, strict=True) if p["id"] == ecr["requester_id"]),
            None,
        )
        return Audience(
            ecr_id,
            ecr["subject"],
            ecr["status"],
            ecr["resolution_no"],
            requester,
            addresses,
            {p["email"]: p["id"] for p in people},
            frozenset(p["email"] for p in people if p["undeliverable_at"]),
            self.thread(ecr_id),
            self.db.value(
                "SELECT message_id FROM updates WHERE ecr_id = ? AND message_id IS NOT "
                "NULL ORDER BY id DESC LIMIT 1",
                [ecr_id],
            )
            or "",
        )

    def thread(self, ecr_id: int) -> tuple[str, ...]:
        rows = self.db.rows(
            "SELECT message_id, created_at, 0 AS o, id FROM updates WHERE ecr_id = ? "
            "AND message_id IS NOT NULL UNION ALL SELECT message_id, created_at, 1 AS o, id "
            "FROM outbox WHERE ecr_id = ? ORDER BY created_at, o, id",
            [ecr_id, ecr_id],
        )
        return tuple(dict.fromkeys(r["message_id"] for r in rows))

    def undeliverable(self, email: str) -> bool:
        return bool(
            self.db.value(
                "SELECT undeliverable_at IS NOT NULL FROM contacts WHERE email = ?", [email]
            )
        )

    def contact_id(self, address: Address) -> int:
        self.db.execute(
            "INSERT OR IGNORE INTO contacts (email, name) VALUES (?, ?)",
            [address.email, address.name],
        )
        return int(self.db.value("SELECT id FROM contacts WHERE email = ?", [address.email]))

    def recent(self, recipient: str, template: str, since: datetime) -> int:
        return int(
            self.db.value(
                "SELECT COUNT(*) FROM outbox WHERE recipient = ? AND template = ? "
                "AND created_at >= ?",
                [recipient, template, iso(since)],
            )
        )

    # --- queueing (inside the caller's transaction) --------------------------------------

    def queue(self, q: Queued, now: datetime) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO outbox (event_key, recipient, template, ecr_id, message_id, "
            "envelope_from, spec, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                q.event_key,
                q.recipient,
                q.template,
                q.ecr_id,
                q.message_id,
                q.envelope_from,
                q.spec,
                iso(now),
                iso(now),
            ],
        )
        if cur.rowcount and q.ecr_id is not None:
            # Our own Message-IDs thread replies back to the ECR (matching rung 2).
            self.db.execute(
                "INSERT OR IGNORE INTO message_ids VALUES (?, ?, 'out')", [q.message_id, q.ecr_id]
            )
        return bool(cur.rowcount)

    def note(self, ecr_id: int, now: datetime, by: str, note: str) -> None:
        self.db.insert(
            "events", {"ecr_id": ecr_id, "at": iso(now), "kind": "note", "by": by, "note": note}
        )

    # --- delivery (the sender's own connection) ------------------------------------------

    def due(self, now: datetime, limit: int = 100) -> list[Row]:
        return self.db.rows(
            "SELECT id, recipient, envelope_from, spec, attempts, created_at, ecr_id, message_id "
            "FROM outbox WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            [iso(now), limit],
        )

    def sent(self, outbox_id: int, now: datetime) -> None:
        """A row the relay accepted. One statement is its own transaction in SQLite: without
        write()'s BEGIN and COMMIT it costs half as much, once per mail sent."""
        self.db.execute(
            "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, "
            "last_error = NULL WHERE id = ?",
            [iso(now), outbox_id],
        )

    def retry_later(self, outbox_id: int, error: str, at: datetime) -> None:
        with self.db.write():
            self.db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ? WHERE id = ?",
                [error[:500], iso(at), outbox_id],
            )

    def failed(self, outbox_id: int, error: str, now: datetime) -> None:
        """Given up: the row says why, and so does a note on the ECR for the staff."""
        with self.db.write():
            self.db.execute(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, "
                "last_error = ? WHERE id = ?",
                [error[:500], outbox_id],
            )
            row = self.db.row(
                "SELECT ecr_id, recipient, template FROM outbox WHERE id = ?", [outbox_id]
            )
            if row and row["ecr_id"]:
                self.note(
                    row["ecr_id"],
                    now,
                    "gateway",
                    f"{row['template']} mail to {row['recipient']} failed: {error[:200]}",
                )

    def retry_now(self, outbox_id: int, now: datetime) -> bool:
        with self.db.write():
            cur = self.db.execute(
                "UPDATE outbox SET state = 'queued', next_attempt_at = ? WHERE id = ? "
                "AND state IN ('queued', 'failed')",
                [iso(now), outbox_id],
            )
            return cur.rowcount == 1

    def listing(self, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where = "WHERE state = ?" if state else ""
        rows = self.db.rows(
            "SELECT id, event_key, recipient, template, ecr_id, message_id, state, attempts, "
            f"next_attempt_at, last_error, created_at, sent_at FROM outbox {where} "
            "ORDER BY id DESC LIMIT ?",
            [state, limit] if state else [limit],
        )
        return rows

    def backlog(self) -> dict[str, int]:
        return {
            r["state"]: r["n"]
            for r in self.db.rows("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        }

    # --- bounces -------------------------------------------------------------------------

    def bounced(self, message_id: str, recipients: tuple[str, ...], now: datetime) -> Row | None:
        """Attribute a bounce to the notification it reports; mark its recipient undeliverable.

        Only the outbox row's own recipient is marked: addresses a bounce names that we never
        sent that mail to are not ours to judge (a forged DSN must not silence a practice).
        """
        row = (
            self.db.row(
                "SELECT id, ecr_id, recipient, template FROM outbox WHERE message_id = ?",
                [message_id],
            )
            if message_id
            else None
        )
        if row is None:
            return None
        if recipients and row["recipient"] not in recipients:
            return None
        self.db.execute("UPDATE outbox SET state = 'bounced' WHERE id = ?", [row["id"]])
        self.db.execute(
            "UPDATE contacts SET undeliverable_at = ?, undeliverable_reason = ? WHERE email = ? "
            "AND undeliverable_at IS NULL",
            [iso(now), f"bounce of {message_id}", row["recipient"]],
        )
        if row["ecr_id"]:
            self.note(
                row["ecr_id"],
                now,
                "gateway",
                f"{row['recipient']} is undeliverable: our {row['template']} mail bounced",
            )
        return row

    def clear_bounce(self, email: str) -> bool:
        with self.db.write():
            cur = self.db.execute(
                "UPDATE contacts SET undeliverable_at = NULL, undeliverable_reason = NULL "
                "WHERE email = ? AND undeliverable_at IS NOT NULL",
                [email.strip().casefold()],
            )
            return cur.rowcount == 1


def backoff(attempts: int) -> timedelta:
    """1, 2, 4 … minutes, at most an hour between tries."""
    return timedelta(seconds=min(60 * 2 ** max(attempts, 0), 3600))
