"""The attachment a download asks for, but only as part of the ECR the request names."""

from __future__ import annotations

from gateway.store.db import Database, Row


def find(db: Database, ecr_id: int, sha256: str) -> Row | None:
    """The first stored name and type of these bytes on this ECR; None when not on it (the same
    bytes on another ECR are that ECR's business)."""
    return db.row(
        "SELECT a.sha256, a.filename, a.content_type, a.size FROM attachments a "
        "JOIN updates u ON u.id = a.update_id WHERE u.ecr_id = ? AND a.sha256 = ? "
        "ORDER BY a.id LIMIT 1",
        [ecr_id, sha256],
    )
