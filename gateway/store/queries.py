"""Reads: the JSON shapes of PRODUCT §5.1, shared by the CLI and (later) the HTTP API."""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.store.db import Database, Row

ECR_COLUMNS = """e.id, e.subject, e.status, e.problem_type, e.related_to, e.created_at,
    e.updated_at, e.resolved_at, e.score, e.score_comment, c.email AS requester_email,
    c.name AS requester_name"""


class Queries:
    def __init__(self, db: Database, ref_prefix: str, ref_width: int) -> None:
        self.db = db
        self.prefix = ref_prefix
        self.width = ref_width
        letters = re.escape(ref_prefix.rstrip("-#_ "))
        self.ref_re = re.compile(rf"^\s*\[?{letters}[-#_ ]?0*(\d{{1,9}})\]?\s*$", re.I)

    def ref(self, ecr_id: int) -> str:
        return f"{self.prefix}{ecr_id:0{self.width}d}"

    def ecr_id(self, ref: str) -> int | None:
        """`ECR-000123`, `ecr123` or a bare number -> 123 when that ECR exists."""
        m = self.ref_re.match(ref)
        number = int(m.group(1)) if m else int(ref) if ref.strip().isdigit() else None
        if number is None:
            return None
        found = self.db.value("SELECT id FROM ecrs WHERE id = ?", [number])
        return int(found) if found is not None else None

    def ecr(self, ecr_id: int) -> dict[str, Any] | None:
        row = self.db.row(
            f"SELECT {ECR_COLUMNS} FROM ecrs e LEFT JOIN contacts c ON c.id = e.requester_id "
            "WHERE e.id = ?",
            [ecr_id],
        )
        if row is None:
            return None
        out = self._summary(row, self._participants([ecr_id]).get(ecr_id, []))
        out["updates"] = self._updates(ecr_id)
        out["events"] = self._events(ecr_id)
        return out

    def listing(
        self,
        status: str | None = None,
        contact: str | None = None,
        problem_type: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        where, params = ["1"], []
        if status:
            where.append("e.status = ?")
            params.append(status)
        if problem_type:
            where.append("e.problem_type = ? COLLATE NOCASE")
            params.append(problem_type)
        if contact:
            where.append("e.id IN (SELECT rowid FROM ecrs_fts WHERE ecrs_fts MATCH ?)")
            params.append("people : " + self.db.quote_fts(contact))
        rows = self.db.rows(
            f"SELECT {ECR_COLUMNS} FROM ecrs e LEFT JOIN contacts c ON c.id = e.requester_id "
            f"WHERE {' AND '.join(where)} ORDER BY e.id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return self._summaries(rows)

    def search(self, text: str, limit: int = 200) -> list[dict[str, Any]]:
        """Reference, contact name/address, problem type, subject and update text."""
        direct = self.ecr_id(text)
        query = self.db.quote_fts(text)
        ids = [direct] if direct is not None else []
        if query.strip('" '):
            ids += [
                r["rowid"]
                for r in self.db.rows(
                    "SELECT rowid FROM ecrs_fts WHERE ecrs_fts MATCH ? ORDER BY rank LIMIT ?",
                    [query, limit],
                )
            ]
            ids += [
                r["ecr_id"]
                for r in self.db.rows(
                    "SELECT DISTINCT u.ecr_id FROM updates_fts f JOIN updates u ON u.id = f.rowid "
                    "WHERE updates_fts MATCH ? LIMIT ?",
                    [query, limit],
                )
            ]
        ids = list(dict.fromkeys(ids))[:limit]
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        rows = self.db.rows(
            f"SELECT {ECR_COLUMNS} FROM ecrs e LEFT JOIN contacts c ON c.id = e.requester_id "
            f"WHERE e.id IN ({marks})",
            ids,
        )
        order = {i: n for n, i in enumerate(ids)}
        return self._summaries(sorted(rows, key=lambda r: order[r["id"]]))

    def _summaries(self, rows: list[Row]) -> list[dict[str, Any]]:
        people = self._participants([r["id"] for r in rows])
        return [self._summary(r, people.get(r["id"], [])) for r in rows]

    def _summary(self, row: Row, participants: list[str]) -> dict[str, Any]:
        requester = (
            {"email": row["requester_email"], "name": row["requester_name"]}
            if row["requester_email"]
            else None
        )
        return {
            "ref": self.ref(row["id"]),
            "status": row["status"],
            "subject": row["subject"],
            "problem_type": row["problem_type"],
            "requester": requester,
            "participants": participants,
            "related_to": self.ref(row["related_to"]) if row["related_to"] else None,
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "resolved_at": row["resolved_at"],
            "score": row["score"],
            "score_comment": row["score_comment"],
        }

    def _participants(self, ecr_ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for chunk in (ecr_ids[i : i + 500] for i in range(0, len(ecr_ids), 500)):
            marks = ", ".join("?" for _ in chunk)
            for r in self.db.rows(
                "SELECT p.ecr_id, c.email FROM participants p JOIN contacts c "
                f"ON c.id = p.contact_id WHERE p.ecr_id IN ({marks}) "
                "ORDER BY p.ecr_id, p.role != 'requester', p.added_at, c.email",
                chunk,
            ):
                out.setdefault(r["ecr_id"], []).append(r["email"])
        return out

    def _updates(self, ecr_id: int) -> list[dict[str, Any]]:
        updates = self.db.rows("SELECT * FROM updates WHERE ecr_id = ? ORDER BY id", [ecr_id])
        files: dict[int, list[dict[str, Any]]] = {}
        for a in self.db.rows(
            "SELECT a.* FROM attachments a JOIN updates u ON u.id = a.update_id "
            "WHERE u.ecr_id = ? ORDER BY a.id",
            [ecr_id],
        ):
            files.setdefault(a["update_id"], []).append(
                {
                    "filename": a["filename"],
                    "content_type": a["content_type"],
                    "size": a["size"],
                    "sha256": a["sha256"],
                }
            )
        return [
            {
                "id": u["id"],
                "kind": u["kind"],
                "author": u["author"],
                "text": u["text"],
                "automatic": bool(u["automatic"]),
                "message_id": u["message_id"],
                "created_at": u["created_at"],
                "attachments": files.get(u["id"], []),
            }
            for u in updates
        ]

    def _events(self, ecr_id: int) -> list[dict[str, Any]]:
        return [
            {
                "at": e["at"],
                "kind": e["kind"],
                "from": e["from_status"],
                "to": e["to_status"],
                "by": e["by"],
                "note": e["note"],
            }
            for e in self.db.rows("SELECT * FROM events WHERE ecr_id = ? ORDER BY id", [ecr_id])
        ]

    # --- inbound: why, quarantine ------------------------------------------------------------

    def inbound_id(self, ident: str) -> int | None:
        """An inbound id, or a Message-ID (with or without brackets) -> the first row for it."""
        if ident.strip().isdigit():
            found = self.db.value("SELECT id FROM inbound WHERE id = ?", [int(ident)])
        else:
            key = ident.strip().strip("<>").strip().casefold()
            found = self.db.value("SELECT id FROM inbound WHERE message_id = ? ORDER BY id", [key])
        return int(found) if found is not None else None

    def inbound(self, inbound_id: int) -> dict[str, Any] | None:
        row = self.db.row("SELECT * FROM inbound WHERE id = ?", [inbound_id])
        if row is None:
            return None
        return {
            "inbound_id": row["id"],
            "outcome": row["outcome"],
            "ref": self.ref(row["ecr_id"]) if row["ecr_id"] else None,
            "rung": row["rung"],
            "reason": row["reason"],
            "state": row["state"],
            "source": row["source"],
            "message_id": row["message_id"],
            "mail_from": row["mail_from"],
            "rcpt_tos": json.loads(row["rcpt_tos"]),
            "sender": row["sender"],
            "received_at": row["received_at"],
            "processed_at": row["processed_at"],
            "size": row["size"],
            "duplicate_of": row["duplicate_of"],
            "attempts": row["attempts"],
            "failed_step": row["failed_step"],
            "error": row["error"],
            "classification": json.loads(row["classification"]) if row["classification"] else None,
            "trace": json.loads(row["trace"]),
        }

    def quarantined(self) -> list[dict[str, Any]]:
        rows = self.db.rows("SELECT id FROM inbound WHERE state = 'quarantined' ORDER BY id")
        return [q for r in rows if (q := self.inbound(r["id"])) is not None]

    def counts(self) -> dict[str, int]:
        rows = self.db.rows(
            "SELECT COALESCE(outcome, state) AS k, COUNT(*) AS n FROM inbound GROUP BY k"
        )
        return {r["k"]: r["n"] for r in rows}
