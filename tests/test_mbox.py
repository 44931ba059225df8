"""An mbox is read into exactly the mails `mailbox.mbox` finds, by our own faster scan."""

from __future__ import annotations

import mailbox
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.inbound import files
from tests.test_property import FAST


def stdlib(path: Path) -> list[bytes]:
    box = mailbox.mbox(str(path), create=False)
    try:
        return [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()


def ours(path: Path) -> list[bytes]:
    return [e.raw for e in files.envelopes(path)]


CASES = [
    b"From a\nSubject: one\n\nbody\n\nFrom b\nSubject: two\n\nbody\n",
    b"From a\nSubject: no blank line before the next\n\nbody\nFrom b\n\nx\n",
    b"From a\n\n>From quoted stays\n\nFrom b\n\n\n\n",
    b"From a\r\nSubject: crlf\r\n\r\nbody\r\n\r\nFrom b\r\n\r\nx",
    b"From a\nFrom b\n\nFrom c",
    b"From a\n\nFrom ",
    b"From only a From line",
]


@pytest.mark.parametrize("data", CASES)
def test_an_mbox_gives_the_mails_the_standard_library_gives(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "box.mbox"
    path.write_bytes(data)
    assert ours(path) == stdlib(path)


LINES = st.sampled_from([b"From x@y Mon Nov  2 09:00:00 2026", b"", b">From quoted", b"text",
                         b"From", b"\r", b"Subject: s", b" From indented"])


@FAST
@given(st.lists(LINES, max_size=30), st.booleans())
def test_any_mbox_gives_the_mails_the_standard_library_gives(lines: list[bytes],
                                                            final_newline: bool) -> None:
    data = b"From first\n" + b"\n".join(lines) + (b"\n" if final_newline else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "box.mbox"
        path.write_bytes(data)
        assert ours(path) == stdlib(path)
