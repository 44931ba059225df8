"""What operators watch, read from the database: health figures and the Prometheus figures.

Everything here is read from stored rows at the moment it is asked for, so the answer is right
whichever process did the work (the listeners, the worker, a CLI `ingest`). The mail counters
and the latency histogram are kept by triggers (migration 5): a scrape reads a few rows.
Latencies come from timestamps stored to the second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from gateway.store.db import Database, Row
from gateway.store.records import from_iso, iso

INFINITY = 1e308  # the last latency bucket's bound in table metric_latency (migration 5)
PROBE_TIMEOUT_S = 5.0  # a store locked this long by another writer counts as not writable


@dataclass(frozen=True)
class Backlog:
    outbox: dict[str, int]  # state -> rows
    oldest_queued: datetime | None  # the oldest notification not yet sent
    quarantined: int
    waiting: int  # accepted, not yet processed


@dataclass(frozen=True)
class Latency:
    buckets: list[tuple[float, int]]  # (upper bound, cumulative count), +Inf last
    total: float
    count: int


@dataclass(frozen=True)
class Figures:
    accepted: dict[tuple[str, str], int]  # (transport, outcome) -> mails
    latency: Latency
    backlog: Backlog
    imap_reconnects: dict[str, int] = field(default_factory=dict)
    scores: int = 0  # score submissions (each is an event)


class Ops:
    def __init__(self, db: Database) -> None:
        self.db = db

    def probe_write(self, now: datetime) -> None:
        """A real write and commit: raises when the database cannot take one."""
        with self.db.write(wait=PROBE_TIMEOUT_S):
            self.db.execute(
                "INSERT INTO health_probe (id, at) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                [iso(now)],
            )

    def backlog(self) -> Backlog:
        outbox = {
            r["state"]: r["n"]
            for r in self.db.rows("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        }
        oldest = self.db.value("SELECT MIN(created_at) FROM outbox WHERE state = 'queued'")
        inbound = {
            r["state"]: r["n"]
            for r in self.db.rows(
                "SELECT state, COUNT(*) AS n FROM inbound WHERE state IN "
                "('quarantined', 'accepted') GROUP BY state"
            )
        }
        return Backlog(
            outbox, from_iso(oldest), inbound.get("quarantined", 0), inbound.get("accepted", 0)
        )

    def imap(self) -> list[Row]:
        return self.db.rows(
            "SELECT mailbox, last_success, last_error, reconnects FROM imap_state ORDER BY mailbox"
        )

    def figures(self) -> Figures:
        return Figures(
            accepted=self._accepted(),
            latency=self._latency(),
            backlog=self.backlog(),
            imap_reconnects={r["mailbox"]: r["reconnects"] for r in self.imap()},
            scores=int(self.db.value("SELECT COUNT(*) FROM events WHERE kind = 'score'")),
        )

    def _accepted(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for r in self.db.rows("SELECT source, outcome, n FROM metric_outcomes"):
            key = (r["source"].partition(":")[0], r["outcome"])  # imap:<mailbox> -> imap
            out[key] = out.get(key, 0) + r["n"]
        return out

    def _latency(self) -> Latency:
        buckets, seen, total = [], 0, 0.0
        for r in self.db.rows("SELECT le, n, total FROM metric_latency ORDER BY le"):
            seen += r["n"]
            total += r["total"]
            bound = float("inf") if r["le"] >= INFINITY else float(r["le"])
            buckets.append((bound, seen))
        return Latency(buckets, total, seen)
