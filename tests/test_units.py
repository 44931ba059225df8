"""Fast tests of the pure modules with hand-built inputs: tokens, file names, references, the
status-rule helpers, classification and settings."""

from __future__ import annotations

import email
import email.header
import email.message
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load_settings
from gateway.mail import classify, names, rules, tokens
from gateway.mail import parse as parse_mod
from gateway.mail.match import reference_pattern
from gateway.mail.parse import identity, parse
from gateway.model import Address, Kind, ParsedMail
from gateway.store.db import Database
from gateway.store.files import Spool, span
from tests.conftest import mail

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
KEY = bytes.fromhex("11" * 32)
OTHER_KEY = bytes.fromhex("22" * 32)

# --- tokens -------------------------------------------------------------------------------------


def reply_token(key: bytes = KEY, days: int = 30, purpose: tokens.Purpose = tokens.Purpose.REPLY,
                ecr: int = 123, contact: int = 7, counter: int = 2) -> str:
    return tokens.issue(key, purpose, ecr, contact, counter, NOW, timedelta(days=days))


def reason(keys: list[bytes], text: str, purpose: tokens.Purpose = tokens.Purpose.REPLY,
           now: datetime = NOW) -> str:
    with pytest.raises(tokens.TokenError) as caught:
        tokens.verify(keys, text, purpose, now)
    return caught.value.reason


def test_token_round_trip() -> None:
    text = reply_token()
    assert text == text.lower() and text.isalnum()  # fits a case-folding address local part
    got = tokens.verify([KEY], text, tokens.Purpose.REPLY, NOW)
    assert (got.purpose, got.ecr_id, got.contact_id, got.counter) == (
        tokens.Purpose.REPLY, 123, 7, 2)
    assert got.expires > NOW + timedelta(days=30)
    # Some mail systems fold the local part to upper case.
    assert tokens.verify([KEY], text.upper(), tokens.Purpose.REPLY, NOW) == got


def test_tampered_token_is_refused() -> None:
    text = reply_token()
    for i in (0, len(text) // 2, len(text) - 1):
        flipped = text[:i] + ("a" if text[i] != "a" else "b") + text[i + 1 :]
        assert reason([KEY], flipped) in ("tampered", "malformed")
    # The same fields signed with a key we do not hold.
    assert reason([KEY], reply_token(key=OTHER_KEY)) == "tampered"


def test_token_for_another_purpose_is_refused() -> None:
    score = reply_token(purpose=tokens.Purpose.SCORE)
    assert reason([KEY], score, tokens.Purpose.REPLY) == "wrong purpose"
    assert tokens.verify([KEY], score, tokens.Purpose.SCORE, NOW).purpose is tokens.Purpose.SCORE


def test_token_expires_after_its_validity() -> None:
    text = reply_token(days=30)
    assert tokens.verify([KEY], text, tokens.Purpose.REPLY, NOW + timedelta(days=30)).ecr_id == 123
    assert reason([KEY], text, now=NOW + timedelta(days=31, seconds=1)) == "expired"


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "!!!!!!!!", "0189" * 8, "a" * 101, "é" * 32, "abc-def", "a b"]
)
def test_malformed_token_is_refused(text: str) -> None:
    assert reason([KEY], text) == "malformed"


def test_token_length_one_off_is_malformed() -> None:
    text = reply_token()
    assert reason([KEY], text[:-1]) in ("malformed", "tampered")
    assert reason([KEY], text + "a") in ("malformed", "tampered")
    assert reason([KEY], text[:8]) == "malformed"


def test_key_rotation_old_key_still_verifies() -> None:
    old = reply_token(key=KEY)
    new = reply_token(key=OTHER_KEY)
    rotated = [OTHER_KEY, KEY]  # newest first: the first signs, all verify
    assert tokens.verify(rotated, old, tokens.Purpose.REPLY, NOW).ecr_id == 123
    assert tokens.verify(rotated, new, tokens.Purpose.REPLY, NOW).ecr_id == 123
    assert reason([OTHER_KEY], old) == "tampered"  # once the old key is dropped


# --- file names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ctype", "expected"),
    [
        ("../../etc/passwd", "text/plain", "passwd"),
        ("/etc/passwd", "text/plain", "passwd"),
        ("..\\x.ini", "text/plain", "x.ini"),
        ("C:\\Users\\gp\\scan.pdf", "application/pdf", "scan.pdf"),
        ("a\x00.pdf", "application/pdf", "a.pdf"),
        ("re\u202eport\r\n.pdf", "application/pdf", "report.pdf"),  # RLO override, CR, LF
        ("CON", "text/plain", "_CON"),
        ("con.txt", "text/plain", "_con.txt"),
        ("LPT1.doc", "application/msword", "_LPT1.doc"),
        (".htaccess", "text/plain", "htaccess"),
        ("", "application/pdf", "attachment.pdf"),
        ("../", "application/octet-stream", "attachment.bin"),
        ("..", "image/png", "attachment.png"),
        ("Befund Müller.pdf", "application/pdf", "Befund Müller.pdf"),
    ],
)
def test_safe_filename(name: str, ctype: str, expected: str) -> None:
    assert names.safe_filename(name, ctype) == expected


def test_safe_filename_uses_the_default_extension_when_empty() -> None:
    assert names.safe_filename("", "message/rfc822", ".eml") == "attachment.eml"


def test_safe_filename_caps_300_characters_keeping_the_extension() -> None:
    got = names.safe_filename("x" * 296 + ".pdf", "application/pdf")
    assert len(got) == names.MAX_LENGTH
    assert got.endswith(".pdf") and got.startswith("xxx")
    bare = names.safe_filename("y" * 300, "application/pdf")
    assert bare == "y" * names.MAX_LENGTH


def test_safe_filename_never_holds_a_separator_or_control() -> None:
    for name in ["a/b\\c", "..\\..\\..\\windows\\system32", "x\x1b[31m.txt", "\x7f\x85.txt"]:
        got = names.safe_filename(name, "text/plain")
        assert got and "/" not in got and "\\" not in got
        assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in got), got
        assert not got.startswith(".")


# --- references ---------------------------------------------------------------------------------

REF = reference_pattern("ECR-")


@pytest.mark.parametrize(
    "subject",
    [
        "[ECR-000123] Printer",
        "ECR-000123",
        "ECR 123",
        "ECR#123",
        "ecr000123",
        "Ecr_123 still broken",
        "Re: [ECR-000123] Printer",
        "RE: AW: Fwd: ECR-000123",
        "FW: WG: SV: ECR#123",
        "[EXTERNAL] Re: [ECR-000123] Printer",
        "Re:ECR-000123",
        "(ECR-000123)",
    ],
)
def test_reference_pattern_finds_the_number(subject: str) -> None:
    found = REF.search(subject)
    assert found is not None
    assert int(found.group(1)) == 123


@pytest.mark.parametrize(
    "subject",
    ["XECR-1", "ECR-1a", "SPECR-000123", "ECR-", "ECR", "ECRX-1", "ECR--123", "Printer 123"],
)
def test_reference_pattern_needs_word_boundaries(subject: str) -> None:
    assert REF.search(subject) is None


def test_reference_pattern_follows_the_prefix() -> None:
    inc = reference_pattern("INC#")
    assert (m := inc.search("Re: INC-42")) and m.group(1) == "42"
    assert inc.search("ECR-42") is None


# --- thanks and commands ------------------------------------------------------------------------

THANKS = ("thanks", "thank you", "many thanks", "cheers", "ta", "thank you very much")


@pytest.mark.parametrize(
    "text",
    [
        "Thanks",
        "thanks!",
        "Thank you very much.",
        "Many thanks for your help\n\nDr A",
        "Cheers\nJohn",
        "Thank you so much again\n\nKind regards\nDr A\nThe Surgery",
        "Ta very much",
    ],
)
def test_thanks_only(text: str) -> None:
    assert rules.thanks_only(text, THANKS)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Thanks, but it is still broken",
        "Thanks. Can you look again?",
        "Thanks?",
        "Thanksgiving rota is wrong",
        "Take a look at the printer please",
        "The printer works, thanks",
        "Thanks\nthe printer still jams when printing labels\nDr A",
        "Thanks\na\nb\nc\nd",
    ],
)
def test_not_thanks_only(text: str) -> None:
    assert not rules.thanks_only(text, THANKS)


def test_thanks_phrases_are_configurable() -> None:
    assert rules.thanks_only("Danke schön", ("danke schön",))
    assert not rules.thanks_only("Danke schön", THANKS)


def test_commands_at_the_top_are_applied_and_removed() -> None:
    got = rules.commands("\nStatus: Re-activate\nProblem Type: LV  \n\nIt broke again.\n")
    assert got.reactivate
    assert got.problem_type == "LV"
    assert got.notes == ()
    assert got.text == "It broke again."


@pytest.mark.parametrize("value", ["reactivate", "RE-OPEN", "reopen", "Re-Activated"])
def test_reactivate_spellings(value: str) -> None:
    assert rules.commands(f"status : {value}\nhello").reactivate


def test_unknown_command_is_noted_not_applied() -> None:
    got = rules.commands("Status: Closed\nPlease close it.")
    assert not got.reactivate
    assert got.problem_type == ""
    assert got.notes == ("unknown command not applied: Status: Closed",)
    assert got.text == "Please close it."


def test_commands_below_the_text_are_left_alone() -> None:
    text = "Hello\nStatus: Re-activate"
    got = rules.commands(text)
    assert (got.reactivate, got.text, got.notes) == (False, text, ())


# --- classification -----------------------------------------------------------------------------

OWN = classify.Own("inst-42", frozenset({"support@localhost", "bounces@localhost"}))


def parsed(
    subject: str = "Printer broken",
    sender: str | None = "gp@practice.example",
    headers: dict[str, str] | None = None,
    content_type: str = "text/plain",
    report_type: str = "",
) -> ParsedMail:
    return ParsedMail(
        message_id="m1@practice.example",
        subject=subject,
        sender=Address(sender) if sender else None,
        trusted=sender is not None,
        untrusted_reason="",
        to=(Address("support@localhost"),),
        cc=(),
        delivered_to=(),
        in_reply_to=(),
        references=(),
        date=None,
        headers=headers or {},
        body="The printer is broken.",
        new_text="The printer is broken.",
        content_type=content_type,
        report_type=report_type,
    )


def kind_of(mail_: ParsedMail, null_sender: bool = False) -> Kind:
    return classify.classify(mail_, null_sender, OWN).kind


@pytest.mark.parametrize(
    "headers",
    [
        {"auto-submitted": "auto-replied"},
        {"auto-submitted": "auto-generated; owner-email=x@y"},
        {"precedence": "bulk"},
        {"precedence": "Junk"},
        {"precedence": "list"},
        {"precedence": "auto_reply"},
        {"x-autoreply": "yes"},
        {"x-autorespond": "on"},
        {"list-id": "<gp-forum.example>"},
        {"list-unsubscribe": "<mailto:leave@example>"},
        {"return-path": "<>"},
    ],
)
def test_automatic_header_signals(headers: dict[str, str]) -> None:
    assert kind_of(parsed(headers=headers)) is Kind.AUTOMATIC


@pytest.mark.parametrize(
    "sender",
    ["mailer-daemon@mx.example", "postmaster@practice.example", "noreply@nhs.example",
     "no-reply@nhs.example", "noreply+bounce@nhs.example"],
)
def test_role_senders_are_automatic(sender: str) -> None:
    assert kind_of(parsed(sender=sender)) is Kind.AUTOMATIC


@pytest.mark.parametrize(
    "subject",
    ["Out of Office: Printer", "Automatic reply: [ECR-000001] Printer", "Autoreply: away",
     "Abwesenheitsnotiz: Drucker", "Réponse automatique : absent",
     "On annual leave: back on Monday", "Out of office reply"],
)
def test_out_of_office_subjects_are_automatic(subject: str) -> None:
    assert kind_of(parsed(subject=subject)) is Kind.AUTOMATIC


@pytest.mark.parametrize(
    "subject",
    ["Absence recording broken", "Out of office hours cover", "Vacation request system down",
     "On leave module shows wrong dates"],
)
def test_requests_that_merely_start_like_an_out_of_office_are_human(subject: str) -> None:
    assert kind_of(parsed(subject=subject)) is Kind.HUMAN


def test_null_envelope_sender_is_automatic() -> None:
    assert kind_of(parsed(), null_sender=True) is Kind.AUTOMATIC
    assert kind_of(parsed(), null_sender=False) is Kind.HUMAN


def test_delivery_status_report_is_a_bounce() -> None:
    dsn = parsed(content_type="multipart/report", report_type="delivery-status")
    assert kind_of(dsn) is Kind.BOUNCE
    assert kind_of(parsed(headers={"x-failed-recipients": "gp@practice.example"})) is Kind.BOUNCE
    # Other reports (read receipts) are no bounce.
    mdn = parsed(content_type="multipart/report", report_type="disposition-notification")
    assert kind_of(mdn) is Kind.HUMAN


def test_own_loop() -> None:
    assert kind_of(parsed(headers={"x-ecr-loop": "inst-42"})) is Kind.LOOP
    assert kind_of(parsed(headers={"x-ecr-loop": "other, inst-42"})) is Kind.LOOP
    assert kind_of(parsed(sender="support@localhost")) is Kind.LOOP
    # Another gateway's loop header is not ours.
    assert kind_of(parsed(headers={"x-ecr-loop": "inst-4"})) is Kind.HUMAN


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"auto-submitted": "no"},
        {"auto-submitted": "No"},
        {"precedence": "first-class"},
        {"x-auto-response-suppress": "All"},
        {"x-auto-response-suppress": "DR, RN, NRN, OOF, AutoReply"},
        {"return-path": "<gp@practice.example>"},
    ],
)
def test_human_mail(headers: dict[str, str]) -> None:
    got = classify.classify(parsed(headers=headers), False, OWN)
    assert got.kind is Kind.HUMAN
    assert not got.automatic


def test_auto_response_suppress_alone_is_human_through_the_parser() -> None:
    raw = mail(headers={"X-Auto-Response-Suppress": "All"})
    mail_ = parse(raw)
    assert isinstance(mail_, ParsedMail)
    assert mail_.headers.get("x-auto-response-suppress") == "All"
    assert classify.classify(mail_, False, OWN).kind is Kind.HUMAN


# --- settings -----------------------------------------------------------------------------------


def settings_from(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    return load_settings(path, env or {})


def config_error(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from(tmp_path, toml, env)
    return str(caught.value)


def test_defaults_without_a_file() -> None:
    s = load_settings(None, {})
    assert (s.smtp.port, s.limits.max_attachment_size, s.gateway.max_attempts) == (
        2525, 26214400, 3)


def test_toml_then_environment(tmp_path: Path) -> None:
    toml = '[smtp]\nport = 2500\nhost = "127.0.0.2"\n[gateway]\ndomain = "example.org"\n'
    s = settings_from(tmp_path, toml, {"ECR_GATEWAY_SMTP__PORT": "2626"})
    assert s.smtp.port == 2626  # type: ignore[attr-defined]
    assert s.smtp.host == "127.0.0.2"  # type: ignore[attr-defined]
    assert s.support_address == "support@example.org"  # type: ignore[attr-defined]


def test_environment_types(tmp_path: Path) -> None:
    s = settings_from(tmp_path, "", {
        "ECR_GATEWAY_SMTP__ENABLED": "off",
        "ECR_GATEWAY_GATEWAY__EXTRA_ADDRESSES": "lv@localhost, pcs@localhost",
        "ECR_GATEWAY_GATEWAY__PROBLEM_TYPES": '{"lv@localhost": "LV"}',
    })
    assert s.smtp.enabled is False  # type: ignore[attr-defined]
    assert s.gateway.extra_addresses == ["lv@localhost", "pcs@localhost"]  # type: ignore[attr-defined]
    assert s.gateway.problem_types == {"lv@localhost": "LV"}  # type: ignore[attr-defined]


def test_config_file_named_by_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text("[http]\nport = 8181\n")
    assert load_settings(None, {"ECR_GATEWAY_CONFIG": str(path)}).http.port == 8181


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[smtp]\nport = "2525"\n', "smtp.port"),
        ("[smtp]\nport = 25.0\n", "smtp.port"),
        ("[smtp]\nport = true\n", "smtp.port"),
        ("[smtp]\nport = 70000\n", "smtp.port"),
        ("[smtp]\nenabled = 1\n", "smtp.enabled"),
        ('[gateway]\nextra_addresses = "lv@localhost"\n', "gateway.extra_addresses"),
        ("[gateway]\nextra_addresses = [1]\n", "gateway.extra_addresses"),
        ("[gateway]\nthanks_phrases = [1, 2]\n", "gateway.thanks_phrases"),
        ("[gateway]\nproblem_types = {x = 'LV'}\n", "gateway.problem_types"),
        ("[gateway]\nproblem_types = {'lv@x' = 1}\n", "gateway.problem_types"),
        ("[gateway]\nmax_attempts = 0\n", "gateway.max_attempts"),
        ("[gateway]\nref_width = 0\n", "gateway.ref_width"),
        ("[gateway]\nref_prefix = ''\n", "gateway.ref_prefix"),
        ("[gateway]\nref_prefix = '#'\n", "gateway.ref_prefix"),
        ("[gateway]\nreply_token_days = -5\n", "gateway.reply_token_days"),
        ("[gateway]\ndomain = 'a@b'\n", "gateway.domain"),
        ("[gateway]\nreopen_window_days = -1\n", "gateway.reopen_window_days"),
        ("[limits]\nmax_attachment_size = -1\n", "limits.max_attachment_size"),
        ("[limits]\nmax_header_size = 0\n", "limits.max_header_size"),
        ("[limits]\nparse_timeout = 0\n", "limits.parse_timeout"),
        ("[limits]\nmax_mime_depth = 0\n", "limits.max_mime_depth"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
        ("[imap]\nmailboxes = [1]\n", "imap.mailboxes"),
        ("[http]\napi_tokens = {ops = 5}\n", "http.api_tokens"),
        ("[outbound]\nsecurity = 'ssl'\n", "outbound.security"),
        ("[outbound]\nack_limit_per_hour = -1\n", "outbound.ack_limit_per_hour"),
        ("smtp = 1\n", "smtp"),
        ("[smtp\n", "not valid TOML"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    assert key in config_error(tmp_path, toml)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"ECR_GATEWAY_SMTP__PORT": "twenty"}, "smtp.port"),
        ({"ECR_GATEWAY_SMTP__PORT": "-1"}, "smtp.port"),
        ({"ECR_GATEWAY_SMTP__ENABLED": "maybe"}, "smtp.enabled"),
        ({"ECR_GATEWAY_GATEWAY__PROBLEM_TYPES": "[1]"}, "gateway.problem_types"),
        ({"ECR_GATEWAY_GATEWAY__PROBLEM_TYPES": "not json"}, "gateway.problem_types"),
        ({"ECR_GATEWAY_LIMITS__MAX_ATTACHMENT_SIZE": "0"}, "limits.max_attachment_size"),
    ],
)
def test_bad_environment_value_names_the_key(tmp_path: Path, env: dict[str, str],
                                             key: str) -> None:
    assert key in config_error(tmp_path, "", env)


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ("[smtp]\nprot = 2525\n", {}, "smtp.prot"),
        ("[smpt]\nport = 2525\n", {}, "smpt"),
        ("", {"ECR_GATEWAY_SMTP__PROT": "2525"}, "smtp.prot"),
        ("", {"ECR_GATEWAY_SMPT__PORT": "2525"}, "smpt.port"),
    ],
)
def test_unknown_keys_are_rejected(tmp_path: Path, toml: str, env: dict[str, str],
                                   key: str) -> None:
    assert key in config_error(tmp_path, toml, env)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})


@pytest.mark.parametrize(
    "text,expected",
    [("Thanks\nStill not working", False),
     ("Thanks\nThe printer is broken again", False),
     ("Many thanks\nDr A Smith\nPractice Manager", True),
     ("Thank you\nKind regards\nDr A Smith\nRiverside Practice\nTel 01234 567890", True)],
)
def test_a_thanks_line_is_only_thanks_when_what_follows_is_a_signature(text: str,
                                                                       expected: bool) -> None:
    from gateway.config import DEFAULT_THANKS
    from gateway.mail.rules import thanks_only

    assert thanks_only(text, DEFAULT_THANKS) is expected


# --- the spool ------------------------------------------------------------------------------


def test_a_batch_of_mails_shares_one_spool_file_and_each_reads_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    raws = [b"first mail\r\n", b"", b"third \x00\xff mail\r\n" * 1000]
    names = spool.write_many(raws, sync=False)
    spool.sync(names)
    assert len(spool.files()) == 1 and spool.files()[0].endswith(".batch")
    assert [spool.read(n) for n in names] == raws
    assert all(spool.exists(n) for n in names)
    (alone,) = spool.write_many([b"alone"])
    assert "#" in alone and spool.read(alone) == b"alone"


def test_a_span_past_the_end_of_its_spool_file_is_an_error_not_a_short_mail(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    names = spool.write_many([b"one", b"two"])
    file, where = span(names[1])
    assert where == (3, 3)
    (spool.root / file).write_bytes(b"one")  # truncated behind our back
    assert not spool.exists(names[1])
    with pytest.raises(OSError, match="shorter"):
        spool.read(names[1])


def test_lone_mails_are_appended_to_one_journal_until_it_is_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", journal_limit=11)
    names = [spool.write_many([raw])[0] for raw in (b"one", b"two", b"three", b"x" * 25, b"!")]
    files = [span(n)[0] for n in names]
    # Up to the limit in one file; a mail larger than the limit has a journal of its own.
    assert files[0] == files[1] == files[2] != files[3] != files[4]
    assert [span(n)[1] for n in names] == [(0, 3), (3, 3), (6, 5), (0, 25), (0, 1)]
    assert [spool.read(n) for n in names] == [b"one", b"two", b"three", b"x" * 25, b"!"]
    assert all(spool.exists(n) for n in names)
    assert len(spool.files()) == 3 and all(f.endswith(".batch") for f in spool.files())
    spool.close()
    assert spool.read(names[4]) == b"!"


def test_a_journal_is_flushed_whole_once_for_its_entry_then_only_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mail is durable only with the journal's directory entry: the first sync of a new
    journal flushes the file system (entries and new directories), the next ones its data."""
    from gateway.store import files as store_files

    calls: list[str] = []
    real_syncfs, real_datasync = store_files._syncfs_fd, store_files.datasync_fd

    def syncfs(fd: int) -> bool:
        calls.append("file system")
        return real_syncfs(fd)

    def datasync(fd: int) -> None:
        calls.append("journal data")
        real_datasync(fd)

    monkeypatch.setattr(store_files, "_syncfs_fd", syncfs)
    monkeypatch.setattr(store_files, "datasync_fd", datasync)
    spool = Spool(tmp_path / "spool", journal_limit=10)
    spool.write_many([b"one"])
    spool.sync_beside([spool.write_many([b"two"], sync=False)[0]]).result()
    spool.write_many([b"three"])  # past the limit: a new journal, its entry again
    spool.write_many([b"four"])
    # After each file system sync, the journal's own flush hears of an error on its pages.
    assert calls == [
        "file system", "journal data", "journal data", "file system", "journal data", "journal data"
    ]


@pytest.mark.parametrize("store", ["spool batch", "spool journal", "attachments"])
def test_a_write_error_another_sync_was_told_of_still_fails_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """syncfs tells a write error to the first descriptor that asks (here: it says all is
    well, as it does once another thread's or process's sync was told); the file's own flush
    still reports it, so nothing is acknowledged on the strength of the syncfs alone."""
    from gateway.store import files as store_files

    monkeypatch.setattr(store_files, "_syncfs_fd", lambda fd: True)

    def lost_pages(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_files, "datasync_fd", lost_pages)
    with pytest.raises(OSError, match="Input/output"):
        if store == "attachments":
            store_files.Blobs(tmp_path / "blobs").put_many([("ab" * 32, b"scan")])
        else:
            spool = Spool(tmp_path / "spool")
            raws = [b"one", b"two"] if store == "spool batch" else [b"one"]
            spool.sync(spool.write_many(raws, sync=False))


def test_a_journal_write_that_fails_leaves_its_end_where_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.write_many([b"first"])[0]
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: Any, offset: int) -> int:
        real_pwrite(fd, bytes(data)[:2], offset)  # part of it reached the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space"):
        spool.write_many([b"lost"])
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    second = spool.write_many([b"second"])[0]
    assert span(second) == (span(first)[0], (5, 6))  # over what the failed write left
    assert spool.read(first) == b"first" and spool.read(second) == b"second"


def test_a_forked_process_appends_to_a_journal_of_its_own(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    parent_first = spool.write_many([b"parent 1"])[0]
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write a mail with the Spool it inherited, report its name
        try:
            os.write(writer, spool.write_many([b"child"])[0].encode())
        finally:
            os._exit(0)
    os.close(writer)
    child = os.read(reader, 1000).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    parent_second = spool.write_many([b"parent 2"])[0]
    assert span(child)[0] != span(parent_first)[0] == span(parent_second)[0]
    assert [spool.read(n) for n in (parent_first, child, parent_second)] == [
        b"parent 1", b"child", b"parent 2"
    ]


def test_a_durable_commit_flushed_beside_flushes_the_log_sqlite_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is found where SQLite puts it, beside the database's real file (here through a
    symbolic link), and its directory entry is synced with its first flush only."""
    from gateway.store import db as store_db

    (tmp_path / "real").mkdir()
    (tmp_path / "g.db").symlink_to(tmp_path / "real" / "g.db")
    flushed: list[str] = []
    real_datasync, real_fsync_dir = store_db.datasync_fd, store_db.fsync_dir

    def datasync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_datasync(fd)

    def fsync_dir(path: Path | str) -> None:
        flushed.append(f"directory {path}")
        real_fsync_dir(path)

    monkeypatch.setattr(store_db, "datasync_fd", datasync)
    monkeypatch.setattr(store_db, "fsync_dir", fsync_dir)
    db = Database(tmp_path / "g.db")
    for address in ("first@p.example", "second@p.example"):
        with db.write(durable=True, beside=True):
            db.execute("INSERT INTO contacts (email) VALUES (?)", [address])
        db.settle()
    log = str(tmp_path / "real" / "g.db-wal")
    assert flushed == [log, f"directory {tmp_path / 'real'}", log]
    db.close()


def test_a_helper_thread_serves_a_forked_child_and_one_that_cannot_start(
    tmp_path: Path,
) -> None:
    from gateway.store.files import Beside

    helper, made = Beside("test"), []
    helper.start(lambda: made.append("parent")).result()
    pid = os.fork()
    if pid == 0:  # the child has the pool but not its thread
        try:
            helper.start(lambda: None).result(timeout=5)
            os._exit(0)
        except BaseException:
            os._exit(1)
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's helper never ran its call")
    assert os.waitstatus_to_exitcode(status) == 0
    helper._pool.shutdown()  # type: ignore[union-attr]  # as at the interpreter's exit
    helper.start(lambda: made.append("made here")).result()

    def failing() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        helper.start(failing).result()
    assert made == ["parent", "made here"]


def test_a_call_made_here_because_no_thread_could_start_is_never_made_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool queues a call before it starts the thread that would make it: when that
    thread cannot start, the call is made here and must not be left queued for the next."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.store.files import Beside

    real_adjust = ThreadPoolExecutor._adjust_thread_count  # type: ignore[attr-defined]

    def no_thread(self: ThreadPoolExecutor) -> None:
        raise RuntimeError("can't start new thread")

    helper, made = Beside("test"), []
    monkeypatch.setattr(ThreadPoolExecutor, "_adjust_thread_count", no_thread)
    helper.start(lambda: made.append("first")).result()
    monkeypatch.setattr(ThreadPoolExecutor, "_adjust_thread_count", real_adjust)
    helper.start(lambda: made.append("second")).result(timeout=5)
    helper.close()
    assert made == ["first", "second"]


# --- store: waiting for another connection's write ---------------------------------------------


def test_a_write_waits_for_another_connections_write_and_then_commits(tmp_path: Path) -> None:
    ours = Database(tmp_path / "g.db")
    locked = threading.Event()

    def their_write() -> None:  # a connection belongs to its thread
        theirs = Database(tmp_path / "g.db", migrate=False)
        with theirs.write():
            theirs.execute("INSERT INTO contacts (email) VALUES ('first@p.example')")
            locked.set()
            time.sleep(0.2)
        theirs.close()

    other = threading.Thread(target=their_write)
    other.start()
    assert locked.wait(10)
    with ours.write():  # begins only once their write has committed
        ours.execute("INSERT INTO contacts (email) VALUES ('second@p.example')")
    other.join()
    emails = [r["email"] for r in ours.rows("SELECT email FROM contacts ORDER BY id")]
    assert emails == ["first@p.example", "second@p.example"]
    ours.close()


def test_a_write_that_waits_longer_than_its_wait_raises_and_changes_nothing(
    tmp_path: Path,
) -> None:
    ours, theirs = Database(tmp_path / "g.db"), Database(tmp_path / "g.db", migrate=False)
    theirs.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"), ours.write(True, wait=0.05):
        ours.execute("INSERT INTO contacts (email) VALUES ('x@p.example')")
    theirs.execute("ROLLBACK")
    assert not ours.conn.in_transaction
    assert ours.value("PRAGMA synchronous") == 1  # NORMAL again after the failed durable write
    assert ours.value("PRAGMA busy_timeout") == 60000  # plain reads still wait as before
    assert ours.value("SELECT COUNT(*) FROM contacts") == 0
    ours.close()
    theirs.close()


def test_a_from_header_seen_before_is_judged_by_the_mail_it_is_in() -> None:
    """From headers are parsed once per text (a cache): what else the mail holds still counts."""
    one = b"From: Dr Ann <ann@practice.example>\r\nSubject: x\r\n\r\nbody\r\n"
    two = b"From: Dr Ann <ann@practice.example>\r\n" + one
    verdicts = [identity(email.message_from_bytes(raw)) for raw in (one, two, one)]
    ann = Address("ann@practice.example", "Dr Ann")
    assert verdicts == [
        (ann, True, ""),
        (ann, False, "several From headers"),
        (ann, True, ""),
    ]
    assert identity(email.message_from_bytes(b"From: \r\nFrom: x\r\n\r\n")) == (
        None,
        False,
        "several From headers",
    )


PLAIN_FROMS = [
    "Dr 1 <gp1@practice1.example>",
    "gp@practice.example",
    "<GP@Practice.Example>",
    "O'Brien J <j.o-brien+desk@mail.practice.co.uk>",
    "Reception #2 ~ West <front_desk@west-practice.example>",
]


@pytest.mark.parametrize("raw", PLAIN_FROMS)
def test_a_plain_from_header_takes_the_short_way_to_the_parsers_answer(raw: str) -> None:
    plain = parse_mod._plain_identity(raw)
    assert plain is not None
    assert plain == parse_mod._checked_identity(raw)


# Names, local parts and domains, plain ones beside those either parser reads its own way.
NAME_WORD = st.sampled_from(
    ["Dr", "a", "O'Brien", "#2", "~", "Dr.", '"Dr"', 'a"b', "(x)", "a,b", "a;b", "a:b", "a@b",
     "<x>", "=?utf-8?q?Dr?=", "=", "?", "\\", "é", "[x]"]
)
LOCAL = st.sampled_from(
    ["gp1", "j.o-brien+desk", "A_B", "a..b", ".a", "a.", 'x"y', '"a b"', "a b", "é", "a(b)"]
)
DOMAIN = st.sampled_from(
    ["practice.example", "Practice.Example", "a-b.co.uk", "localhost", "x", "a..b", "a.",
     "[127.0.0.1]", "é.example", "a_b.example", "a b.example"]
)


@settings(max_examples=1000, deadline=None, database=None)
@given(
    st.lists(NAME_WORD, max_size=3),
    st.sampled_from([" ", "  ", "\t", ""]),
    LOCAL,
    DOMAIN,
    st.sampled_from(["{name} <{addr}>", "<{addr}>", "{addr}", "{name}<{addr}>", "{name} {addr}",
                     " <{addr}>", "{name} <{addr}> ", "<{addr}>, <{addr}>"]),
)
def test_a_from_header_that_takes_the_short_way_is_read_as_both_parsers_read_it(
    words: list[str], gap: str, local: str, domain: str, form: str
) -> None:
    raw = form.format(name=gap.join(words), addr=f"{local}@{domain}")
    plain = parse_mod._plain_identity(raw)
    assert plain is None or plain == parse_mod._checked_identity(raw)


# Content-Type and Content-Disposition parameters, plain ones and those the library reads its
# own way (any case, RFC 2231 sections and charsets, empty, folded, a name inside a value).
PARAM = st.sampled_from(
    ['charset="utf-8"', "CHARSET=latin-1", "charset*=utf-8''utf%2D8", 'name="a.pdf"', "NAME=x",
     "name*=utf-8''%C3%A9.pdf", "filename*0*=utf-8''a; filename*1=b.txt", 'filename=""',
     "report-type=Delivery-Status", 'boundary="name=charset"', "x-filename=y", "a=b", "name",
     '"charset"', "\r\n\tcharset=us-ascii", "filename=\"a;b\"", "charset=\"\""]
)


@settings(max_examples=1000, deadline=None, database=None)
@given(
    st.sampled_from(["text/plain", "multipart/report", "application/pdf", "TEXT/HTML", ""]),
    st.lists(PARAM, max_size=3),
    st.sampled_from([None, "attachment", "inline", "ATTACHMENT"]),
    st.lists(PARAM, max_size=2),
    st.booleans(),
)
def test_a_parameter_looked_up_the_short_way_is_what_the_library_finds(
    ctype: str, params: list[str], disposition: str | None, dparams: list[str], twice: bool
) -> None:
    head = f"Content-Type: {'; '.join([ctype, *params])}\r\n"
    if twice:  # the library reads the first of several
        head += "Content-Type: text/plain; charset=koi8-r; name=b.txt\r\n"
    if disposition is not None:
        head += f"Content-Disposition: {'; '.join([disposition, *dparams])}\r\n"
    part = email.message_from_bytes(head.encode() + b"\r\nbody\r\n")
    assert parse_mod._file_name(part) == part.get_filename()
    assert parse_mod._charset(part, "d") == part.get_content_charset("d")
    assert parse_mod._report_type(part) == str(part.get_param("report-type", "") or "").lower()


def test_a_parameter_of_a_header_set_as_an_object_is_left_to_the_library() -> None:
    part = email.message.Message()
    part["Content-Type"] = email.header.Header("text/plain; charset=latin-1")
    assert parse_mod._charset(part, "d") == part.get_content_charset("d") == "latin-1"
