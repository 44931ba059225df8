"""Writes: inbound rows (acceptance and their fate) and plans carried out in one transaction."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.model import (
    Action,
    Address,
    Classification,
    EcrView,
    Happened,
    Match,
    Outcome,
    ParsedMail,
    Plan,
    Result,
    Rung,
    Status,
)
from gateway.store.db import Database, Row

KEYS_PER_QUERY = 500  # dedupe keys looked up at once, well under SQLite's variable limit


@functools.lru_cache(maxsize=64)  # one mail's rows and events all stamp the same moment
def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Arrival:
    """One accepted mail's row, before it is processed."""

    dedupe_key: str
    message_id: str
    source: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: datetime
    size: int
    spool_name: str


@dataclass(frozen=True)
class Accepted:
    inbound_id: int
    duplicate_of: int | None


class Records:
    def __init__(self, db: Database, ref_prefix: str, ref_width: int) -> None:
        self.db = db
        self.prefix = ref_prefix
        self.width = ref_width
        # What the current transaction made happen; handed back so notifications can be
        # queued in the same transaction (PRODUCT §3: outbox rows commit with their cause).
        self._happened: list[Happened] = []

    def ref(self, ecr_id: int) -> str:
        return f"{self.prefix}{ecr_id:0{self.width}d}"

    # --- acceptance -------------------------------------------------------------------------

    def accept(self, arrivals: Sequence[Arrival], beside: bool = False) -> list[Accepted]:
        """Insert the rows in one durable commit; a known key is recorded as a duplicate.
        `beside`: the commit's flush may end after this returns (`Database.write`)."""
        with self.db.write(durable=True, beside=beside):
            firsts = self._firsts({a.dedupe_key for a in arrivals})
            accepted = []
            for arrival in arrivals:
                one = self._insert(arrival, firsts.get(arrival.dedupe_key))
                firsts.setdefault(arrival.dedupe_key, (one.inbound_id, None))  # twice in one batch
                accepted.append(one)
            return accepted

    def name_any(self, spool_names: Sequence[str]) -> bool:
        """Whether a row names any of these spool entries."""
        marks = ",".join("?" * len(spool_names))
        found = self.db.value(
            f"SELECT EXISTS (SELECT 1 FROM inbound WHERE spool_path IN ({marks}))",
            list(spool_names),
        )
        return bool(found)

    def _firsts(self, keys: set[str]) -> dict[str, tuple[int, int | None]]:
        """The first row (id, ECR) of each key already accepted: one query a batch."""
        found: dict[str, tuple[int, int | None]] = {}
        wanted = sorted(keys)
        for n in range(0, len(wanted), KEYS_PER_QUERY):
            chunk = wanted[n : n + KEYS_PER_QUERY]
            marks = ", ".join("?" for _ in chunk)
            for key, first, ecr_id in self.db.execute(
                "SELECT dedupe_key, id, ecr_id FROM inbound WHERE duplicate_of IS NULL AND "
                f"dedupe_key IN ({marks})",
                chunk,
            ):
                found[key] = (first, ecr_id)
        return found

    def _insert(self, a: Arrival, first: tuple[int, int | None] | None) -> Accepted:
        row: dict[str, Any] = {
            "dedupe_key": a.dedupe_key,
            "message_id": a.message_id or None,
            "source": a.source,
            "mail_from": a.mail_from,
            "rcpt_tos": json.dumps(list(a.rcpt_tos)),
            "received_at": iso(a.received_at),
            "size": a.size,
            "spool_path": a.spool_name,
        }
        if first is None:
            return Accepted(self.db.insert("inbound", {**row, "state": "accepted"}), None)
        first_id, ecr_id = first
        row.update(
            state="done",
            outcome=str(Outcome.DUPLICATE),
            duplicate_of=first_id,
            reason=f"duplicate of inbound {first_id}",
            processed_at=row["received_at"],
            ecr_id=ecr_id,
        )
        return Accepted(self.db.insert("inbound", row), first_id)

    def accept_quarantined(self, a: Arrival, reason: str) -> Accepted:
        """A row born quarantined, in the caller's transaction: a mail we refused to take
        whole (over the size limit through IMAP). Never `accepted`, so no processor can pick
        it up in between; a known key is still recorded as a duplicate."""
        accepted = self._insert(a, self._firsts({a.dedupe_key}).get(a.dedupe_key))
        if accepted.duplicate_of is None:
            self.db.execute(
                "UPDATE inbound SET failed_step = 'accept' WHERE id = ?", [accepted.inbound_id]
            )
            self._quarantine(accepted.inbound_id, reason)
        return accepted

    # --- the fate of a row ------------------------------------------------------------------

    def inbound(self, inbound_id: int) -> Row | None:
        return self.db.row("SELECT * FROM inbound WHERE id = ?", [inbound_id])

    def waiting(self, limit: int = 1000) -> list[int]:
        return [
            r["id"]
            for r in self.db.rows(
                "SELECT id FROM inbound WHERE state = 'accepted' ORDER BY id LIMIT ?", [limit]
            )
        ]

    def begin_attempt(self, inbound_id: int) -> None:
        """Counted before the work, so a mail that kills the process still reaches quarantine.
        One statement: in autocommit mode it is its own transaction."""
        self.db.execute("UPDATE inbound SET attempts = attempts + 1 WHERE id = ?", [inbound_id])

    def begin_attempts(self, inbound_ids: Sequence[int]) -> None:
        """`begin_attempt` for a batch, in one statement and one commit."""
        if inbound_ids:
            marks = ", ".join("?" for _ in inbound_ids)
            self.db.execute(
                f"UPDATE inbound SET attempts = attempts + 1 WHERE id IN ({marks})",
                list(inbound_ids),
            )

    def fail(self, inbound_id: int, step: str, error: str, quarantine: bool) -> None:
        with self.db.write():
            self.db.execute(
                "UPDATE inbound SET failed_step = ?, error = ? WHERE id = ?",
                [step, error[:2000], inbound_id],
            )
            if quarantine:
                self._quarantine(inbound_id, f"failed at {step}: {error[:300]}")

    def quarantine(self, inbound_id: int, reason: str, step: str = "") -> None:
        with self.db.write():
            self.db.execute(
                "UPDATE inbound SET failed_step = COALESCE(?, failed_step) WHERE id = ?",
                [step or None, inbound_id],
            )
            self._quarantine(inbound_id, reason)

    def _quarantine(self, inbound_id: int, reason: str) -> None:
        self.db.execute(
            "UPDATE inbound SET state = 'quarantined', outcome = ?, reason = ?, processed_at = ?"
            " WHERE id = ?",
            [str(Outcome.QUARANTINED), reason, iso(datetime.now(UTC)), inbound_id],
        )

    def release(self, inbound_id: int) -> bool:
        """Quarantine -> accepted with a fresh attempt count (replay)."""
        with self.db.write():
            cur = self.db.execute(
                "UPDATE inbound SET state = 'accepted', attempts = 0, outcome = NULL, "
                "failed_step = NULL, error = NULL WHERE id = ? AND state = 'quarantined'",
                [inbound_id],
            )
            return cur.rowcount == 1

    # --- lookups for matching (read inside the apply transaction) ----------------------------

    def ecr(self, ecr_id: int) -> EcrView | None:
        row = self.db.row("SELECT id, status, resolved_at FROM ecrs WHERE id = ?", [ecr_id])
        if row is None:
            return None
        people = self.db.rows(
            "SELECT c.email FROM participants p JOIN contacts c ON c.id = p.contact_id "
            "WHERE p.ecr_id = ?",
            [ecr_id],
        )
        return EcrView(
            row["id"],
            self.ref(row["id"]),
            Status(row["status"]),
            from_iso(row["resolved_at"]),
            frozenset(p["email"] for p in people),
        )

    def ecr_for_message_ids(self, ids: Sequence[str]) -> int | None:
        marks = ", ".join("?" for _ in ids)
        found = {
            r["message_id"]: r["ecr_id"]
            for r in self.db.rows(
                f"SELECT message_id, ecr_id FROM message_ids WHERE message_id IN ({marks})",
                list(ids),
            )
        }
        return next((found[i] for i in ids if i in found), None)

    def contact_email(self, contact_id: int) -> str | None:
        value = self.db.value("SELECT email FROM contacts WHERE id = ?", [contact_id])
        return str(value) if value is not None else None

    # --- carrying out a plan ------------------------------------------------------------------

    def apply(
        self,
        inbound_id: int,
        mail: ParsedMail,
        kind: Classification,
        found: Match | None,
        plan: Plan,
        now: datetime,
    ) -> Result:
        """Everything one mail changes, in the caller's transaction; the inbound row last."""
        self._happened = []
        ecr_id = plan.ecr_id
        if plan.action is Action.CREATE:
            ecr_id = self._create_ecr(mail, plan, now)
        if ecr_id is not None and plan.action in (Action.CREATE, Action.UPDATE, Action.NOTE):
            self._record_update(ecr_id, inbound_id, mail, plan, now)
        rung = found.rung if found else None
        self.db.execute(
            "UPDATE inbound SET state = 'done', outcome = ?, ecr_id = ?, rung = ?, reason = ?, "
            "classification = ?, trace = ?, sender = ?, subject = ?, processed_at = ? WHERE id = ?",
            [
                str(plan.outcome),
                ecr_id,
                str(rung) if rung else None,
                plan.reason,
                json.dumps({"kind": str(kind.kind), "reason": kind.reason}),
                json.dumps(list(found.trace) if found else []),
                mail.sender.email if mail.sender else None,
                mail.subject[:300],
                iso(now),
                inbound_id,
            ],
        )
        ref = self.ref(ecr_id) if ecr_id is not None else None
        shown_rung = rung if plan.action in (Action.CREATE, Action.UPDATE, Action.NOTE) else None
        happened, self._happened = tuple(self._happened), []
        return Result(inbound_id, plan.outcome, ref, shown_rung, plan.reason, happened)

    def record(
        self,
        inbound_id: int,
        outcome: Outcome,
        reason: str,
        kind: Classification,
        mail: ParsedMail,
        now: datetime,
        ecr_id: int | None = None,
    ) -> Result:
        """An inbound row that adds nothing to an ECR (loop, automatic, a bounce's ECR)."""
        plan = Plan(Action.RECORD, outcome, reason, ecr_id=ecr_id)
        return self.apply(inbound_id, mail, kind, None, plan, now)

    def _create_ecr(self, mail: ParsedMail, plan: Plan, now: datetime) -> int:
        requester, people = self._upsert_contact(mail.sender) if mail.sender else (None, "")
        ecr_id = self.db.insert(
            "ecrs",
            {
                "subject": mail.subject or "(no subject)",
                "status": str(Status.ACTIVE),
                "problem_type": plan.problem_type,
                "requester_id": requester,
                "related_to": plan.related_to,
                "created_at": iso(now),
                "updated_at": iso(now),
                # What _refresh_people would write once the requester is its participant,
                # written with the row: updating it after would index the ECR twice.
                "people": people,
            },
        )
        by = mail.sender.email if mail.sender else "unknown"
        self._event(ecr_id, now, "status", None, Status.ACTIVE, by, plan.reason)
        if plan.related_to is not None:
            self._event(
                ecr_id,
                now,
                "related",
                None,
                None,
                "gateway",
                f"related to {self.ref(plan.related_to)}: {plan.reason}",
            )
        if requester is not None:
            self._participant(ecr_id, requester, "requester", now)  # people already says so
        self._happened.append(
            Happened(
                "created",
                ecr_id,
                f"created:{ecr_id}",
                author=by,
                message_id=mail.message_id,
                named_missing=plan.named_missing,
            )
        )
        return ecr_id

    def _record_update(
        self, ecr_id: int, inbound_id: int, mail: ParsedMail, plan: Plan, now: datetime
    ) -> None:
        automatic = plan.action is Action.NOTE
        update_id = self.db.insert(
            "updates",
            {
                "ecr_id": ecr_id,
                "inbound_id": inbound_id,
                "kind": "inbound",
                "author": mail.sender.email if mail.sender else None,
                "text": plan.text,
                "full_text": mail.body,
                "automatic": int(automatic),
                "message_id": mail.message_id or None,
                "created_at": iso(now),
            },
        )
        for a in mail.attachments:
            self.db.insert(
                "attachments",
                {
                    "update_id": update_id,
                    "sha256": a.sha256,
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "size": a.size,
                    "content_id": a.content_id,
                    "inline": int(a.inline),
                },
            )
        if mail.message_id:
            self.db.execute(
                "INSERT OR IGNORE INTO message_ids VALUES (?, ?, 'in')", [mail.message_id, ecr_id]
            )
        by = mail.sender.email if mail.sender else "unknown"
        if plan.action is Action.UPDATE and plan.new_status is not None:
            self._change_status(ecr_id, plan.new_status, by, plan.reason, now)
        for note in plan.notes:
            self._event(ecr_id, now, "note", None, None, by, note)
        added = [
            self._participant(ecr_id, self._contact(address), "cc", now)
            for address in (plan.add_participants if not automatic else ())
        ]
        if any(added):  # once for all of them: each refresh re-indexes the ECR
            self._refresh_people(ecr_id)
        if plan.action is not Action.CREATE:  # a new ECR was updated_at now already
            self.db.execute("UPDATE ecrs SET updated_at = ? WHERE id = ?", [iso(now), ecr_id])
        if plan.action is Action.UPDATE:
            self._happened.append(
                Happened(
                    "updated",
                    ecr_id,
                    f"update:{update_id}",
                    author=by,
                    text=plan.text,
                    message_id=mail.message_id,
                )
            )

    def _change_status(self, ecr_id: int, to: Status, by: str, note: str, now: datetime) -> None:
        current = Status(self.db.value("SELECT status FROM ecrs WHERE id = ?", [ecr_id]))
        if current is to:
            return
        resolved = to is Status.RESOLVED
        self.db.execute(
            "UPDATE ecrs SET status = ?, updated_at = ?, "
            "resolved_at = CASE WHEN ? THEN ? ELSE resolved_at END, "
            "resolution_no = resolution_no + ? WHERE id = ?",
            [str(to), iso(now), resolved, iso(now), int(resolved), ecr_id],
        )
        event_id = self._event(ecr_id, now, "status", current, to, by, note)
        if to in (Status.PENDING, Status.REACTIVATED, Status.RESOLVED):
            self._happened.append(Happened(str(to), ecr_id, f"event:{event_id}", note, by))

    def set_status(
        self, ecr_id: int, to: Status, note: str, by: str, now: datetime
    ) -> tuple[Happened, ...]:
        """A staff change, in the caller's transaction; returns what it made happen."""
        self._happened = []
        self._change_status(ecr_id, to, by, note, now)
        happened, self._happened = tuple(self._happened), []
        return happened

    def _event(
        self,
        ecr_id: int,
        now: datetime,
        kind: str,
        frm: Status | None,
        to: Status | None,
        by: str,
        note: str,
    ) -> int:
        return self.db.insert(
            "events",
            {
                "ecr_id": ecr_id,
                "at": iso(now),
                "kind": kind,
                "from_status": frm and str(frm),
                "to_status": to and str(to),
                "by": by,
                "note": note,
            },
        )

    def _contact(self, address: Address) -> int:
        return self._upsert_contact(address)[0]

    def _upsert_contact(self, address: Address) -> tuple[int, str]:
        """The contact's id and its searchable text (as _refresh_people writes it)."""
        contact_id, name, email = self.db.execute(
            "INSERT INTO contacts (email, name) VALUES (?, ?) ON CONFLICT(email) DO UPDATE SET "
            "name = CASE WHEN excluded.name != '' THEN excluded.name ELSE contacts.name END "
            "RETURNING id, name, email",
            [address.email, address.name],
        ).fetchone()
        return int(contact_id), f"{name} {email}".strip()

    def _participant(self, ecr_id: int, contact_id: int, role: str, now: datetime) -> bool:
        """Whether the contact was new to the ECR (then its people text wants a refresh)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO participants VALUES (?, ?, ?, ?)",
            [ecr_id, contact_id, role, iso(now)],
        )
        return bool(cur.rowcount)

    def _refresh_people(self, ecr_id: int) -> None:
        """The searchable names and addresses of an ECR's participants."""
        people = self.db.rows(
            "SELECT c.email, c.name FROM participants p JOIN contacts c ON c.id = p.contact_id "
            "WHERE p.ecr_id = ?",
            [ecr_id],
        )
        text = " ".join(f"{p['name']} {p['email']}".strip() for p in people)
        self.db.execute("UPDATE ecrs SET people = ? WHERE id = ?", [text, ecr_id])


def rung_of(value: str | None) -> Rung | None:
    return Rung(value) if value else None
