"""An import batch applied in one transaction: each mail in its own savepoint, so one that
fails leaves nothing behind and the others are kept; attempts are counted before the work."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.inbound import files
from gateway.mail import parse
from gateway.model import Classification, Envelope, Match, ParsedMail, Plan, Result
from gateway.pipeline import Pipeline
from gateway.store.db import NotDurable
from gateway.store.records import Records
from tests.conftest import Clock, mail, run_cli

RCPT = ("support@localhost",)


class FlakyRecords(Records):
    """Raises after writing all of the mail with subject `subject`, its first `times` times."""

    def __init__(self, app: App, subject: str, times: int) -> None:
        super().__init__(app.db, app.records.prefix, app.records.width)
        self.subject, self.times, self.failures = subject, times, 0

    def apply(self, inbound_id: int, mail: ParsedMail, kind: Classification,
              found: Match | None, plan: Plan, now: datetime) -> Result:
        result = super().apply(inbound_id, mail, kind, found, plan, now)
        if mail.subject == self.subject and self.failures < self.times:
            self.failures += 1
            raise RuntimeError("the disk caught fire")
        return result


def import_three(app: App, clock: Clock, tmp_path: Path, times: int) -> dict[str, Any]:
    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.eml").write_bytes(
            mail(f"Case {name}", "Broken.", f"Dr {name} <{name}@practice.example>"))
    flaky = FlakyRecords(app, "Case b", times)
    pipeline = Pipeline(flaky, app.spool, app.blobs, app.pipeline.p, app.pipeline.notifier, clock)
    outcomes = files.run_import(pipeline, folder, lambda n: None, batch=3, workers=2)
    b = app.db.row("SELECT * FROM inbound ORDER BY id LIMIT 1 OFFSET 1")  # a, b, c in order
    assert b is not None
    return {"outcomes": outcomes, "b": b,
            "ecrs": app.db.value("SELECT COUNT(*) FROM ecrs"),
            "contacts": app.db.value("SELECT COUNT(*) FROM contacts"),
            "updates": app.db.value("SELECT COUNT(*) FROM updates")}


def test_a_mail_failing_once_in_a_batch_is_applied_once_on_its_retry(
    app: App, clock: Clock, tmp_path: Path
) -> None:
    got = import_three(app, clock, tmp_path, times=1)
    assert got["outcomes"]["created"] == 3
    assert (got["ecrs"], got["contacts"], got["updates"]) == (3, 3, 3)
    assert (got["b"]["state"], got["b"]["attempts"]) == ("done", 2)


def test_a_mail_failing_for_good_leaves_nothing_and_the_batch_is_kept(
    app: App, clock: Clock, tmp_path: Path
) -> None:
    got = import_three(app, clock, tmp_path, times=3)
    assert (got["outcomes"]["created"], got["outcomes"]["quarantined"]) == (2, 1)
    assert (got["ecrs"], got["contacts"], got["updates"]) == (2, 2, 2)
    assert (got["b"]["state"], got["b"]["failed_step"], got["b"]["attempts"]) == (
        "quarantined", "apply", 3)


def test_a_write_inside_a_write_is_undone_alone(app: App) -> None:
    db = app.db
    with db.write():
        db.execute("INSERT INTO health_probe VALUES (1, 'outer')")
        with pytest.raises(RuntimeError), db.write():
            db.execute("UPDATE health_probe SET at = 'inner'")
            raise RuntimeError("undo me")
        with pytest.raises(RuntimeError, match="durable"), db.write(durable=True):
            pass
    assert db.value("SELECT at FROM health_probe") == "outer"


def test_a_mail_that_raises_in_the_pool_fails_alone() -> None:
    good = mail("Printer", "Broken.")
    got = files._parse_each([good, None, good], parse.Limits())  # type: ignore[list-item]
    assert isinstance(got[0], ParsedMail) and isinstance(got[2], ParsedMail)
    assert isinstance(got[1], TypeError)


def test_an_import_parsed_a_few_mails_a_task_keeps_their_order(
    app: App, tmp_path: Path
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    subjects = [f"Case {n:02d}" for n in range(files.PER_TASK * 2 + 3)]
    for n, subject in enumerate(subjects):
        (folder / f"{n:02d}.eml").write_bytes(mail(subject, "Broken."))
    files.run_import(app.pipeline, folder, lambda n: None, batch=files.PER_TASK + 7, workers=2)
    rows = app.db.rows("SELECT subject FROM ecrs ORDER BY id")
    assert [r["subject"] for r in rows] == subjects


def test_finish_parses_the_mail_it_is_given_not_the_one_parsed_during_acceptance(
    app: App,
) -> None:
    accepted = app.pipeline.accept(Envelope(mail("Accepted"), "ingest", "", ("support@localhost",)))
    result = app.pipeline.finish(accepted, mail("Handed over"))
    assert str(result.outcome) == "created"
    assert app.db.value("SELECT subject FROM ecrs") == "Handed over"


def test_a_mail_parsed_during_acceptance_is_processed_from_that_parse(app: App) -> None:
    raw = mail("Printer", "It prints blank pages.")
    accepted = app.pipeline.accept(Envelope(raw, "ingest", "", ("support@localhost",)))
    result = app.pipeline.finish(accepted, raw)
    assert str(result.outcome) == "created"
    assert app.db.value("SELECT subject FROM ecrs") == "Printer"


def committed(app: App, sql: str) -> Any:
    """What another connection sees: what is committed, nothing else."""
    with closing(sqlite3.connect(app.settings.data_dir / "gateway.db")) as other:
        return other.execute(sql).fetchone()[0]


def test_a_lone_mail_is_parsed_while_its_spool_file_syncs_and_recorded_after_the_sync(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store import files as store_files

    seen: list[str] = []
    syncing = threading.Event()
    real_parse, real_accept = parse.parse, app.records.accept

    def slow_sync(fd: int) -> bool:
        syncing.set()
        time.sleep(0.2)  # a slow disk: the parse has time to run meanwhile
        rows = committed(app, "SELECT COUNT(*) FROM inbound")
        seen.append("synced" if rows == 0 else "synced after the row's commit")
        return True

    def parse_during_sync(raw: bytes, limits: parse.Limits) -> object:
        seen.append("parsed while syncing" if syncing.is_set() and not seen else "parsed")
        return real_parse(raw, limits)

    def record(arrivals: Any, beside: bool = False) -> Any:
        seen.append("recorded")
        return real_accept(arrivals, beside)

    monkeypatch.setattr(store_files, "_syncfs_fd", slow_sync)
    monkeypatch.setattr(parse, "parse", parse_during_sync)
    monkeypatch.setattr(app.records, "accept", record)
    raw = mail("Printer", "It prints blank pages.")
    result = app.pipeline.finish(app.pipeline.accept(Envelope(raw, "ingest", "", RCPT)), raw)
    assert seen == ["parsed while syncing", "synced", "recorded"]  # parsed once, not again
    assert str(result.outcome) == "created"


def test_a_lone_mail_whose_spool_sync_fails_is_not_accepted(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store import files as store_files

    def failing_sync(fd: int) -> bool:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_files, "_syncfs_fd", failing_sync)
    with pytest.raises(OSError):
        app.pipeline.accept(Envelope(mail("Printer", "Blank pages."), "ingest", "", RCPT))
    assert app.db.value("SELECT COUNT(*) FROM inbound") == 0
    assert not app.db.conn.in_transaction


def test_a_lone_mail_is_applied_while_its_row_is_flushed_and_its_outcome_committed_after(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store import db as store_db

    seen: list[str] = []
    flushing = threading.Event()
    real_datasync, real_classify = store_db.datasync_fd, app.pipeline._classify

    def slow_datasync(fd: int) -> None:
        flushing.set()
        time.sleep(0.2)  # a slow disk: the mail is applied meanwhile
        row = committed(app, "SELECT state FROM inbound")
        ecrs = committed(app, "SELECT COUNT(*) FROM ecrs")
        seen.append(f"flushed, row {row}, {ecrs} ECRs")
        real_datasync(fd)

    def classify(*args: Any) -> Any:
        seen.append("applied while flushing" if flushing.is_set() and not seen else "applied")
        return real_classify(*args)

    monkeypatch.setattr(store_db, "datasync_fd", slow_datasync)
    monkeypatch.setattr(app.pipeline, "_classify", classify)
    raw = mail("Printer", "It prints blank pages.")
    result = app.pipeline.finish(app.pipeline.accept(Envelope(raw, "ingest", "", RCPT)), raw)
    assert seen == ["applied while flushing", "flushed, row accepted, 0 ECRs"]
    assert str(result.outcome) == "created"
    assert committed(app, "SELECT state FROM inbound") == "done"


def test_a_lone_mail_whose_row_flush_fails_is_not_acknowledged_and_is_processed_later(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store import db as store_db

    real_datasync = store_db.datasync_fd

    def failing_datasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_db, "datasync_fd", failing_datasync)
    raw = mail("Printer", "It prints blank pages.")
    accepted = app.pipeline.accept(Envelope(raw, "ingest", "", RCPT))
    with pytest.raises(NotDurable, match="Input/output error"):
        app.pipeline.finish(accepted, raw)
    # Nothing of the processing was committed; the row stays for whoever comes next (it may
    # be lost in a crash, and then the sender, told to retry, sends the mail again).
    assert committed(app, "SELECT state || '/' || attempts FROM inbound") == "accepted/1"
    assert committed(app, "SELECT COUNT(*) FROM ecrs") == 0
    assert not app.db.conn.in_transaction
    monkeypatch.setattr(store_db, "datasync_fd", real_datasync)
    (later,) = app.pipeline.process_waiting()
    assert str(later.outcome) == "created"
    assert committed(app, "SELECT COUNT(*) FROM ecrs") == 1


def test_cli_ingest_whose_row_flush_fails_asks_the_mta_to_retry(
    data_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "good.eml"
    path.write_bytes(mail("Printer", "It prints blank pages."))
    failing = (
        "import sys\n"
        "from gateway.store import db\n"
        "def datasync(fd): raise OSError(5, 'Input/output error')\n"
        "db.datasync_fd = datasync\n"
        "from gateway.cli import cli\n"
        "cli(sys.argv[1:])\n"
    )
    environ = {**os.environ, "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data_dir)}
    environ.pop("ECR_GATEWAY_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", failing, "ingest", str(path)],
                          capture_output=True, env=environ, timeout=120)
    assert proc.returncode == 75
    assert proc.stdout == b""
    (line,) = proc.stderr.decode().strip().splitlines()
    assert "not accepted, try later: NotDurable" in line
    retried = run_cli(data_dir, "ingest", str(path))  # the MTA's retry, on a healthy disk
    assert retried.returncode == 0
    with closing(sqlite3.connect(data_dir / "gateway.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM ecrs").fetchone()[0] == 1


def test_a_parse_that_raises_during_acceptance_leaves_the_mail_accepted_and_quarantined(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes, limits: parse.Limits) -> ParsedMail:
        raise RuntimeError("the parser fell over")

    monkeypatch.setattr(parse, "parse", broken)
    raw = mail("Printer", "It prints blank pages.")
    accepted = app.pipeline.accept(Envelope(raw, "ingest", "", RCPT))  # raises nothing
    result = app.pipeline.finish(accepted, raw)
    assert str(result.outcome) == "quarantined" and result.reason == "failed at parse"
    row = app.records.inbound(accepted.inbound_id)
    assert row is not None and row["attempts"] == app.settings.gateway.max_attempts


def test_a_large_mail_is_accepted_before_it_is_parsed(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import pipeline

    rows: list[int] = []
    real_parse = parse.parse

    def counting_parse(raw: bytes, limits: parse.Limits) -> object:
        rows.append(int(app.db.value("SELECT COUNT(*) FROM inbound")))
        return real_parse(raw, limits)

    monkeypatch.setattr(parse, "parse", counting_parse)
    big = mail("Logs", "x" * (pipeline.EARLY_PARSE_LIMIT + 1))
    app.pipeline.finish(app.pipeline.accept(Envelope(big, "ingest", "", RCPT)), big)
    small = mail("Printer", "Blank pages.")
    app.pipeline.finish(app.pipeline.accept(Envelope(small, "ingest", "", RCPT)), small)
    assert rows == [1, 1]  # the large one parsed after its row, the small one before its own


def test_a_batch_whose_rows_cannot_be_committed_leaves_no_mail_in_the_spool(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender is told to send again (451), so the raw mails, patient data that no row
    names, are not kept; a lone mail's bytes stay in the journal, which accepted mails share."""
    [first] = app.pipeline.accept_many([Envelope(mail(subject="Accepted"), "smtp")])
    kept = str(app.db.value("SELECT spool_path FROM inbound WHERE id = ?", [first.inbound_id]))

    def locked(*args: Any, **kw: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(app.pipeline.records, "accept", locked)
    for count in (2, 1):
        envelopes = [Envelope(mail(subject=f"Refused {n}"), "smtp") for n in range(count)]
        with pytest.raises(sqlite3.OperationalError):
            app.pipeline.accept_many(envelopes)
    assert app.pipeline.spool.files() == [kept.partition("#")[0]]
    assert b"Accepted" in app.pipeline.spool.read(kept)


def test_an_interruption_after_the_commit_keeps_the_spool_file_its_rows_name(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """^C during an import, after a batch's commit (while its log lines are written): the
    rows stand, so their spool file must too."""
    from gateway import pipeline as pipeline_mod

    def interrupted(*args: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_mod.log, "info", interrupted)
    envelopes = [Envelope(mail(subject=f"Committed {n}"), "import") for n in range(3)]
    with pytest.raises(KeyboardInterrupt):
        app.pipeline.accept_many(envelopes)
    names = [str(r["spool_path"]) for r in app.db.rows("SELECT spool_path FROM inbound")]
    assert len(names) == 3
    assert [b"Committed" in app.pipeline.spool.read(n) for n in names] == [True] * 3


def test_discarding_never_removes_a_journal_even_an_earlier_one(tmp_path: Path) -> None:
    from gateway.store.files import Spool

    spool = Spool(tmp_path / "spool", journal_limit=10)
    first = spool.write_many([b"accepted"])[0]
    second = spool.write_many([b"refused one"])[0]  # past the limit: a second journal
    spool.discard([first, second])
    assert spool.read(first) == b"accepted" and spool.read(second) == b"refused one"
    spool.close()
