"""Large base64 bodies, decoded from the raw mail piece by piece (gateway/mail/large.py), give
exactly what the usual parse gives: the same fields, defects, attachment bytes and sha256, and
the same recorded outcome. A small `Limits.large_body` lets ordinary mails take the new path,
so the golden corpus and generated mails check it too; broken mails must fall back unharmed."""

from __future__ import annotations

import base64
import dataclasses
import email.message
import hashlib
import os
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import App
from gateway.inbound import files
from gateway.mail import large
from gateway.mail.parse import Limits, parse
from gateway.model import Outcome, ParsedMail, Rejection
from gateway.store.files import Blobs
from tests.conftest import FIXTURES, Clock, ingest, mail
from tests.test_hostile import app_with, assert_quarantined

USUAL = Limits(large_body=1 << 62)  # no body is ever that large: the usual path
DEFAULT = Limits()
TINY = (16, 64, 1024)  # thresholds that send ordinary mails through the skeleton
BIG = 3 << 19  # 1.5 MB: over large.LARGE, so the real threshold applies
CORPUS = sorted((FIXTURES / "corpus").glob("*.eml"))
FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def comparable(result: ParsedMail | Rejection) -> object:
    """Everything parse reports, with each attachment's bytes in full however they are held."""
    if isinstance(result, Rejection):
        return result
    files = [
        (a.filename, a.content_type, b"".join(a.chunks()), a.sha256, a.size, a.content_id,
         a.inline)
        for a in result.attachments
    ]
    return dataclasses.replace(result, attachments=()), files


def assert_same(raw: bytes, limits: Limits = DEFAULT) -> ParsedMail | Rejection:
    got = parse(raw, limits)
    assert comparable(got) == comparable(parse(raw, USUAL))
    return got


def spliced(result: ParsedMail | Rejection) -> int:
    """How many attachments came through the skeleton."""
    if isinstance(result, Rejection):
        return 0
    return sum(a.content is not None for a in result.attachments)


def with_file(data: bytes, name: str = "scan.pdf", ctype: str = "application/pdf") -> bytes:
    return mail(attachments=[(name, ctype, data)])


# --- the same answers -----------------------------------------------------------------------


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_parses_the_same_through_the_skeleton(path: Path) -> None:
    raw = path.read_bytes()
    for threshold in TINY:
        assert_same(raw, Limits(large_body=threshold))


def test_the_corpus_does_take_the_skeleton_path() -> None:
    taken = sum(spliced(parse(p.read_bytes(), Limits(large_body=64))) for p in CORPUS)
    assert taken >= 3  # otherwise the test above compares the usual path with itself


def test_a_large_attachment_is_decoded_piece_by_piece() -> None:
    data = os.urandom(BIG)
    got = assert_same(with_file(data))
    assert isinstance(got, ParsedMail)
    assert spliced(got) == 1
    (a,) = got.attachments
    assert (a.data, a.size, a.sha256) == (b"", len(data), hashlib.sha256(data).hexdigest())
    assert (a.filename, a.content_type) == ("scan.pdf", "application/pdf")


def test_a_large_attachment_never_exists_whole_while_parsing() -> None:
    raw = with_file(os.urandom(4 * BIG))
    tracemalloc.start()
    try:
        got = parse(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert spliced(got) == 1
    assert peak < len(raw) / 4, f"parsing held {peak} bytes for a {len(raw)}-byte mail"


@pytest.mark.parametrize(
    ("size", "decodings"), [(200_000, 1), (large.HELD, 1), (large.HELD + 1, 3), (BIG, 3)]
)
def test_a_kept_out_body_up_to_the_held_size_is_decoded_once(
    monkeypatch: pytest.MonkeyPatch, size: int, decodings: int
) -> None:
    """Measured while parsing, then stored: a body of HELD bytes or less is not decoded again
    to be stored; a larger one is, each time, so that it never exists whole."""
    calls: list[int] = []
    decode = large.base64_decoded
    monkeypatch.setattr(large, "base64_decoded", lambda p: calls.append(1) or decode(p))
    data = os.urandom(size)
    got = parse(with_file(data))
    assert isinstance(got, ParsedMail) and spliced(got) == 1
    (attachment,) = got.attachments
    assert b"".join(attachment.chunks()) == data
    assert b"".join(attachment.chunks()) == data
    assert len(calls) == decodings


def test_two_large_attachments_and_a_small_one_keep_their_order() -> None:
    files = [("a.bin", "application/octet-stream", os.urandom(BIG)),
             ("b.txt", "text/plain", b"small\n"),
             ("c.png", "image/png", os.urandom(BIG + 7))]
    got = assert_same(mail(attachments=files))
    assert isinstance(got, ParsedMail)
    assert [a.filename for a in got.attachments] == ["a.bin", "b.txt", "c.png"]
    assert spliced(got) == 2


def b64_lines(data: bytes, width: int = 76, eol: bytes = b"\r\n") -> bytes:
    text = base64.b64encode(data)
    return eol.join(text[i : i + width] for i in range(0, len(text), width)) + eol


def multipart(*parts: bytes, boundary: bytes = b"B", tail: bytes = b"--B--\r\n") -> bytes:
    head = (
        b"From: Dr A <gp@practice.example>\r\nTo: support@localhost\r\nSubject: Scan\r\n"
        b"Message-ID: <%s@practice.example>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n'
        % (os.urandom(6).hex().encode(), boundary)
    )
    text = b"Content-Type: text/plain\r\n\r\nThe scan is attached.\r\n"
    return head + b"".join(b"--%s\r\n%s\r\n" % (boundary, p) for p in (text, *parts)) + tail


def file_part(body: bytes, name: bytes = b"scan.pdf", cte: bytes = b"base64") -> bytes:
    return (
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: %s\r\n"
        b'Content-Disposition: attachment; filename="%s"\r\n\r\n%s' % (cte, name, body)
    )


def test_a_boundary_line_inside_a_large_body_cuts_it_as_usual() -> None:
    body = b64_lines(os.urandom(BIG))
    half = body.index(b"\r\n", len(body) // 2) + 2
    lying = body[:half] + b"--B\r\nContent-Type: image/png\r\n\r\n" + body[half:]
    got = assert_same(multipart(file_part(lying)))
    assert isinstance(got, ParsedMail) and len(got.attachments) == 2


def test_a_boundary_that_never_comes_leaves_the_large_body_to_the_end() -> None:
    assert_same(multipart(file_part(b64_lines(os.urandom(BIG))), tail=b""))
    assert_same(multipart(file_part(b64_lines(os.urandom(BIG))), boundary=b"A", tail=b"--B--"))


def test_truncated_base64_is_decoded_as_the_library_decodes_it() -> None:
    body = b64_lines(os.urandom(BIG))
    got = assert_same(multipart(file_part(body[: len(body) - 5]), tail=b""))
    assert spliced(got) == 0  # the library pads it and notes a defect: its own path


@pytest.mark.parametrize("damage", [b"=", b"*", b" ", b"\r\n\r\n", b"\xff", b"AAA=\r\n"])
def test_a_damaged_large_body_is_decoded_as_the_library_decodes_it(damage: bytes) -> None:
    body = b64_lines(os.urandom(BIG))
    at = len(body) // 3
    assert spliced(assert_same(multipart(file_part(body[:at] + damage + body[at:])))) == 0


def test_lf_line_endings_and_lone_cr_are_read_the_same() -> None:
    assert spliced(assert_same(multipart(file_part(b64_lines(os.urandom(BIG), eol=b"\n"))))) == 1
    assert_same(multipart(file_part(b64_lines(os.urandom(BIG), eol=b"\r"))))


def test_an_untransformed_large_body_is_kept_as_sent() -> None:
    body = b64_lines(os.urandom(BIG))  # base64 text, but sent as 7bit: the file is the text
    got = assert_same(multipart(file_part(body, cte=b"7bit")))
    assert spliced(got) == 1
    assert isinstance(got, ParsedMail) and got.attachments[0].size == len(body)


@pytest.mark.parametrize("cte", [b"quoted-printable", b"x-uuencode"])
def test_other_transfer_encodings_take_the_usual_path(cte: bytes) -> None:
    assert spliced(assert_same(multipart(file_part(b64_lines(os.urandom(BIG)), cte=cte)))) == 0


@pytest.mark.parametrize("cte", [b"BASE64", b"base64 ", b"8bit"])
def test_transfer_encodings_are_read_as_the_library_reads_them(cte: bytes) -> None:
    assert spliced(assert_same(multipart(file_part(b64_lines(os.urandom(BIG)), cte=cte)))) == 1


def forwarded(inner: bytes) -> bytes:
    """A mail with `inner` attached as it was sent (message/rfc822)."""
    return multipart(b"Content-Type: message/rfc822\r\n"
                     b'Content-Disposition: attachment; filename="fwd.eml"\r\n\r\n' + inner)


def test_a_large_part_in_an_attached_mail_is_kept_in_the_eml() -> None:
    inner = with_file(os.urandom(BIG))
    got = assert_same(forwarded(inner))
    assert spliced(got) == 0
    assert isinstance(got, ParsedMail)
    assert got.attachments[0].data == inner  # exactly the bytes attached


def test_a_large_base64_body_text_is_read_as_text() -> None:
    text = ("The printer prints blank pages. " * 60_000).encode()
    part = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    got = assert_same(multipart(part + b64_lines(text)))
    assert isinstance(got, ParsedMail) and got.body.startswith("The scan is attached.")


def test_a_large_inline_screenshot_is_decoded_piece_by_piece() -> None:
    """A picture pasted into a mail: inline, named and cited by Content-ID. mail-parser takes
    a named part as a file without reading it as text, so its bytes change no defect."""
    data = os.urandom(BIG)
    part = (
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-ID: <image001@practice.example>\r\n"
        b'Content-Disposition: inline; filename="image001.png"\r\n\r\n' + b64_lines(data)
    )
    got = assert_same(multipart(part))
    assert isinstance(got, ParsedMail) and spliced(got) == 1
    (a,) = got.attachments
    assert (a.filename, a.inline, a.size) == ("image001.png", True, len(data))


def test_a_large_named_inline_text_part_is_read_as_text_as_usual() -> None:
    text = ("The printer prints blank pages. " * 60_000).encode()
    part = (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: inline; filename="notes.txt"\r\n\r\n' + b64_lines(text)
    )
    assert spliced(assert_same(multipart(part))) == 0


def test_winmail_dat_is_unpacked_as_usual() -> None:
    raw = with_file(os.urandom(BIG), "winmail.dat", "application/ms-tnef")
    assert spliced(assert_same(raw)) == 0


def test_a_large_body_in_a_preamble_or_epilogue_is_dropped_as_usual() -> None:
    body = b64_lines(os.urandom(BIG))
    raw = multipart(file_part(b"AAAA\r\n"), tail=b"--B--\r\n" + body)
    assert_same(raw)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert_same(head + b"\r\n\r\n" + body + rest)


# --- generated mails ------------------------------------------------------------------------


def damaged(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` with a few bytes inserted or cut where hypothesis chooses."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body)))
        cut = draw(st.integers(0, 3))
        bit = draw(st.sampled_from([b"", b"=", b"==", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"-",
                                    b"--B\r\n", b"--B--\r\n", b"--C\r\n", b" ", b"\xff", b":",
                                    b"Content-Type: text/plain\r\n\r\n"]))
        body = body[:at] + bit + body[at + cut :]
    return body


@st.composite
def generated_mails(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    parts = []
    for _ in range(draw(st.integers(1, 3))):  # mostly attachments, which the path is for
        data = draw(st.binary(min_size=20, max_size=400))
        body = damaged(draw, b64_lines(data, draw(st.integers(4, 80)), eol))
        disposition = draw(st.sampled_from([b'attachment; filename="scan.pdf"'] * 2 + [
            b"attachment", b'attachment; filename="winmail.dat"', b"inline", b'inline; name=a',
            b'inline; filename="image001.png"']))
        ctype = draw(st.sampled_from([b"application/pdf"] * 4 + [
            b"text/plain", b"text/html", b"image/png", b"message/rfc822",
            b"multipart/mixed; boundary=C"]))
        cte = draw(st.sampled_from([b"base64"] * 3 + [b"7bit", b"quoted-printable", b"BASE64"]))
        parts.append(b"Content-Type: %s\r\nContent-Transfer-Encoding: %s\r\n"
                     b"Content-Disposition: %s\r\n\r\n%s" % (ctype, cte, disposition, body))
    tail = draw(st.sampled_from([b"--B--\r\n", b"", b"--B--\r\n" + b64_lines(b"epilogue")]))
    return multipart(*parts, tail=tail)


def test_generated_mails_parse_the_same_through_the_skeleton() -> None:
    @FAST
    @given(generated_mails(), st.sampled_from([16, 40, 128]))
    def check(raw: bytes, threshold: int) -> None:
        assert_same(raw, Limits(large_body=threshold))

    check()


def test_pieces_decode_as_the_email_library_decodes_the_whole() -> None:
    @FAST
    @given(st.binary(max_size=300), st.data())
    def check(data: bytes, draw: st.DataObject) -> None:
        body = damaged(draw.draw, b64_lines(data, draw.draw(st.integers(1, 80))))
        cuts = sorted(draw.draw(st.lists(st.integers(0, len(body)), max_size=6)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        message = email.message.Message()
        message["Content-Transfer-Encoding"] = "base64"
        message.set_payload(body.decode("latin-1"))
        try:
            got = b"".join(large.base64_decoded(pieces))
        except ValueError:
            return  # not plain base64: the library's own path decodes it
        assert got == message.get_payload(decode=True)
        assert not message.defects

    check()


# --- through the pipeline -------------------------------------------------------------------


def stored(app: App) -> list[tuple[str, int]]:
    return [(r["sha256"], r["size"]) for r in app.db.rows("SELECT sha256, size FROM attachments")]


def expected(raw: bytes) -> list[tuple[str, int]]:
    usual = parse(raw, USUAL)
    assert isinstance(usual, ParsedMail)
    return [(a.sha256, a.size) for a in usual.attachments]


@pytest.mark.parametrize("case", ["plain", "lying", "truncated", "nested"])
def test_large_mails_are_recorded_as_the_usual_path_records_them(
    app: App, data_dir: Path, case: str
) -> None:
    raw = {
        "plain": lambda: with_file(os.urandom(BIG)),
        "lying": lambda: multipart(file_part(b64_lines(os.urandom(BIG))), tail=b"--X--\r\n"),
        "truncated": lambda: multipart(file_part(b64_lines(os.urandom(BIG))[:-7]), tail=b""),
        "nested": lambda: forwarded(with_file(os.urandom(BIG))),
    }[case]()
    result = ingest(app, raw)
    assert result.outcome is Outcome.CREATED
    assert stored(app) == expected(raw)
    for sha, _ in stored(app):
        assert hashlib.sha256(app.blobs.read(sha)).hexdigest() == sha
    assert not list((data_dir / "attachments" / "tmp").iterdir())


def test_a_large_attachment_over_the_limit_is_quarantined_unstored(
    tmp_path: Path, clock: Clock
) -> None:
    limited = app_with(tmp_path, clock, ECR_GATEWAY_LIMITS__MAX_ATTACHMENT_SIZE=str(BIG - 1))
    try:
        data = os.urandom(BIG)
        assert_quarantined(limited, ingest(limited, with_file(data)), "max_attachment_size")
        assert not limited.blobs.path(hashlib.sha256(data).hexdigest()).exists()
        assert ingest(limited, with_file(data[:-1])).outcome is Outcome.CREATED
        assert limited.blobs.read(hashlib.sha256(data[:-1]).hexdigest()) == data[:-1]
    finally:
        limited.close()


def test_a_large_attachment_that_fails_while_written_leaves_no_file(tmp_path: Path) -> None:
    blobs = Blobs(tmp_path / "attachments")

    def pieces() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        blobs.put_chunks("ab" * 32, pieces())
    assert not blobs.path("ab" * 32).exists()
    assert not list(blobs.tmp.iterdir())
    blobs.put_chunks("ab" * 32, iter([b"x", b"y"]))
    assert blobs.read("ab" * 32) == b"xy"


def test_placeholders_cannot_be_forged_by_the_mail() -> None:
    forged = b"ECRLARGEPART0\r\nECRLARGEPARTXXX1\r\n"
    got = assert_same(multipart(file_part(b64_lines(os.urandom(BIG))), file_part(forged)))
    assert spliced(got) == 1
    assert isinstance(got, ParsedMail) and len(got.attachments) == 2


def test_an_attached_mail_beside_a_large_attachment_keeps_its_bytes() -> None:
    inner = mail("Earlier scan", "Folded\r\n header test.")
    raw = multipart(file_part(b64_lines(os.urandom(BIG))),
                    b"Content-Type: message/rfc822\r\n\r\n" + inner)
    got = assert_same(raw)
    assert spliced(got) == 1
    assert isinstance(got, ParsedMail) and got.attachments[1].data == inner


def test_a_large_attachment_parsed_in_the_import_pool_is_stored(app: App, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    raw = with_file(os.urandom(BIG))
    (folder / "a.eml").write_bytes(raw)
    assert files.run_import(app.pipeline, folder, lambda n: None, workers=2)["created"] == 1
    assert stored(app) == expected(raw)
    assert hashlib.sha256(app.blobs.read(stored(app)[0][0])).hexdigest() == stored(app)[0][0]


# --- finding a blank line fast ----------------------------------------------------------------

# A blank line as the parser splits lines (on CRLF, CR and LF): a line break right after another.
BLANK = re.compile(rb"\n\n|\n\r|\r\r")


@FAST
@given(
    st.lists(st.sampled_from([b"Q", b"\r", b"\n", b"\r\n"]), max_size=60).map(b"".join),
    st.integers(1, 9),
)
def test_a_blank_line_is_found_across_any_window_edges(text: bytes, window: int) -> None:
    # Windows of a few bytes put every line break on some window's edge; `start` is a line's
    # start, as large_runs hands it over.
    raw = b"Q" + text + b"Q"
    assert large.has_blank_line(raw, 0, len(raw), window) == bool(BLANK.search(raw))


@pytest.mark.parametrize("blank", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r", b"\r\n\n", b"\r\r\n"])
def test_a_blank_line_inside_a_large_base64_run_keeps_it_in_the_parser(blank: bytes) -> None:
    lines = b64_lines(os.urandom(BIG)).split(b"\r\n")
    half = len(lines) // 2
    broken = b"\r\n".join(lines[:half]) + blank + b"\r\n".join(lines[half:])
    got = assert_same(multipart(file_part(broken)))
    assert spliced(got) == 0
