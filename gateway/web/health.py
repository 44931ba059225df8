"""GET /healthz without the framework: probe the store and the spool, read the backlogs, judge.

Failing (503) when the store or the spool cannot take a write, when a notification has waited
unsent longer than `http.health_outbox_max_age`, or when an IMAP mailbox has not been read
successfully for longer than its `unreachable_warning_seconds` (plus one poll interval). A
quarantine backlog is reported, not failed: it needs a person, not a restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.config import Settings
from gateway.inbound import imap
from gateway.store.files import probe_dir
from gateway.store.ops import Ops
from gateway.store.records import from_iso, iso

IMAP_DEFAULTS = {k.name: k.default for k in imap.KEYS}  # as the watcher has them


@dataclass
class Health:
    problems: list[str] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "failing", "problems": self.problems, **self.body}


def assess(ops: Ops, settings: Settings, now: datetime) -> Health:
    h = Health(body={"checked_at": iso(now)})
    h.body["store"] = _check(h, "store", lambda: ops.probe_write(now))
    h.body["spool"] = _check(h, "spool", lambda: probe_dir(settings.data_dir / "spool" / "tmp"))
    try:
        _backlog(h, ops, settings, now)
        _imap(h, ops, settings, now)
    except sqlite3.Error as exc:
        h.problems.append(f"store cannot be read: {exc}")
    return h


def _check(h: Health, name: str, probe: Callable[[], None]) -> dict[str, Any]:
    try:
        probe()
    except (OSError, sqlite3.Error) as exc:
        h.problems.append(f"{name} not writable: {exc}")
        return {"writable": False, "error": str(exc)}
    return {"writable": True}


def _backlog(h: Health, ops: Ops, settings: Settings, now: datetime) -> None:
    b = ops.backlog()
    age = (now - b.oldest_queued).total_seconds() if b.oldest_queued else None
    h.body["inbound"] = {"waiting": b.waiting}
    h.body["quarantine"] = {"size": b.quarantined}
    h.body["outbox"] = {
        "queued": b.outbox.get("queued", 0),
        "failed": b.outbox.get("failed", 0),
        "oldest_unsent_age_seconds": age,
    }
    limit = settings.http.health_outbox_max_age
    if age is not None and age > limit:
        h.problems.append(f"a notification has waited {age:.0f}s unsent (limit {limit}s)")


def _imap(h: Health, ops: Ops, settings: Settings, now: datetime) -> None:
    rows = {r["mailbox"]: r for r in ops.imap()}
    shown = []
    for table in settings.imap.mailboxes:
        name = str(table.get("name", ""))
        row = rows.get(name)
        settled = {**IMAP_DEFAULTS, **table}
        limit = int(settled["unreachable_warning_seconds"]) + int(settled["poll_interval"])
        problem = _imap_problem(row, limit, now)
        if problem:
            h.problems.append(f"imap {name}: {problem}")
        shown.append(
            {
                "mailbox": name,
                "last_success": row["last_success"] if row else None,
                "last_error": row["last_error"] if row else None,
                "reconnects": row["reconnects"] if row else 0,
                "ok": not problem,
            }
        )
    h.body["imap"] = shown


def _imap_problem(row: dict[str, Any] | None, limit: int, now: datetime) -> str:
    """Why a mailbox counts as failing, or "" (never polled yet is not failing: start-up)."""
    if row is None:
        return ""
    success = from_iso(row["last_success"])
    if success is None:
        return f"never read successfully: {row['last_error']}" if row["last_error"] else ""
    age = (now - success).total_seconds()
    if age > limit:
        return f"last read successfully {age:.0f}s ago (limit {limit}s)"
    return ""
