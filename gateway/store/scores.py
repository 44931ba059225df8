"""Scores from the resolution mail's links (PRODUCT §4): the SQL for table `scores` (migration 5).

One score per (ECR, contact, resolution); a later submission replaces it. Every submission is
also an event on the ECR, so the history survives the replacement, and `ecrs.score` /
`score_comment` hold the latest, which is what `ecr show --json` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.store.db import Database
from gateway.store.records import iso


@dataclass(frozen=True)
class Scored:
    """Where a score token points: the ECR as it is now, and the contact it was issued to."""

    ecr_id: int
    status: str
    resolution_no: int
    contact_email: str | None


class Scores:
    def __init__(self, db: Database) -> None:
        self.db = db

    def target(self, ecr_id: int, contact_id: int) -> Scored | None:
        row = self.db.row(
            "SELECT e.id, e.status, e.resolution_no, c.email FROM ecrs e "
            "LEFT JOIN contacts c ON c.id = ? WHERE e.id = ?",
            [contact_id, ecr_id],
        )
        if row is None:
            return None
        return Scored(row["id"], row["status"], row["resolution_no"], row["email"])

    def record(
        self,
        ecr_id: int,
        contact_id: int,
        resolution_no: int,
        score: int,
        comment: str,
        by: str,
        now: datetime,
    ) -> bool:
        """Record or replace, in one transaction with its event and the ECR's latest score.
        False, and nothing written, when the ECR left that resolution meanwhile (a
        reactivation committed between the token's check and this write)."""
        at = iso(now)
        with self.db.write():
            current = self.db.value(
                "SELECT 1 FROM ecrs WHERE id = ? AND status = 'resolved' AND resolution_no = ?",
                [ecr_id, resolution_no],
            )
            if current is None:
                return False
            self.db.execute(
                "INSERT INTO scores (ecr_id, contact_id, resolution_no, score, comment, at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ecr_id, contact_id, resolution_no) "
                "DO UPDATE SET score = excluded.score, comment = excluded.comment, "
                "at = excluded.at",
                [ecr_id, contact_id, resolution_no, score, comment, at],
            )
            self.db.execute(
                "UPDATE ecrs SET score = ?, score_comment = ? WHERE id = ?",
                [score, comment or None, ecr_id],
            )
            self.db.insert(
                "events",
                {
                    "ecr_id": ecr_id,
                    "at": at,
                    "kind": "score",
                    "by": by,
                    "note": f"score {score}" + (f": {comment}" if comment else ""),
                },
            )
        return True
