"""The facts a report is computed from (gateway/reports.py), read for the ECRs of a period."""

from __future__ import annotations

from datetime import datetime

from gateway.reports import EcrFacts
from gateway.store.db import Database
from gateway.store.records import from_iso, iso

# First response: the first event staff caused (a status change from the CLI or the API).
# Resolution: the first time the ECR became resolved; a later reactivation does not undo it.
FACTS = """
SELECT e.id, e.problem_type, e.status, e.created_at,
    (SELECT MIN(v.at) FROM events v WHERE v.ecr_id = e.id AND v.by LIKE 'staff:%')
        AS first_response_at,
    (SELECT MIN(v.at) FROM events v WHERE v.ecr_id = e.id AND v.kind = 'status'
        AND v.to_status = 'resolved') AS first_resolved_at,
    EXISTS (SELECT 1 FROM events v WHERE v.ecr_id = e.id AND v.kind = 'status'
        AND v.to_status = 'reactivated') AS reactivated
FROM ecrs e WHERE e.created_at >= ? AND e.created_at < ? ORDER BY e.id
"""

SCORES = """
SELECT s.ecr_id, s.score FROM scores s JOIN ecrs e ON e.id = s.ecr_id
WHERE e.created_at >= ? AND e.created_at < ? ORDER BY s.ecr_id, s.resolution_no, s.contact_id
"""


def facts(db: Database, since: datetime, until: datetime) -> list[EcrFacts]:
    period = [iso(since), iso(until)]
    scores: dict[int, list[int]] = {}
    for r in db.rows(SCORES, period):
        scores.setdefault(r["ecr_id"], []).append(r["score"])
    return [
        EcrFacts(
            problem_type=r["problem_type"],
            status=r["status"],
            created_at=_at(r["created_at"]),
            first_response_at=from_iso(r["first_response_at"]),
            first_resolved_at=from_iso(r["first_resolved_at"]),
            reactivated=bool(r["reactivated"]),
            scores=tuple(scores.get(r["id"], ())),
        )
        for r in db.rows(FACTS, period)
    ]


def _at(text: str) -> datetime:
    at = from_iso(text)
    assert at is not None  # created_at is NOT NULL
    return at
