"""The SQLite database: connection, transactions and numbered migrations.

The only module that imports sqlite-utils. The connection runs in autocommit mode and every
write happens inside `Database.write()`, an explicit BEGIN IMMEDIATE ... COMMIT, because
sqlite-utils' own insert helpers commit on their own and would split our transactions.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from .files import Beside, datasync_fd, fsync_dir, on_fd

Row = dict[str, Any]

BUSY_TIMEOUT_S = 60.0
# The store's own failures (a lock held too long, a read-only or full disk, an I/O error), as
# against a failure that one row's content causes.
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.OperationalError)


class NotDurable(Exception):
    """A commit made durable beside its caller (`Database.write(beside=True)`) could not be:
    what it wrote may be lost in a crash, so whatever it acknowledges must not be."""


class Database:
    def __init__(self, path: Path, migrate: bool = True) -> None:
        """`migrate=False` for extra connections (per thread, per request) to a database that
        the process's first connection already brought up to date."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per Database; each thread or process opens its own (STYLE: traps).
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=60)
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self._savepoints = 0
        self._flusher = Beside("wal")
        self._flush: Future[None] | None = None  # a commit's flush still running beside
        self._log_entry_synced = False
        self.execute("PRAGMA journal_mode=WAL")
        self.execute("PRAGMA foreign_keys=ON")
        self.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        self.execute("PRAGMA synchronous=NORMAL")
        if migrate:
            _migrate(self)

    def close(self) -> None:
        try:
            self.settle()
        finally:
            self._flusher.close()
            self.conn.close()

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def insert(self, table: str, row: Row) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = self.conn.execute(
            f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values())
        )
        return int(cur.lastrowid or 0)

    def rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        # A plain cursor: sqlite-utils' query() wraps every read in a SAVEPOINT, which costs
        # more than the read itself on the hot paths.
        cur = self.conn.execute(sql, params)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def row(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Row | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        found = self.conn.execute(sql, params).fetchone()
        return found[0] if found else None

    @contextmanager
    def write(
        self, durable: bool = False, wait: float = BUSY_TIMEOUT_S, beside: bool = False
    ) -> Iterator[None]:
        """One write transaction; `durable` commits with synchronous=FULL (acceptance, §7);
        `wait` is how long to wait for another connection's write to end. Inside another one
        (a batch applied in one commit) it is a savepoint of it: its changes are undone alone
        on an error, and committed with the rest.

        `durable` and `beside`: the commit returns before its flush, which runs on a helper
        thread while the caller goes on (`ingest` processes the mail it just accepted); the
        next commit on this connection waits for the flush first, so nothing it writes after
        the durable commit can be seen before that is durable, and `settle()` waits for it
        too. Another connection may see the durable commit's rows before their flush ends
        (serve's worker may process an ingest's mail): its own commits come after them in the
        log, so a crash cannot keep those and lose these. Without a log of its own (a database
        SQLite would not put in WAL mode) the commit is made with synchronous=FULL."""
        if self.conn.in_transaction:
            if durable:
                raise RuntimeError("a durable write cannot join a transaction in progress")
            with self._savepoint():
                yield
            return
        log_path = self._log if durable and beside else None  # none: SQLite's flush, FULL
        full = durable and log_path is None
        if full:
            self.execute("PRAGMA synchronous=FULL")
        try:
            self._begin(wait)
            try:
                yield
                self._flushed()
                log = os.open(log_path, os.O_RDONLY) if log_path else -1
            except BaseException:
                self.execute("ROLLBACK")
                raise
            try:
                self.execute("COMMIT")
            except BaseException:
                if log >= 0:
                    os.close(log)
                raise
        finally:
            if full:
                self.execute("PRAGMA synchronous=NORMAL")
        if log >= 0:
            self._flush = self._flush_beside(log)

    @functools.cached_property
    def _log(self) -> str | None:
        """The log as SQLite names it, beside the database's file (a symbolic link resolved);
        None when SQLite would not put the database in WAL mode. Asked on first use only:
        most connections (the web threads', the worker's) never flush beside."""
        if self.value("PRAGMA journal_mode") != "wal":
            return None
        main = {row[1]: row[2] for row in self.execute("PRAGMA database_list")}.get("main")
        return f"{main}-wal" if main else None

    def settle(self) -> None:
        """Wait for a durable commit's flush running beside; raises `NotDurable` (once) when
        it failed."""
        try:
            self._flushed()
        finally:
            self._flush = None

    def _flushed(self) -> None:
        """The pending flush, waited for; a failed one stays pending, so that every later
        commit fails too until `settle()` has reported it."""
        if self._flush is None:
            return
        try:
            self._flush.result()
        except OSError as exc:
            raise NotDurable(f"the database's log could not be flushed: {exc}") from exc
        self._flush = None

    def _flush_beside(self, fd: int) -> Future[None]:
        """The log's flush that synchronous=FULL would have made at the commit (the log holds
        every commit in order, so flushing the file flushes this one), and at the first one
        the log's directory, as SQLite does when it first syncs a log it created."""
        entry = not self._log_entry_synced
        directory = os.path.dirname(str(self._log))

        def flush(fd: int) -> None:
            datasync_fd(fd)
            if entry:
                fsync_dir(directory)
                self._log_entry_synced = True  # only one flush is ever pending

        return self._flusher.start(on_fd(fd, flush))

    def _begin(self, wait: float) -> None:
        """BEGIN IMMEDIATE, waiting for another connection's write to end. SQLite's own busy
        handler sleeps 1, 2, 5, 10... ms between tries, so an SMTP acceptance that queued
        behind the worker's half-millisecond write waited 3-8 ms before its 250; retrying
        from 50 us keeps the wait near the length of the write it waits for."""
        self.execute("PRAGMA busy_timeout=0")
        try:
            deadline, pause = time.monotonic() + wait, 0.00005
            while True:
                try:
                    self.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                    if not busy or time.monotonic() >= deadline:
                        raise
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        finally:
            self.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        # Named by depth, not by a count: the same few statements, prepared once and cached.
        self._savepoints += 1
        name = f"write_{self._savepoints}"
        try:
            self.execute(f"SAVEPOINT {name}")
            try:
                yield
            except BaseException:
                self.execute(f"ROLLBACK TO {name}")
                self.execute(f"RELEASE {name}")
                raise
            else:
                self.execute(f"RELEASE {name}")
        finally:
            self._savepoints -= 1

    @staticmethod
    def quote_fts(text: str) -> str:
        return str(sqlite_utils.Database.quote_fts(None, text))  # type: ignore[arg-type]


def _m1_core(d: Database) -> None:
    d.execute("""CREATE TABLE contacts (
        id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL DEFAULT '',
        undeliverable_at TEXT, undeliverable_reason TEXT)""")
    d.execute("""CREATE TABLE ecrs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL, status TEXT NOT NULL,
        problem_type TEXT NOT NULL, requester_id INTEGER REFERENCES contacts(id),
        related_to INTEGER REFERENCES ecrs(id), created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL, resolved_at TEXT, resolution_no INTEGER NOT NULL DEFAULT 0,
        score INTEGER, score_comment TEXT, people TEXT NOT NULL DEFAULT '')""")
    d.execute("CREATE INDEX ecrs_status ON ecrs(status, id)")
    d.execute("CREATE INDEX ecrs_problem_type ON ecrs(problem_type)")
    d.execute("""CREATE TABLE participants (
        ecr_id INTEGER NOT NULL REFERENCES ecrs(id), contact_id INTEGER NOT NULL
        REFERENCES contacts(id), role TEXT NOT NULL, added_at TEXT NOT NULL,
        PRIMARY KEY (ecr_id, contact_id)) WITHOUT ROWID""")
    d.execute("CREATE INDEX participants_contact ON participants(contact_id)")
    d.execute("""CREATE TABLE inbound (
        id INTEGER PRIMARY KEY AUTOINCREMENT, dedupe_key TEXT NOT NULL, message_id TEXT,
        source TEXT NOT NULL, mail_from TEXT NOT NULL DEFAULT '',
        rcpt_tos TEXT NOT NULL DEFAULT '[]', received_at TEXT NOT NULL, size INTEGER NOT NULL,
        spool_path TEXT NOT NULL, state TEXT NOT NULL, outcome TEXT,
        duplicate_of INTEGER REFERENCES inbound(id), ecr_id INTEGER REFERENCES ecrs(id),
        rung TEXT, reason TEXT NOT NULL DEFAULT '', classification TEXT,
        trace TEXT NOT NULL DEFAULT '[]', sender TEXT, subject TEXT, attempts INTEGER NOT NULL
        DEFAULT 0, failed_step TEXT, error TEXT, processed_at TEXT)""")
    d.execute("CREATE UNIQUE INDEX inbound_key ON inbound(dedupe_key) WHERE duplicate_of IS NULL")
    d.execute("CREATE INDEX inbound_state ON inbound(state, id)")
    d.execute("CREATE INDEX inbound_message_id ON inbound(message_id)")
    d.execute("""CREATE TABLE updates (
        id INTEGER PRIMARY KEY, ecr_id INTEGER NOT NULL REFERENCES ecrs(id),
        inbound_id INTEGER REFERENCES inbound(id), kind TEXT NOT NULL, author TEXT,
        text TEXT NOT NULL, full_text TEXT NOT NULL DEFAULT '',
        automatic INTEGER NOT NULL DEFAULT 0, message_id TEXT, created_at TEXT NOT NULL)""")
    d.execute("CREATE INDEX updates_ecr ON updates(ecr_id)")
    d.execute("""CREATE TABLE attachments (
        id INTEGER PRIMARY KEY, update_id INTEGER NOT NULL REFERENCES updates(id),
        sha256 TEXT NOT NULL, filename TEXT NOT NULL, content_type TEXT NOT NULL,
        size INTEGER NOT NULL, content_id TEXT NOT NULL DEFAULT '',
        inline INTEGER NOT NULL DEFAULT 0)""")
    d.execute("CREATE INDEX attachments_update ON attachments(update_id)")
    d.execute("CREATE INDEX attachments_sha ON attachments(sha256)")
    d.execute("""CREATE TABLE events (
        id INTEGER PRIMARY KEY, ecr_id INTEGER NOT NULL REFERENCES ecrs(id), at TEXT NOT NULL,
        kind TEXT NOT NULL, from_status TEXT, to_status TEXT, by TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '', inbound_id INTEGER REFERENCES inbound(id))""")
    d.execute("CREATE INDEX events_ecr ON events(ecr_id)")
    d.execute("""CREATE TABLE message_ids (
        message_id TEXT PRIMARY KEY, ecr_id INTEGER NOT NULL REFERENCES ecrs(id),
        direction TEXT NOT NULL) WITHOUT ROWID""")


def _m2_search(d: Database) -> None:
    # External-content FTS5 tables kept in step by triggers: search never scans the tables.
    for table, cols in (("ecrs", ["subject", "problem_type", "people"]), ("updates", ["text"])):
        _fts(d, table, cols)


def _fts(d: Database, table: str, cols: list[str]) -> None:
    names = ", ".join(cols)
    new = ", ".join(f"new.{c}" for c in cols)
    old = ", ".join(f"old.{c}" for c in cols)
    fts = f"{table}_fts"
    d.execute(
        f"CREATE VIRTUAL TABLE {fts} USING fts5({names}, content='{table}', "
        "content_rowid='id', tokenize='unicode61 remove_diacritics 2')"
    )
    d.execute(
        f"CREATE TRIGGER {table}_ai AFTER INSERT ON {table} BEGIN "
        f"INSERT INTO {fts}(rowid, {names}) VALUES (new.id, {new}); END"
    )
    d.execute(
        f"CREATE TRIGGER {table}_ad AFTER DELETE ON {table} BEGIN "
        f"INSERT INTO {fts}({fts}, rowid, {names}) VALUES ('delete', old.id, {old}); END"
    )
    d.execute(
        f"CREATE TRIGGER {table}_au AFTER UPDATE OF {names} ON {table} BEGIN "
        f"INSERT INTO {fts}({fts}, rowid, {names}) VALUES ('delete', old.id, {old}); "
        f"INSERT INTO {fts}(rowid, {names}) VALUES (new.id, {new}); END"
    )


def _m3_outbox(d: Database) -> None:
    # One row per (event, recipient): the unique key is what makes a replayed event, or a
    # retried transaction, queue nothing twice.
    d.execute("""CREATE TABLE outbox (
        id INTEGER PRIMARY KEY, event_key TEXT NOT NULL, recipient TEXT NOT NULL,
        template TEXT NOT NULL, ecr_id INTEGER REFERENCES ecrs(id), message_id TEXT NOT NULL,
        envelope_from TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'queued',
        attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT NOT NULL,
        last_error TEXT, created_at TEXT NOT NULL, sent_at TEXT,
        UNIQUE (event_key, recipient))""")
    d.execute("CREATE INDEX outbox_due ON outbox(state, next_attempt_at)")
    d.execute("CREATE INDEX outbox_message_id ON outbox(message_id)")
    d.execute("CREATE INDEX outbox_recipient ON outbox(recipient, template, created_at)")
    d.execute("CREATE INDEX outbox_ecr ON outbox(ecr_id)")


def _m4_imap(d: Database) -> None:
    # Per watched mailbox: the cursor (UIDVALIDITY, last UID) and its health.
    d.execute("""CREATE TABLE imap_state (
        mailbox TEXT PRIMARY KEY, uidvalidity INTEGER, last_uid INTEGER NOT NULL DEFAULT 0,
        last_success TEXT, last_error TEXT, reconnects INTEGER NOT NULL DEFAULT 0)""")
    # Messages we decided never to fetch (over the size limit), so they are handled once.
    d.execute("""CREATE TABLE imap_skipped (
        mailbox TEXT NOT NULL, uidvalidity INTEGER NOT NULL, uid INTEGER NOT NULL,
        reason TEXT NOT NULL, at TEXT NOT NULL, PRIMARY KEY (mailbox, uidvalidity, uid))""")


def _m5_scores(d: Database) -> None:
    # One score per (ECR, contact, resolution): a later POST replaces it, and every POST is
    # also an event, so the history stays. ecrs.score / score_comment keep the latest.
    d.execute("""CREATE TABLE scores (
        ecr_id INTEGER NOT NULL REFERENCES ecrs(id), contact_id INTEGER NOT NULL
        REFERENCES contacts(id), resolution_no INTEGER NOT NULL,
        score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5), comment TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL, PRIMARY KEY (ecr_id, contact_id, resolution_no)) WITHOUT ROWID""")
    d.execute("CREATE INDEX scores_at ON scores(at)")
    # What /healthz writes to prove the store takes writes: one row, overwritten.
    d.execute("CREATE TABLE health_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at TEXT)")
    # Reports and metrics read events by kind (first response, resolutions, score count).
    d.execute("CREATE INDEX events_kind ON events(kind, ecr_id)")
    _metric_counters(d)


# Processing-latency buckets (seconds) of the metrics; 1e308 stands for +Inf.
LATENCY_BUCKETS = (1, 2, 5, 10, 30, 60, 300, 1800, 3600, 86400, 1e308)
_LATENCY = "MAX(0, ROUND((julianday(new.processed_at) - julianday(new.received_at)) * 86400, 3))"


def _metric_counters(d: Database) -> None:
    """Counters kept by triggers, so a Prometheus scrape reads a few rows instead of scanning
    every inbound mail, and counts what every process did. Each outcome a mail reaches is
    counted once (a replayed mail counts under both of its outcomes); each processing, its
    latency from acceptance."""
    d.execute("""CREATE TABLE metric_outcomes (source TEXT NOT NULL, outcome TEXT NOT NULL,
        n INTEGER NOT NULL, PRIMARY KEY (source, outcome)) WITHOUT ROWID""")
    d.execute("""CREATE TABLE metric_latency (le REAL PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0,
        total REAL NOT NULL DEFAULT 0)""")
    count = (
        "INSERT INTO metric_outcomes VALUES (new.source, new.outcome, 1) "
        "ON CONFLICT (source, outcome) DO UPDATE SET n = n + 1"
    )
    d.execute(
        "CREATE TRIGGER inbound_outcome_ai AFTER INSERT ON inbound "
        f"WHEN new.outcome IS NOT NULL BEGIN {count}; END"
    )
    d.execute(
        "CREATE TRIGGER inbound_outcome_au AFTER UPDATE OF outcome ON inbound "
        f"WHEN new.outcome IS NOT NULL AND new.outcome IS NOT old.outcome BEGIN {count}; END"
    )
    d.execute(
        "CREATE TRIGGER inbound_latency_au AFTER UPDATE OF processed_at ON inbound "
        "WHEN new.processed_at IS NOT NULL AND new.processed_at IS NOT old.processed_at "
        f"AND new.duplicate_of IS NULL BEGIN UPDATE metric_latency SET n = n + 1, "
        f"total = total + {_LATENCY} WHERE le = (SELECT MIN(le) FROM metric_latency "
        f"WHERE le >= {_LATENCY}); END"
    )
    _backfill_metrics(d)


def _backfill_metrics(d: Database) -> None:
    """What mails processed before this migration add to the counters."""
    d.execute(
        "INSERT INTO metric_outcomes SELECT source, outcome, COUNT(*) FROM inbound "
        "WHERE outcome IS NOT NULL GROUP BY source, outcome"
    )
    for le in LATENCY_BUCKETS:
        d.execute("INSERT INTO metric_latency (le) VALUES (?)", [le])
    latency = _LATENCY.replace("new.", "")
    d.execute(
        f"WITH lat AS (SELECT {latency} AS s FROM inbound WHERE processed_at IS NOT NULL "
        "AND duplicate_of IS NULL), bucketed AS (SELECT s, (SELECT MIN(le) FROM "
        "metric_latency WHERE le >= s) AS le FROM lat), sums AS (SELECT le, COUNT(*) AS n, "
        "SUM(s) AS total FROM bucketed GROUP BY le) UPDATE metric_latency SET "
        "n = sums.n, total = sums.total FROM sums WHERE sums.le = metric_latency.le"
    )


# Append only: a migration, once released, is never edited; its number is its position.
MIGRATIONS: list[Callable[[Database], None]] = [
    _m1_core,
    _m2_search,
    _m3_outbox,
    _m4_imap,
    _m5_scores,
]


def migrate(d: Database) -> None:
    """Bring `d` up to date (Database.__init__'s `migrate` flag shadows this name there)."""
    _migrate(d)


def _migrate(d: Database) -> None:
    d.execute(
        "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
    )
    with d.write():
        done = int(d.value("SELECT COALESCE(MAX(version), 0) FROM migrations"))
        for version, step in enumerate(MIGRATIONS[done:], start=done + 1):
            step(d)
            d.execute("INSERT INTO migrations VALUES (?, datetime('now'))", [version])
