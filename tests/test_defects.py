"""Defect categories: mail-parser's diagnostics called directly give exactly what its whole
pass (`MailParser`) gives, on the corpus, on hand-made defects and on mutated mails."""

from __future__ import annotations

import email
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailparser.utils import mime_header_view

from gateway.mail import parse
from tests.conftest import FIXTURES, mail
from tests.test_property import FAST, mutated

CORPUS = sorted(FIXTURES.rglob("*.eml"))


def message(raw: bytes) -> email.message.Message:
    """The tree as parsing hands it to the defect report: bounds checked, charsets made usable."""
    msg = email.message_from_bytes(raw)
    assert parse._check_shape(msg, parse.Limits()) is None
    return msg


def assert_same(raw: bytes) -> set[str]:
    found = parse._defect_categories(message(raw))
    assert found == parse._whole_pass_categories(message(raw))
    return found


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_defects_are_mail_parsers(path: Path) -> None:
    assert_same(path.read_bytes())


HEAD = b"From: A <a@x.example>\nTo: support@localhost\nSubject: s\nMessage-ID: <d@x.example>\n"
MULTI = b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=BB\n\n"

CASES = {
    "AddressHeaderDefect": b"From: alice@x)<bob@y>\nTo: s@localhost\nSubject: s\n\nhi\n",
    "DateHeaderDefect": HEAD + b"Date: Mon, 45 Nov 2026 99:00:00 +0000\n\nhi\n",
    "ReceivedHeaderDefect": HEAD + b"Received: from \xff\xfe by\n\nhi\n",
    "CharsetDecodeDefect": HEAD + b"Content-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: 8bit\n\nGr\xfc\xdfe\n",
    "MimeHeaderDefect": HEAD + MULTI + b"--BB\nContent-Type: application/pdf\n"
    b'Content-Disposition: attachment; filename="r\xe9sum\xe9.pdf"\n\nx\n--BB--\n',
    "StartBoundaryNotFoundDefect": HEAD + MULTI + b"no boundary here at all\n",
}


@pytest.mark.parametrize("category", sorted(CASES))
def test_each_category_is_reported_as_mail_parser_reports_it(category: str) -> None:
    assert category in assert_same(CASES[category])


def test_an_attached_container_takes_the_whole_pass() -> None:
    inner = b"Content-Type: message/rfc822\nContent-Disposition: attachment\n\n" + HEAD + b"\nx\n"
    assert_same(HEAD + MULTI + b"--BB\n" + inner + b"--BB--\n")


def test_a_plain_mail_is_answered_without_the_whole_pass() -> None:
    msg = message(mail("Printer", "It prints blank pages.", "Dr A <gp@practice.example>"))
    parts = list(msg.walk())
    views = [mime_header_view(p) for p in parts]
    assert not parse._needs_whole_pass(parts, views)
    assert parse._defect_categories(msg) == set()


@FAST
@given(st.data())
def test_mutated_mails_report_mail_parsers_defects(data: st.DataObject) -> None:
    raw = mutated(data)
    msg = email.message_from_bytes(raw)
    if parse._check_shape(msg, parse.Limits()) is None:
        assert_same(raw)


def test_defects_that_decoding_adds_are_not_reported_as_mail_parser_would_not() -> None:
    # Found by the property test: a text part whose base64 has a bad length gains a defect
    # when decoded; mail-parser reads each part's defects before anything decodes it.
    raw = HEAD + MULTI + (
        b"--BB\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
        b"R3LDvMOf\x00ZSwgY2Fmw6kK\n--BB--\n"
    )
    assert "InvalidBase64LengthDefect" not in assert_same(raw)


def test_deciding_on_the_whole_pass_leaves_no_defects_of_its_own() -> None:
    # Found by the property test: the check that picks the whole pass decodes a broken base64
    # part, which notes InvalidBase64CharactersDefect before mail-parser reads the defects.
    raw = HEAD + MULTI + (
        b"--BB\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        b"Gr\xfc\xdfe\n--BB\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        b"JVBE\x18RiOx\n--BB--\n"
    )
    assert "InvalidBase64CharactersDefect" not in assert_same(raw)
