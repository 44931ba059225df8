"""Hostile inputs too big or too odd to keep as .eml files, generated here and ingested through
the pipeline: each must end as a recorded outcome with the reason named, never a traceback.
Also the exit codes the MTA and the operator see from the `ecr-gateway` command."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import App, build_app
from gateway.model import Envelope, Outcome
from gateway.pipeline import Pipeline, sniff_message_id
from gateway.store.files import Blobs
from tests.conftest import TEST_KEY, Clock, ingest, mail, make_settings, run_cli

HEAD = (
    b"From: Dr A <gp@practice.example>\r\nTo: support@localhost\r\n"
    b"Message-ID: <%s@practice.example>\r\nSubject: %s\r\nMIME-Version: 1.0\r\n"
)


def count(app: App, table: str) -> int:
    return int(app.db.value(f"SELECT COUNT(*) FROM {table}"))


def row(app: App, inbound_id: int) -> dict[str, object]:
    found = app.records.inbound(inbound_id)
    assert found is not None
    return found


def nested(levels: int, tag: bytes) -> bytes:
    """`levels` multiparts, each holding the next; the innermost holds one text part."""
    opens = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(levels)
    )
    closes = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(levels)))
    text = b"Content-Type: text/plain\r\n\r\nThe printer is broken.\r\n"
    return HEAD % (tag, b"deep") + opens + text + closes


def siblings(parts: int, tag: bytes) -> bytes:
    """One multipart holding `parts` text parts side by side."""
    head = HEAD % (tag, b"wide") + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
    one = b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return head + one * parts + b"--B--\r\n"


def app_with(tmp_path: Path, clock: Clock, **env: str) -> App:
    """A second app over its own data dir, with settings from the environment."""
    d = tmp_path / "data-limited"
    d.mkdir()
    (d / "secret.key").write_text(TEST_KEY + "\n")
    return build_app(make_settings(d, env), clock=clock)


@pytest.fixture
def small_app(tmp_path: Path, clock: Clock) -> Iterator[App]:
    a = app_with(
        tmp_path,
        clock,
        ECR_GATEWAY_SMTP__MAX_MESSAGE_SIZE="4096",
        ECR_GATEWAY_LIMITS__MAX_ATTACHMENT_SIZE="1000",
    )
    yield a
    a.close()


def assert_quarantined(app: App, result: object, bound: str) -> None:
    assert result.outcome is Outcome.QUARANTINED  # type: ignore[attr-defined]
    assert bound in result.reason  # type: ignore[attr-defined]
    r = row(app, result.inbound_id)  # type: ignore[attr-defined]
    assert r["state"] == "quarantined"
    assert r["outcome"] == "quarantined"
    assert bound in str(r["reason"])
    assert r["error"] is None  # a bound, not a crash
    assert count(app, "ecrs") == 0


# --- parser bounds ------------------------------------------------------------------------------


def test_2000_level_nesting_is_quarantined_naming_the_depth_bound(app: App) -> None:
    result = ingest(app, nested(2000, b"deep-2000"))
    assert_quarantined(app, result, "max_mime_depth")


def test_nesting_just_over_the_depth_bound_is_quarantined_and_at_it_is_not(app: App) -> None:
    assert_quarantined(app, ingest(app, nested(51, b"deep-51")), "max_mime_depth")
    at_bound = ingest(app, nested(50, b"deep-50"))
    assert at_bound.outcome is Outcome.CREATED
    assert "printer is broken" in app.db.value("SELECT full_text FROM updates")


def test_100000_sibling_parts_are_quarantined_naming_the_part_bound(app: App) -> None:
    result = ingest(app, siblings(100_000, b"wide-100000"))
    assert_quarantined(app, result, "max_parts")


def test_part_bound_counts_the_mail_itself(app: App) -> None:
    assert_quarantined(app, ingest(app, siblings(1000, b"wide-1000")), "max_parts")
    assert ingest(app, siblings(999, b"wide-999")).outcome is Outcome.CREATED


def test_mail_just_over_max_message_size_is_quarantined(small_app: App) -> None:
    assert small_app.settings.smtp.max_message_size == 4096
    over = mail(body="The printer is broken.")
    over += b"x" * (4097 - len(over))
    assert len(over) == 4097
    assert_quarantined(small_app, ingest(small_app, over), "max_message_size")
    at_limit = mail(body="The printer is broken.")
    at_limit += b"x" * (4096 - len(at_limit))
    assert ingest(small_app, at_limit).outcome is Outcome.CREATED


def test_header_block_over_max_header_size_is_quarantined(app: App) -> None:
    limit = app.settings.limits.max_header_size
    pad = b"X-Pad: " + b"p" * 990 + b"\r\n"
    raw = HEAD % (b"big-head", b"headers") + pad * (limit // len(pad) + 1)
    raw += b"\r\nThe printer is broken.\r\n"
    assert raw.index(b"\r\n\r\n") > limit
    assert_quarantined(app, ingest(app, raw), "max_header_size")


@pytest.mark.parametrize("junk", [b"\x0c", b"\x00", b"\x1c"])
def test_message_id_with_a_control_character_is_not_kept(app: App, junk: bytes) -> None:
    """Such an id would be echoed into our acknowledgement's In-Reply-To and break it."""
    raw = mail(message_id="<a-JUNK-1@practice.example>").replace(b"-JUNK-", junk)
    result = ingest(app, raw)
    assert result.outcome is Outcome.CREATED
    r = row(app, result.inbound_id)
    assert (r["error"], r["message_id"]) == (None, None)
    assert r["dedupe_key"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    sent = [app.notifier.message(r["spec"]) for r in app.db.rows("SELECT spec FROM outbox")]
    assert sent  # the acknowledgement was still queued, and renders
    assert all(junk not in m for m in sent)


@pytest.mark.parametrize(
    "param",
    [
        b'charset="ut\x00f-8"',  # a NUL in the codec name
        b"charset*=utf-8''utf-8",  # RFC 2231: the library hands the codec lookup a tuple
        b"charset*=utf-8''ut%00f-8",
        b"charset*=utf-8''%ED%B3%BF",  # a lone surrogate once decoded
        b"charset*0*=utf-8''utf; charset*1=-8",
    ],
)
def test_8bit_part_with_an_unusable_charset_parameter_is_read(app: App, param: bytes) -> None:
    raw = (
        b"From: Dr A <gp@practice.example>\nTo: support@localhost\nSubject: Printer\n"
        b"Message-ID: <charset-1@practice.example>\nMIME-Version: 1.0\n"
        b"Content-Type: text/plain; " + param + b"\nContent-Transfer-Encoding: 8bit\n\n"
        + "Caf\u00e9 printer broken.\n".encode()
    )
    result = ingest(app, raw)
    assert result.outcome is Outcome.CREATED
    assert row(app, result.inbound_id)["error"] is None
    assert app.db.value("SELECT text FROM updates") == "Caf\u00e9 printer broken."


def test_multipart_cut_off_in_a_nested_part_header_is_read(app: App) -> None:
    # Found by the property test: mail-parser's epilogue recovery raised on this (no epilogue).
    raw = (
        b"From: Dr A <gp@practice.example>\r\nTo: support@localhost\r\nSubject: Scan\r\n"
        b"Message-ID: <cut-1@practice.example>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="==B=="\r\n\r\n--==B==\n'
        b'Content-Type: multipart/mixed; boundary="==B=="\r'
    )
    result = ingest(app, raw)
    assert result.outcome is Outcome.CREATED
    assert row(app, result.inbound_id)["failed_step"] is None



def test_ingest_parses_the_mail_it_holds_without_reading_it_back(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One copy of a 25 MB mail in memory, not two: the spool is for recovery and replay.
    def no_read_back(name: str) -> bytes:
        raise AssertionError(f"read {name} back from the spool")

    monkeypatch.setattr(app.pipeline.spool, "read", no_read_back)
    result = ingest(app, mail())
    assert result.outcome is Outcome.CREATED
    assert row(app, result.inbound_id)["failed_step"] is None

# --- attachments --------------------------------------------------------------------------------


def test_25mb_attachment_is_stored_once_under_its_sha256(app: App, data_dir: Path) -> None:
    data = os.urandom(app.settings.limits.max_attachment_size)  # 25 MiB: the limit is allowed
    sha = hashlib.sha256(data).hexdigest()
    first = ingest(app, mail(attachments=[("scan.pdf", "application/pdf", data)]))
    again = ingest(app, mail(subject="Same scan", attachments=[("x.pdf", "application/pdf", data)]))
    assert first.outcome is Outcome.CREATED
    assert again.outcome is Outcome.CREATED
    stored = data_dir / "attachments" / sha[:2] / sha[2:4] / sha
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
    blobs = [p for p in (data_dir / "attachments").rglob("*") if p.is_file()]
    assert blobs == [stored]  # same bytes stored once, nothing half-written left behind
    rows = app.db.rows("SELECT sha256, size, filename FROM attachments ORDER BY id")
    assert [(r["sha256"], r["size"]) for r in rows] == [(sha, len(data))] * 2
    assert [r["filename"] for r in rows] == ["scan.pdf", "x.pdf"]


def test_attachment_over_max_attachment_size_is_quarantined(small_app: App) -> None:
    data = b"\x89PNG" + b"z" * 997  # 1,001 bytes against a limit of 1,000
    raw = mail(attachments=[("photo.png", "image/png", data)])
    result = ingest(small_app, raw)
    assert_quarantined(small_app, result, "max_attachment_size")
    assert not small_app.blobs.path(hashlib.sha256(data).hexdigest()).exists()
    fits = ingest(small_app, mail(attachments=[("photo.png", "image/png", data[:1000])]))
    assert fits.outcome is Outcome.CREATED


# --- dedupe -------------------------------------------------------------------------------------


def test_same_mail_twice_is_a_duplicate_and_one_ecr(app: App) -> None:
    raw = mail()
    first, second = ingest(app, raw), ingest(app, raw)
    assert first.outcome is Outcome.CREATED
    assert second.outcome is Outcome.DUPLICATE
    assert second.ref == first.ref == "ECR-000001"
    assert row(app, second.inbound_id)["duplicate_of"] == first.inbound_id
    assert count(app, "ecrs") == 1
    assert count(app, "updates") == 1


def test_same_mail_without_message_id_twice_is_a_duplicate_by_sha256(app: App) -> None:
    raw = mail(message_id=None)
    assert b"Message-ID" not in raw
    first, second = ingest(app, raw), ingest(app, raw)
    assert (first.outcome, second.outcome) == (Outcome.CREATED, Outcome.DUPLICATE)
    key = "sha256:" + hashlib.sha256(raw).hexdigest()
    assert row(app, first.inbound_id)["dedupe_key"] == key
    assert row(app, second.inbound_id)["duplicate_of"] == first.inbound_id
    assert count(app, "ecrs") == 1
    # One byte more is another mail.
    assert ingest(app, raw + b"\n").outcome is Outcome.CREATED


def test_same_message_id_with_other_bytes_is_a_duplicate(app: App) -> None:
    first = ingest(app, mail("Printer", "broken", message_id="<Same.1@Practice.Example>"))
    second = ingest(app, mail("Scanner", "jams", message_id="< same.1@practice.example >"))
    assert (first.outcome, second.outcome) == (Outcome.CREATED, Outcome.DUPLICATE)
    assert row(app, second.inbound_id)["dedupe_key"] == "mid:same.1@practice.example"
    assert count(app, "ecrs") == 1
    assert app.db.value("SELECT subject FROM ecrs") == "Printer"


def test_the_same_mail_twice_in_one_accepted_batch_is_a_duplicate_of_the_first(app: App) -> None:
    """A batch (an IMAP fetch, an SMTP group commit) looks its keys up in one query: a key
    that first appears in the batch itself must still make the second one a duplicate."""
    known, raw = mail("Known", "first"), mail("Twice", "in one batch")
    earlier = ingest(app, known)
    batch = [Envelope(r, "imap:test") for r in (raw, known, raw, mail("Other", "new"))]
    accepted = app.pipeline.accept_many(batch)
    assert [a.duplicate_of for a in accepted] == [
        None,
        earlier.inbound_id,
        accepted[0].inbound_id,
        None,
    ]
    assert row(app, accepted[1].inbound_id)["ecr_id"] == row(app, earlier.inbound_id)["ecr_id"]
    results = app.pipeline.process_waiting()
    assert sorted(r.outcome for r in results) == [Outcome.CREATED, Outcome.CREATED]
    assert count(app, "ecrs") == 3


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"Subject: x\r\nMessage-ID:\r\n <Folded@Example.org>\r\n", "folded@example.org"),
        (b"Subject: x\nmessage-id: <bare.lf@example.org>\n", "bare.lf@example.org"),
        (b"MESSAGE-ID: no-brackets@example.org\r\n", "no-brackets@example.org"),
        (b"Message-ID: =?utf-8?Q?=3Cword@example.org=3E?=\r\n", "word@example.org"),
        (b"Subject: x\r\n Message-ID: <in-a-subject@example.org>\r\n", ""),
        (b"Message-ID: no id here\r\n", ""),
    ],
)
def test_the_message_id_is_sniffed_from_the_header_block_only(head: bytes, expected: str) -> None:
    body = b"Message-ID: <in-the-body@example.org>\r\n"
    eol = b"\n\n" if b"\r" not in head else b"\r\n"
    assert sniff_message_id(head + eol + body) == expected


# --- failures and replay ------------------------------------------------------------------------


class BrokenBlobs(Blobs):
    """An attachment store whose disk has gone away."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls = 0

    def put(self, sha256: str, data: bytes) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")


def test_processing_that_raises_is_quarantined_after_3_attempts_then_replayed(
    app: App, clock: Clock, tmp_path: Path
) -> None:
    broken = BrokenBlobs(tmp_path / "broken")
    faulty = Pipeline(app.records, app.spool, broken, app.pipeline.p, clock)
    raw = mail(attachments=[("log.txt", "text/plain", b"error 42\n")])

    result = faulty.ingest(Envelope(raw, "ingest", "", ("support@localhost",)))
    assert result.outcome is Outcome.QUARANTINED
    assert result.reason == "failed at apply"
    r = row(app, result.inbound_id)
    assert (r["state"], r["failed_step"], r["attempts"]) == ("quarantined", "apply", 3)
    assert "No space left on device" in str(r["error"])
    assert broken.calls == 3
    assert count(app, "ecrs") == 0
    # Processing a quarantined row again changes nothing until it is released.
    assert faulty.process(result.inbound_id).outcome is Outcome.QUARANTINED
    assert broken.calls == 3

    # `quarantine replay`, once the fault is gone: release, then process with the real store.
    assert app.records.release(result.inbound_id)
    assert not app.records.release(result.inbound_id)  # no longer quarantined
    replayed = app.pipeline.process(result.inbound_id)
    assert replayed.outcome is Outcome.CREATED
    assert replayed.ref == "ECR-000001"
    r = row(app, result.inbound_id)
    assert (r["state"], r["failed_step"], r["error"], r["attempts"]) == ("done", None, None, 1)
    sha = hashlib.sha256(b"error 42\n").hexdigest()
    assert app.blobs.read(sha) == b"error 42\n"
    assert count(app, "ecrs") == 1


# --- the command's exit codes -------------------------------------------------------------------


def stderr_lines(proc: object) -> list[str]:
    return proc.stderr.decode().strip().splitlines()  # type: ignore[attr-defined]


def test_cli_ingest_of_a_missing_file_is_a_usage_error(data_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(data_dir, "ingest", str(tmp_path / "nope.eml"))
    assert proc.returncode == 64
    assert proc.stdout == b""
    assert len(stderr_lines(proc)) == 1
    assert "nope.eml" in stderr_lines(proc)[0]


def test_cli_ingest_of_a_good_mail_prints_one_json_line(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "good.eml"
    path.write_bytes(mail())
    proc = run_cli(data_dir, "ingest", "--recipient", "support@localhost", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"inbound_id", "outcome", "ref", "rung", "reason"}
    assert (out["outcome"], out["ref"], out["rung"]) == ("created", "ECR-000001", "new")
    # From stdin the same bytes are a duplicate, and still exit 0.
    again = run_cli(data_dir, "ingest", "-", stdin=path.read_bytes())
    assert again.returncode == 0
    assert json.loads(again.stdout)["outcome"] == "duplicate"


def test_cli_ingest_into_an_unwritable_spool_asks_the_mta_to_retry(
    data_dir: Path, tmp_path: Path
) -> None:
    spool = data_dir / "spool"
    (spool / "tmp").mkdir(parents=True)
    path = tmp_path / "good.eml"
    path.write_bytes(mail())
    spool.chmod(0o500)
    (spool / "tmp").chmod(0o500)
    try:
        if os.access(spool, os.W_OK) or os.access(spool / "tmp", os.W_OK):
            pytest.skip("running as a user who can write to a mode 0500 directory (root)")
        proc = run_cli(data_dir, "ingest", str(path))
    finally:
        (spool / "tmp").chmod(0o700)
        spool.chmod(0o700)
    assert proc.returncode == 75
    assert proc.stdout == b""
    assert len(stderr_lines(proc)) == 1
    assert "Traceback" not in proc.stderr.decode()


def test_cli_ingest_when_the_spool_is_not_a_directory_asks_the_mta_to_retry(
    data_dir: Path, tmp_path: Path
) -> None:
    """The same contract without needing a non-root user: any failure to accept is 75."""
    (data_dir / "spool").write_bytes(b"")
    path = tmp_path / "good.eml"
    path.write_bytes(mail())
    proc = run_cli(data_dir, "ingest", str(path))
    assert proc.returncode == 75
    assert proc.stdout == b""
    assert len(stderr_lines(proc)) == 1
    assert "Traceback" not in proc.stderr.decode()


def test_cli_show_of_a_missing_ecr_is_one_line(data_dir: Path) -> None:
    proc = run_cli(data_dir, "ecr", "show", "ECR-000999")
    assert proc.returncode != 0
    assert proc.stdout == b""
    lines = stderr_lines(proc)
    assert len(lines) == 1
    assert "ECR-000999" in lines[0]
    assert "Traceback" not in proc.stderr.decode()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[smtp]\nport = "twenty-five"\n', "smtp.port"),
        ("[smtp]\nport = 70000\n", "smtp.port"),
        ("[limits]\nmax_parts = 0\n", "limits.max_parts"),
        ("[gateway]\nno_such_key = 1\n", "gateway.no_such_key"),
    ],
)
def test_cli_bad_config_value_is_one_line_naming_the_key(
    data_dir: Path, tmp_path: Path, toml: str, key: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    proc = run_cli(data_dir, "--config", str(config), "ecr", "list")
    assert proc.returncode != 0
    lines = stderr_lines(proc)
    assert len(lines) == 1
    assert key in lines[0]
    assert "Traceback" not in proc.stderr.decode()


def test_a_mail_that_kept_killing_the_process_is_quarantined_not_retried(app: App) -> None:
    """Attempts are counted before the work: ten starts that died on this mail (each left
    attempts incremented and no ending) mean the eleventh does not try again."""
    accepted = app.pipeline.accept(Envelope(mail(), "ingest", "", ("support@localhost",)))
    app.db.execute("UPDATE inbound SET attempts = 10 WHERE id = ?", [accepted.inbound_id])
    result = app.pipeline.process(accepted.inbound_id)
    assert result.outcome == "quarantined" and "interrupted 10 times" in result.reason
    assert app.db.value("SELECT COUNT(*) FROM ecrs") == 0
    assert app.records.inbound(accepted.inbound_id)["state"] == "quarantined"  # type: ignore[index]
