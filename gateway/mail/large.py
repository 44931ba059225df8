"""Large base64 bodies, kept out of the parser: a skeleton to parse, and the bytes put back after.

The standard library's parser holds a body as Python strings, split into lines and joined again,
and decodes it from a copy: a 25 MB attachment costs ten times its size. Before parsing, each run
of at least LARGE bytes of base64-looking lines is replaced by a short placeholder line; the
skeleton left is parsed as usual, and a part whose payload holds placeholders is decoded piece by
piece from the raw bytes (`Spliced`), never whole.

The parser decides a line's fate only by whether it is blank, looks like a header line, or starts
with `--` (a boundary). A run's lines hold only base64 characters, none blank, and so does the
placeholder: in every parser state the placeholder line goes where the run's lines would have
gone, and the skeleton parses to the same tree, headers, boundaries and defects. Where a
placeholder lands somewhere `parse` cannot stream (a body text, an attached mail, a preamble),
or a body is not plain well-formed base64, `parse` parses the whole mail the usual way instead.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

# Smaller bodies cost little; a mail without a larger one takes the usual path. Beyond memory,
# a body kept out of the parser is cheaper to read: the parser splits it into lines and joins
# them again (a mail with a 200 KB attachment: 5.9 ms the usual way, 4.7 ms at this size).
LARGE = 1 << 16
WINDOW = 1 << 16  # the raw bytes are examined in windows this size (at most)
CHUNK = 1 << 18  # encoded bytes decoded at a time: a few copies of this are all a body costs
# A body decoded to no more than this is held once measured, so storing it does not decode it
# again: small beside the mail it came in, which is in memory anyway.
HELD = 1 << 20
NEWLINES = b"\r\n"
# What a base64 body's lines hold; deleting them (bytes.translate) leaves nothing of such lines,
# several times faster than a regular expression's character class over the same bytes.
B64_TEXT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" + NEWLINES
BLANK_WINDOW = CHUNK  # bytes split into lines at a time when looking for a blank one
PREFIX = b"ECRLARGEPART"
FORGED = re.compile(re.escape(PREFIX) + rb"(X*)")

Piece = bytes | tuple[int, int]  # bytes as they stand, or (start, end) of the raw mail


@dataclass(frozen=True)
class Skeleton:
    """The raw mail with each large run replaced by its placeholder."""

    data: bytes
    prefix: bytes  # every placeholder starts with it, and nothing else in the mail holds it
    placeholders: dict[bytes, tuple[int, int]]  # placeholder -> (start, end) in the raw mail

    def holds(self, payload: str) -> bool:
        return self.prefix.decode("ascii") in payload


def skeleton(raw: bytes, large: int = LARGE) -> Skeleton | None:
    """The skeleton of `raw`, or None when it has no run of `large` bytes (the usual path)."""
    runs = large_runs(raw, large)
    if not runs:
        return None
    prefix = _unused_prefix(raw)
    names = [prefix + b"%d" % i for i in range(len(runs))]
    pieces: list[bytes] = []
    at = 0
    for name, (start, end) in zip(names, runs, strict=True):
        pieces += [raw[at:start], name]
        at = end
    pieces.append(raw[at:])
    return Skeleton(b"".join(pieces), prefix, dict(zip(names, runs, strict=True)))


def large_runs(raw: bytes, large: int = LARGE) -> list[tuple[int, int]]:
    """(start, end) of each run of whole base64-looking lines of at least `large` bytes; `end`
    stops before the last line's terminator, so the placeholder takes the lines' place."""
    if len(raw) < large:
        return []
    runs = []
    for start, end in _clean_windows(raw, max(16, min(WINDOW, large // 16))):
        s, e = _whole_lines(raw, start, end)
        if e - s >= large and not has_blank_line(raw, s, e):
            runs.append((s, e))
    return runs


def _clean_windows(raw: bytes, window: int) -> Iterator[tuple[int, int]]:
    """Stretches of consecutive windows that hold only base64 characters and line breaks."""
    start = -1
    for pos in range(0, len(raw), window):
        end = min(pos + window, len(raw))
        if not raw[pos:end].translate(None, B64_TEXT):
            start = pos if start < 0 else start
            continue
        if start >= 0:
            yield start, pos
        start = -1
    if start >= 0:
        yield start, len(raw)


def _whole_lines(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """The first line that begins inside [start, end) to the last one that ends inside it."""
    if start > 0 and raw[start - 1] not in NEWLINES:
        start = _next_break(raw, start, end)
    while start < end and raw[start] in NEWLINES:
        start += 1
    if end < len(raw) and raw[end] not in NEWLINES:
        end = max(raw.rfind(b"\n", start, end), raw.rfind(b"\r", start, end), start)
    while end > start and raw[end - 1] in NEWLINES:
        end -= 1
    return start, end


def has_blank_line(raw: bytes, start: int, end: int, window: int = BLANK_WINDOW) -> bool:
    """Whether the lines from `start` (a line's start) to `end` hold an empty one, the lines
    split as the parser splits them: on CRLF, CR and LF. bytes.splitlines splits the same way,
    and runs far faster than a search for the three two-byte forms of a blank line (LF LF,
    LF CR, CR CR); it is given a window at a time, so a long run is never held as lines whole.
    Each later window starts one byte early, so a blank line across a window's edge is whole
    in the next one; that byte may leave an empty first line (a line break that belongs to the
    window before), which is why a later window's first line does not count."""
    at = start
    while at < end:
        first = at == start
        stop = min(at + window, end)
        lines = raw[at if first else at - 1 : stop].splitlines()
        if b"" in (lines if first else lines[1:]):
            return True
        at = stop
    return False


def _next_break(raw: bytes, start: int, end: int) -> int:
    found = [i for i in (raw.find(b"\n", start, end), raw.find(b"\r", start, end)) if i >= 0]
    return min(found, default=end)


def _unused_prefix(raw: bytes) -> bytes:
    """A placeholder prefix that occurs nowhere in the mail, so no placeholder can be forged:
    one X more than the longest run of them after PREFIX in the mail (one pass over it)."""
    if raw.find(PREFIX) < 0:  # the usual case, found by one fast scan
        return PREFIX
    longest = max((len(m.group(1)) for m in FORGED.finditer(raw)), default=-1)
    return PREFIX + b"X" * (longest + 1)


@dataclass(frozen=True)
class Spliced:
    """A part's payload from the skeleton with the raw runs put back, transfer-decoded piece by
    piece exactly as `Message.get_payload(decode=True)` decodes the whole (base64 or none)."""

    raw: bytes = field(repr=False)
    pieces: tuple[Piece, ...]
    base64: bool
    size: int = -1  # the decoded size, once measured
    held: bytes | None = field(default=None, repr=False, compare=False)  # see HELD

    def chunks(self) -> Iterator[bytes]:
        """The decoded bytes in pieces; ValueError where a base64 body is not well formed."""
        if self.held is not None:
            return iter((self.held,))
        encoded = self._encoded()
        return base64_decoded(encoded) if self.base64 else encoded

    def _encoded(self) -> Iterator[bytes]:
        for piece in self.pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            start, end = piece
            for at in range(start, end, CHUNK):
                yield self.raw[at : min(at + CHUNK, end)]


def spliced(raw: bytes, payload: bytes, found: Skeleton, base64: bool) -> Spliced:
    """`payload` (from the skeleton) with each placeholder replaced by the raw run it stands for."""
    pieces: list[Piece] = []
    at = 0
    # A placeholder fills its line: the digits after the prefix end at a line break.
    for m in re.finditer(re.escape(found.prefix) + rb"[0-9]+", payload):
        pieces += [payload[at : m.start()], found.placeholders[m.group()]]
        at = m.end()
    pieces.append(payload[at:])
    return Spliced(raw, tuple(p for p in pieces if p), base64)


def measured(content: Spliced) -> tuple[Spliced, str]:
    """The content with its decoded size, and its sha256, decoded once; the decoded bytes are
    let go of piece by piece, or held when they come to HELD bytes at most. ValueError where it
    cannot be decoded."""
    digest = hashlib.sha256()
    size = 0
    kept: list[bytes] | None = []
    for chunk in content.chunks():
        digest.update(chunk)
        size += len(chunk)
        if kept is not None:
            kept.append(chunk)
            if size > HELD:  # too large to hold: let go of it piece by piece after all
                kept = None
    held = b"".join(kept) if kept is not None else None
    return replace(content, size=size, held=held), digest.hexdigest()


def base64_decoded(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Base64 decoded in pieces, line breaks ignored. Only a body the email library decodes
    without a defect is accepted (strict alphabet, padding only at the very end, a length that
    is a multiple of 4); anything else raises ValueError, and the library's path decides."""
    carry = b""
    padded = False
    for piece in pieces:
        data = piece.translate(None, NEWLINES)
        data = carry + data if carry else data
        cut = len(data) - len(data) % 4
        carry = data[cut:]
        if not cut:
            continue
        if padded:
            raise ValueError("base64 data after its padding")
        padded = data.find(b"=", 0, cut) >= 0
        yield binascii.a2b_base64(memoryview(data)[:cut], strict_mode=True)
    if carry:
        raise ValueError("base64 length is not a multiple of 4")
