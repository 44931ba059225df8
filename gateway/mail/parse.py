"""Raw bytes -> ParsedMail: pure, bounded, and never raising for bad mail.

The only module that imports mail-parser. The standard library builds the message tree first so
that the bounds (size, header size, MIME depth, part count, time) are checked before mail-parser
walks it; mail-parser then supplies the decoded headers and the defect report. Bodies and
attachments come from our own walk, because attachment bytes must be the MIME part's decoded
payload (mail-parser re-encodes them) and an attached mail's text must never become ours.

A mail with a large base64 body is parsed as a skeleton without it (large.py): the attachment's
bytes are decoded from the raw mail piece by piece, when hashed and again when stored, so they
never exist whole. Where that cannot give exactly the usual answer, the usual path is taken.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email
import email.errors
import email.header
import email.message
import email.policy
import email.utils
import functools
import hashlib
import logging
import quopri
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import mailparser
import mailparser.dates as mailparser_dates
import mailparser.utils as mailparser_utils
from mailparser.const import ADDRESSES_HEADERS, EPILOGUE_DEFECTS

from gateway.mail import html, large, reply, tnef
from gateway.mail.names import safe_filename
from gateway.model import Address, Attachment, Bounce, ParsedMail, Rejection

# mail-parser logs part file names and header names at debug level; names can identify a
# patient, so it is never allowed to log below warning, whatever the root level is.
logging.getLogger("mailparser").setLevel(logging.WARNING)

Message = email.message.Message

_T = TypeVar("_T")

# Charset names seen in the field that Python does not know, or knows under another name.
CHARSET_ALIASES = {
    "cp-850": "cp850",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "ks_c_5601-1987": "cp949",
    "x-mac-roman": "mac_roman",
    "unicode-1-1-utf-7": "utf-7",
    "x-user-defined": "latin-1",
    "unknown-8bit": "utf-8",
    "windows-874": "cp874",
    "x-gbk": "gbk",
    "gb2312": "gb18030",
}

CLASSIFY_HEADERS = (
    "auto-submitted",
    "precedence",
    "x-autoreply",
    "x-autorespond",
    "x-auto-response-suppress",
    "list-id",
    "list-unsubscribe",
    "return-path",
    "x-ecr-loop",
    "x-failed-recipients",
)

# A Message-ID we keep is echoed into our replies' In-Reply-To/References: no space or control
# character may survive into it (a form feed or NUL there breaks, or injects into, our headers).
MSGID = re.compile(r"<([^<>\s\x00-\x1f\x7f]{1,500})>")
NOT_IN_ID = re.compile(r"[\s\x00-\x1f\x7f]")
FOLD = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 52428800
    max_header_size: int = 1048576
    max_mime_depth: int = 50
    max_parts: int = 1000
    parse_timeout: float = 30.0
    reply_languages: tuple[str, ...] = reply.DEFAULT_LANGUAGES
    # Base64 bodies from this size on are decoded from the raw mail piece by piece (large.py).
    large_body: int = large.LARGE


class _Deadline:
    """A cooperative time bound: checked between the steps and between parts."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


def parse(raw: bytes, limits: Limits = Limits()) -> ParsedMail | Rejection:
    deadline = _Deadline(limits.parse_timeout)
    early = _check_size(raw, limits)
    if early:
        return early
    found = large.skeleton(raw, limits.large_body)
    if found is not None:
        try:
            return _parse_message(found.data, limits, deadline, _Splicer(raw, found))
        except _NotSplicable:
            pass  # a large body the skeleton cannot stand for: the whole mail, the usual way
    return _parse_message(raw, limits, deadline)


def _parse_message(
    raw: bytes, limits: Limits, deadline: _Deadline, splicer: _Splicer | None = None
) -> ParsedMail | Rejection:
    try:
        message = email.message_from_bytes(raw)
    except RecursionError:
        return Rejection("max_mime_depth", "MIME nesting too deep to parse")
    shape = _check_shape(message, limits)
    if shape:
        return shape
    if deadline.passed():
        return Rejection("parse_timeout", f"parsing took longer than {limits.parse_timeout:g}s")
    return _ParsedBuilder(message, deadline, limits, raw, splicer).build()


class _NotSplicable(Exception):
    """A placeholder of the skeleton landed where its bytes cannot be streamed."""


class _Splicer:
    """Puts a skeleton's large bodies back: each placeholder must end in an attachment's payload
    (not a body text, an attached mail, a preamble) exactly once."""

    def __init__(self, raw: bytes, found: large.Skeleton) -> None:
        self.raw = raw
        self.found = found
        self.used: list[tuple[int, int]] = []

    def holds(self, part: Message) -> bool:
        payload = _stored_payload(part)
        return isinstance(payload, str) and self.found.holds(payload)

    def content(self, part: Message) -> tuple[large.Spliced, str]:
        """The part's decoded bytes, as get_payload(decode=True) would give them, and their
        sha256; only base64 and untransformed bodies, only ASCII around the placeholders."""
        cte = str(part.get("content-transfer-encoding", "")).lower()  # as get_payload reads it
        if cte in ("quoted-printable", "x-uuencode", "uuencode", "uue", "x-uue"):
            raise _NotSplicable(cte)
        try:
            payload = str(_stored_payload(part)).encode("ascii")
            content = large.spliced(self.raw, payload, self.found, base64=cte == "base64")
            measured = large.measured(content)
        except ValueError as exc:  # UnicodeEncodeError, binascii.Error: not plain base64
            raise _NotSplicable(type(exc).__name__) from None
        self.used += [p for p in content.pieces if isinstance(p, tuple)]
        return measured

    def check_all_used(self) -> None:
        if sorted(self.used) != sorted(self.found.placeholders.values()):
            raise _NotSplicable("a placeholder outside an attachment")


def _stored_payload(part: Message) -> object:
    """The payload as the parser stored it (8-bit bytes as surrogates): get_payload() would
    decode those with the declared charset, and could turn them into ASCII (EBCDIC does).
    mail-parser reads the same attribute."""
    return getattr(part, "_payload", None)


def _check_size(raw: bytes, limits: Limits) -> Rejection | None:
    if len(raw) > limits.max_message_size:
        return Rejection("max_message_size", f"{len(raw)} bytes > {limits.max_message_size}")
    # Searched no further than the limit: a mail with LF line ends has no CRLF pair to find,
    # and the search would otherwise run through its whole body.
    within = limits.max_header_size + 4
    head_end = min(
        (i for i in (raw.find(b"\r\n\r\n", 0, within), raw.find(b"\n\n", 0, within)) if i >= 0),
        default=len(raw),
    )
    if head_end > limits.max_header_size:
        return Rejection("max_header_size", f"header block over {limits.max_header_size} bytes")
    return None


def _check_shape(message: Message, limits: Limits) -> Rejection | None:
    parts = 0
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        part, depth = stack.pop()
        parts += 1
        if depth > limits.max_mime_depth:
            return Rejection("max_mime_depth", f"MIME nesting deeper than {limits.max_mime_depth}")
        if parts > limits.max_parts:
            return Rejection("max_parts", f"more than {limits.max_parts} MIME parts")
        _usable_charset(part)
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))
    return None


def _usable_charset(part: Message) -> None:
    """The standard library decodes an 8-bit part's text with the raw charset parameter and
    survives only an unknown name: an RFC 2231 value (a tuple) or a name holding a NUL or a
    lone surrogate makes every later get_payload() raise. Such a parameter is made plain."""
    charset = part.get_param("charset") if _mentions(part, "charset") else None
    if charset is None:
        return
    name = email.utils.collapse_rfc2231_value(charset)
    try:
        codecs.lookup(name)
    except LookupError:
        pass  # an unknown name is fine: the library and decode_text fall back on their own
    except ValueError:
        name = "utf-8"
    if name != charset:  # set_param would write a non-ASCII name as RFC 2231 again
        part.set_param("charset", name if name.isascii() else "utf-8")


class _ParsedBuilder:
    """Collects one message's fields; a class only so the walk can share the deadline."""

    def __init__(
        self,
        message: Message,
        deadline: _Deadline,
        limits: Limits,
        raw: bytes = b"",
        splicer: _Splicer | None = None,
    ) -> None:
        self.message = message
        self.deadline = deadline
        self.limits = limits
        self.raw = raw
        self.splicer = splicer
        self.sent_mails: dict[int, bytes] | None = None  # filled on the first attached mail
        self.plain: list[str] = []
        self.html: list[str] = []
        self.attachments: list[Attachment] = []
        self.defects: list[str] = []

    def build(self) -> ParsedMail | Rejection:
        self.defects.extend(_defect_categories(self.message))
        self._walk()
        if self.deadline.passed():
            return Rejection(
                "parse_timeout", f"parsing took longer than {self.limits.parse_timeout:g}s"
            )
        if self.splicer is not None:
            self.splicer.check_all_used()
        sender, trusted, why = identity(self.message)
        body = self._body()
        return ParsedMail(
            message_id=_first_id(self.message.get("Message-ID")),
            subject=clean_line(header_text(self.message.get("Subject"))),
            sender=sender,
            trusted=trusted,
            untrusted_reason=why,
            to=_addresses(self.message, "To"),
            cc=_addresses(self.message, "Cc"),
            delivered_to=tuple(
                a.email for a in _addresses(self.message, "Delivered-To", "X-Original-To")
            ),
            in_reply_to=message_ids(self.message.get_all("In-Reply-To", [])),
            references=message_ids(self.message.get_all("References", [])),
            date=_date(self.message.get("Date")),
            headers=_classify_headers(self.message),
            body=body,
            new_text=reply.new_text(body, self.limits.reply_languages),
            attachments=tuple(self.attachments),
            defects=tuple(sorted(set(self.defects))),
            content_type=self.message.get_content_type(),
            report_type=_report_type(self.message),
            bounce=_bounce(self.message),
        )

    def _body(self) -> str:
        if self.plain:
            return "\n\n".join(self.plain).strip()
        if self.html:
            return html.to_text("\n".join(self.html)).strip()
        return ""

    def _walk(self) -> None:
        for part in _leaves(self.message):
            if self.deadline.passed():
                return
            self._take(part)

    def _take(self, part: Message) -> None:
        ctype = part.get_content_type()
        if ctype == "message/rfc822" or ctype == "message/global":
            self._attach(part, self._attached_mail(part), "message/rfc822", default=".eml")
            return
        if ctype == "message/delivery-status" or ctype == "text/rfc822-headers":
            return  # read by _bounce; a report's parts are not the sender's words
        if self.splicer is not None and self.splicer.holds(part):
            self._attach_spliced(part, ctype, self.splicer)
            return
        data = _payload_bytes(part)
        filename = _file_name(part)
        if tnef.is_tnef(ctype, filename):
            self._attach_tnef(part, data)
        elif _is_body_text(part, filename):
            self._text(part, ctype, data)
        else:
            self._attach(part, data, ctype)

    def _text(self, part: Message, ctype: str, data: bytes) -> None:
        text, ok = decode_text(data, _charset(part, None))
        if not ok:
            self.defects.append("UndecodableTextPart")
            self._attach(part, data, "application/octet-stream", default=".bin")
        (self.html if ctype == "text/html" else self.plain).append(text)

    def _attached_mail(self, part: Message) -> bytes:
        if self.sent_mails is None:
            self.sent_mails = _sent_attached_mails(self.message, self.raw)
        sent = self.sent_mails.get(id(part))
        return sent if sent is not None else _attached_mail_bytes(part)

    def _attach_spliced(self, part: Message, ctype: str, splicer: _Splicer) -> None:
        """A large body put back from the raw mail; only a plain attachment's, else the whole
        mail is parsed the usual way. Only a part mail-parser takes as a file without reading
        it as text (`Content-Disposition: attachment`, or a file name on anything but an inline
        text/plain or text/html part, as on a screenshot pasted into a mail): mail-parser
        decodes any other part as text to report charset defects, which depend on its bytes."""
        filename = _file_name(part)
        disposition = part.get_content_disposition()
        read_as_text = disposition == "inline" and ctype in ("text/plain", "text/html")
        if (
            not (disposition == "attachment" or (filename and not read_as_text))
            or tnef.is_tnef(ctype, filename)
            or _is_body_text(part, filename)
        ):
            raise _NotSplicable(ctype)
        content, sha256 = splicer.content(part)
        self._attach(part, b"", ctype, content=content, sha256=sha256)

    def _attach(
        self,
        part: Message,
        data: bytes,
        ctype: str,
        default: str = "",
        content: large.Spliced | None = None,
        sha256: str = "",
    ) -> None:
        cid = (part.get("Content-ID") or "").strip().strip("<>")
        disposition = (part.get_content_disposition() or "").lower()
        name = safe_filename(header_text(_filename(part)), ctype, default)
        self.attachments.append(
            Attachment(
                filename=name,
                content_type=ctype,
                data=data,
                sha256=sha256 or hashlib.sha256(data).hexdigest(),
                content_id=clean_line(cid)[:250],
                inline=bool(cid) and disposition != "attachment",
                content=content,
            )
        )

    def _attach_tnef(self, part: Message, data: bytes) -> None:
        unpacked = tnef.unpack(data)
        if unpacked is None:
            self.defects.append("TnefUnreadable")
            self._attach(part, data, "application/ms-tnef")
            return
        for name, content in unpacked:
            self.attachments.append(
                Attachment(
                    filename=safe_filename(name, "application/octet-stream"),
                    content_type="application/octet-stream",
                    data=content,
                    sha256=hashlib.sha256(content).hexdigest(),
                )
            )


def _leaves(message: Message) -> Iterator[Message]:
    """Leaf parts in document order; an attached mail is a leaf (never our text)."""
    stack = [message]
    while stack:
        part = stack.pop()
        payload = part.get_payload()
        is_attached_mail = part.get_content_maintype() == "message"
        if (
            isinstance(payload, list)
            and not is_attached_mail
            and part.get_content_type() != "message/delivery-status"
        ):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
        elif part.get_content_type() == "message/delivery-status":
            continue
        else:
            yield part


def _is_body_text(part: Message, filename: str | None) -> bool:
    if (
        part.get_content_type() not in ("text/plain", "text/html")
        and part.get_content_maintype() != "multipart"
    ):
        return False
    return part.get_content_disposition() != "attachment" and not filename


def _payload_bytes(part: Message) -> bytes:
    """The part's decoded bytes; a part the library cannot decode yields its raw text."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # uuencode with bad lines raises ValueError deep inside binascii
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _sent_attached_mails(message: Message, raw: bytes) -> dict[int, bytes]:
    """id(part) -> an attached mail's bytes exactly as sent, for each message/rfc822 part.

    The library hands an attached mail over parsed, and regenerating it changes line endings and
    folding, so its stored copy (and hash) would not be what the sender attached. The raw bytes
    are cut along the same boundaries the library used; where the two layouts disagree (broken
    MIME) that subtree is left out and its attached mails are regenerated instead.
    """
    found: dict[int, bytes] = {}
    stack = [(message, _body_start(raw, 0, len(raw)), len(raw))]
    while stack:
        part, start, end = stack.pop()
        if part.get_content_type() in ("message/rfc822", "message/global"):
            found[id(part)] = _transfer_decoded(part, raw[start:end])
            continue
        boundary = part.get_boundary()
        children = part.get_payload()
        if part.get_content_maintype() != "multipart" or not boundary:
            continue
        if not isinstance(children, list):
            continue
        spans = _part_spans(raw, start, end, boundary)
        if len(spans) != len(children):
            continue
        for child, (a, b) in zip(children, spans, strict=True):
            stack.append((child, _body_start(raw, a, b), b))
    return found


HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]+:|[ \t]")  # the library's own test


def _body_start(raw: bytes, start: int, end: int) -> int:
    """Where an entity's body begins: after the blank line, or at the first non-header line."""
    while start < end:
        stop = raw.find(b"\n", start, end)
        stop = end if stop < 0 else stop + 1
        line = raw[start:stop]
        if not line.strip(b"\r\n"):
            return stop
        if not HEADER_LINE.match(line):
            return start
        start = stop
    return end


def _part_spans(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """(start, end) of each body part between the delimiter lines of `boundary`; the line
    ending before a delimiter belongs to the delimiter (RFC 2046 5.1.1)."""
    delimiter = re.compile(
        rb"^--" + re.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*\r?$",
        re.MULTILINE,
    )
    spans: list[tuple[int, int]] = []
    begin = -1
    for m in delimiter.finditer(raw, start, end):
        if begin >= 0:
            spans.append((begin, _before_line_ending(raw, begin, m.start())))
        if m.group(1):
            return spans
        begin = min(m.end() + 1, end)  # past the delimiter's own line ending
    if begin >= 0:
        spans.append((begin, end))  # no closing delimiter: the last part runs to the end
    return spans


def _before_line_ending(raw: bytes, begin: int, cut: int) -> int:
    for ending in (b"\r\n", b"\n"):
        if cut - len(ending) >= begin and raw[cut - len(ending) : cut] == ending:
            return cut - len(ending)
    return cut


def _transfer_decoded(part: Message, data: bytes) -> bytes:
    """An attached mail should be 7bit/8bit/binary; some mailers base64 it anyway."""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "base64":
            return base64.b64decode(data)
        if cte == "quoted-printable":
            return quopri.decodestring(data)
    except (ValueError, binascii.Error):
        pass
    return data


def _attached_mail_bytes(part: Message) -> bytes:
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and payload else None
    if isinstance(inner, Message):
        try:
            return inner.as_bytes()
        except Exception:
            return str(inner).encode("utf-8", "replace")
    return _payload_bytes(part)


def _mentions(part: Message, name: str, headers: tuple[str, ...] = ("content-type",)) -> bool:
    """Whether the first of these headers (the one the library reads parameters from) may
    hold the parameter `name`: when its text does not even contain the name, the library's
    parameter parsing, which runs again on every question asked of a header, is spared. Only
    plain text is looked into; anything else is left to the library."""
    for header in headers:
        value = part.get(header)
        if value is not None and (not isinstance(value, str) or name in value.lower()):
            return True
    return False


def _report_type(message: Message) -> str:
    found = message.get_param("report-type", "") if _mentions(message, "report-type") else ""
    return str(found or "").lower()


def _file_name(part: Message) -> str | None:
    """`part.get_filename()`: the `filename` of Content-Disposition or else the `name` of
    Content-Type (both contain "name")."""
    headers = ("content-disposition", "content-type")
    return part.get_filename() if _mentions(part, "name", headers) else None


def _charset(part: Message, default: _T) -> str | _T:
    """`part.get_content_charset(default)`."""
    return part.get_content_charset(default) if _mentions(part, "charset") else default


def _filename(part: Message) -> str:
    """The part's file name, "" when it has none or the library cannot read it (the library
    collapses an RFC 2231 value it cannot decode to its raw text itself)."""
    try:
        return _file_name(part) or ""
    except Exception:
        return ""


def decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Bytes in a declared charset -> (text, decoded cleanly); never raises."""
    name = (charset or "utf-8").strip().strip('"').lower() or "utf-8"
    name = CHARSET_ALIASES.get(name, name)
    for candidate in (name, "utf-8"):
        try:
            return data.decode(candidate), True
        except (LookupError, ValueError):  # ValueError: bad bytes, or a NUL in the name
            continue
    text = data.decode("utf-8", "replace")
    return text, text.count("\ufffd") * 10 < max(len(text), 1)


def header_text(value: object) -> str:
    """A header value decoded from RFC 2047 words and raw 8-bit bytes; never raises."""
    if value is None:
        return ""
    if isinstance(value, str) and value.isascii() and "=?" not in value:
        return value  # what decode_header would give back, at a fraction of its cost
    try:
        chunks = email.header.decode_header(value)  # type: ignore[arg-type]
    except Exception:
        return _surrogates_to_text(str(value))
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(_surrogates_to_text(chunk))
        elif charset in (None, "unknown-8bit"):
            out.append(decode_8bit(chunk))
        else:
            out.append(decode_text(chunk, charset)[0])
    return "".join(out)


def _surrogates_to_text(text: str) -> str:
    return decode_8bit(text.encode("utf-8", "surrogateescape"))


def decode_8bit(data: bytes) -> str:
    """Raw 8-bit header bytes: UTF-8 when they are, else Latin-1 (which never fails)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def clean_line(text: str, limit: int = 998) -> str:
    """One line: CR, LF, NUL and other controls become spaces; runs of space fold."""
    return " ".join(CONTROL.sub(" ", text).split())[:limit]


def normalise_id(text: str) -> str:
    return text.strip().strip("<>").strip().casefold()


def _first_id(value: object) -> str:
    ids = message_ids([value] if value is not None else [])
    if ids:
        return ids[0]
    bare = normalise_id(header_text(value))
    return bare if bare and not NOT_IN_ID.search(bare) else ""


def message_ids(values: Sequence[object]) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        for m in MSGID.finditer(header_text(value)):
            ident = normalise_id(m.group(1))
            if ident not in found:
                found.append(ident)
    return tuple(found[:100])


# Defects that leave the addr-spec beyond doubt: an obsolete but unambiguous syntax ("Dr. A"
# unquoted), or an unknown charset in the display name's encoded word.
HARMLESS_DEFECTS = (email.errors.ObsoleteHeaderDefect, email.errors.CharsetError)


def identity(message: Message) -> tuple[Address | None, bool, str]:
    """The single From addr-spec and whether it may be trusted to update an ECR (§2.2).

    Two parsers must agree on exactly one address: the strict header registry (whose defects
    count against the sender) and getaddresses, which before Python 3.11.10 reads
    `alice@x)<bob@y>` as two addresses (CVE-2023-27043).
    """
    # Raw items: get_all() has already turned 8-bit name bytes into U+FFFD. Unfolded (RFC 5322
    # 2.2.3): a long name folded onto a second line is one line, not a CR/LF in the name.
    values = [str(v) for k, v in message.raw_items() if k.lower() == "from"]
    if not values:
        return None, False, "no From header"
    raw = _surrogates_to_text(FOLD.sub("", values[0]))
    if len(values) > 1:
        return next(iter(_loose(raw)), None), False, "several From headers"
    return _identity(raw)


# A practice writes again and again from the same few addresses: their From headers are parsed
# once (both parsers cost more than the rest of the headers together). Pure functions of the
# text, returning immutable values, so a cached answer is the answer.
@functools.lru_cache(maxsize=4096)
def _identity(raw: str) -> tuple[Address | None, bool, str]:
    return _plain_identity(raw) or _checked_identity(raw)


# The From header of most mail: words of plain ASCII and an address in angle brackets, or the
# address alone; no quotes, comments, encoded words (hence no "=" or "?"), dots in the name or
# anything else either parser reads its own way. Both parsers can only read one address and no
# defect in it, which tests check against them; everything else takes the two parsers, whose
# strict one costs a tenth of a millisecond for a new sender.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+"
_ADDR_SPEC = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
PLAIN_FROM = re.compile(
    rf"(?:(?P<name>{_ATEXT}(?: {_ATEXT})*) )?<(?P<inner>{_ADDR_SPEC})>|(?P<bare>{_ADDR_SPEC})"
)


def _plain_identity(raw: str) -> tuple[Address, bool, str] | None:
    plain = PLAIN_FROM.fullmatch(raw)
    if plain is None:
        return None
    addr = plain["inner"] or plain["bare"]
    return Address(addr.casefold(), clean_line(plain["name"] or "", 200)), True, ""


def _checked_identity(raw: str) -> tuple[Address | None, bool, str]:
    loose = _loose(raw)
    sender = loose[0] if loose else None
    if any(c in header_text(raw) for c in "\x00\r\n"):
        return sender, False, "From decodes to NUL, CR or LF"
    try:
        strict = email.policy.default.header_factory("from", raw)
    except Exception:
        return sender, False, "From cannot be parsed"
    addresses = strict.addresses
    if len(addresses) != 1 or len(loose) != 1:
        return sender, False, "From does not hold exactly one address"
    if any(not isinstance(d, HARMLESS_DEFECTS) for d in strict.defects):
        return sender, False, "From has parse defects"
    sender = Address(addresses[0].addr_spec.casefold(), clean_line(addresses[0].display_name, 200))
    if not _plausible(sender.email):
        return sender, False, "From holds no valid address"
    if _hidden_address(sender):
        return sender, False, "From display name holds another address"
    return sender, True, ""


def _loose(raw: str) -> tuple[Address, ...]:
    """What getaddresses reads in a From header: the addresses with an addr-spec."""
    return tuple(_address(p) for p in email.utils.getaddresses([raw]) if p[1])


def _plausible(addr: str) -> bool:
    local, _, domain = addr.rpartition("@")
    return (bool(local) and "." in domain) or domain == "localhost"


def _hidden_address(sender: Address) -> bool:
    found = re.findall(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", sender.name)
    return any(f.casefold() != sender.email for f in found)


def _address(pair: tuple[str, str]) -> Address:
    name, addr = pair
    return Address(email=clean_line(addr).casefold(), name=clean_line(header_text(name), 200))


def _addresses(message: Message, *names: str) -> tuple[Address, ...]:
    values: list[str] = []
    for name in names:
        values.extend(header_text(v) for v in message.get_all(name, []))
    seen: dict[str, Address] = {}
    for pair in email.utils.getaddresses(values):
        if pair[1] and "@" in pair[1]:
            a = _address(pair)
            seen.setdefault(a.email, a)
    return tuple(seen.values())[:500]


def _date(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(header_text(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # a date with no zone is taken as UTC (PRODUCT §2.2)
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _classify_headers(message: Message) -> dict[str, str]:
    out = {}
    for name in CLASSIFY_HEADERS:
        values = message.get_all(name, [])
        if values:
            out[name] = clean_line(", ".join(header_text(v) for v in values), 2000)
    return out


def _defect_categories(message: Message) -> set[str]:
    """mail-parser's defect categories. Its whole pass (`MailParser`) decodes every header and
    part once more to build dictionaries we never read, about a quarter of our parsing; the
    categories come from diagnostics it runs on the way, which are called here directly. A mail
    whose categories could depend on the rest of that pass (a recovered epilogue, a part whose
    text might not decode in its charset, an attached container) takes the whole pass."""
    try:
        parts = list(message.walk())
        views = [mailparser_utils.mime_header_view(p) for p in parts]
        # Deciding decodes payloads, and decoding notes defects (InvalidBase64LengthDefect) that
        # mail-parser, which reads each part's defects before decoding it, never reports.
        before = [list(p.defects) for p in parts]
        whole = _needs_whole_pass(parts, views)
        for part, defects in zip(parts, before, strict=True):
            part.defects[:] = defects
        if whole:
            return _whole_pass_categories(message)
        found = _part_defects(parts) | _header_defect_categories(message)
        if any(_mime_header_defects(view, defects) for view, defects in views):
            found.add("MimeHeaderDefect")
        return found
    except Exception:
        return _part_defects(message.walk())  # where the whole pass would have given up too


def _whole_pass_categories(message: Message) -> set[str]:
    """mail-parser's own answer, or ours where it gives up: its epilogue recovery raises on a
    multipart cut off before any epilogue (the epilogue is None)."""
    try:
        return {str(c) for c in mailparser.MailParser(message).defects_categories}
    except Exception:
        return _part_defects(message.walk())


def _part_defects(parts: Iterable[Message]) -> set[str]:
    return {type(d).__name__ for part in parts for d in part.defects}


def _needs_whole_pass(parts: list[Message], views: list[tuple[Message, list[str]]]) -> bool:
    """True unless mail-parser's part loop could add nothing but MIME header defects: no
    epilogue to recover, no attached container to flatten, and every part it might read as
    text decodes in the charset it would use (an attachment is never read as text)."""
    if _part_defects(parts) & EPILOGUE_DEFECTS:
        return True
    for part, (view, _) in zip(parts, views, strict=True):
        attached = view.get_content_disposition() == "attachment"
        if part.is_multipart():
            if attached:
                return True
        elif not attached and not _decodes(part, _charset(view, "utf-8")):
            return True
    return False


def _decodes(part: Message, charset: str) -> bool:
    """The part's bytes decode in `charset` to text that is valid Unicode: then mail-parser's
    body decoding, which tries exactly that, reports no CharsetDecodeDefect."""
    try:
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            return False
        data.decode(charset).encode("utf-8")
    except Exception:
        return False
    return True


def _mime_header_defects(view: Message, defects: list[str]) -> bool:
    """mail-parser's MIME header check of one part: invalid UTF-8 in its MIME headers (the
    view's own findings) or in its decoded file name."""
    found = list(defects)
    mailparser_utils.decode_header_part(_file_name(view), defects=found)
    return bool(found)


def _header_defect_categories(message: Message) -> set[str]:
    """The address, date and Received diagnostics mail-parser runs over the headers (every
    occurrence of each, as it does), as its categories."""
    found = set()
    if _address_header_defects(message):
        found.add("AddressHeaderDefect")
    dates = _date_header_defects(message)
    received: list[dict[str, object]] = []
    mailparser_utils.receiveds_parsing(
        [value for name, value in message.raw_items() if name.lower() == "received"],
        defects=received,
        date_defects=dates,
    )
    if received:
        found.add("ReceivedHeaderDefect")
    if dates:
        found.add("DateHeaderDefect")
    return found


def _address_header_defects(message: Message) -> bool:
    return any(
        _address_defects(value) if isinstance(value, str) else _address_object_defects(value)
        for name, value in message.items()
        if name.lower() in ADDRESSES_HEADERS
    )


@functools.lru_cache(maxsize=4096)  # the same To and From, mail after mail (see _identity)
def _address_defects(value: str) -> bool:
    return _address_object_defects(value)


def _address_object_defects(value: object) -> bool:
    """For a str, or the Header object compat32 makes of a value with raw 8-bit bytes."""
    found: list[dict[str, object]] = []
    mailparser_utils.get_addresses(value, defects=found, decode_names=True)
    return bool(found)


def _date_header_defects(message: Message) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    seen: dict[str, int] = {}
    for name, raw in message.raw_items():
        header = name.lower()
        if header in ("date", "resent-date"):
            occurrence = seen.get(header, 0)
            seen[header] = occurrence + 1
            result = mailparser_dates.parse_mail_date(raw)
            found.extend(mailparser_dates.date_diagnostics(result, raw, header, occurrence))
    return found


def _bounce(message: Message) -> Bounce | None:
    """The reported Message-ID and failed recipients of a delivery-status report."""
    if message.get_content_type() != "multipart/report":
        return None
    original = ""
    recipients: list[str] = []
    for part in message.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            recipients.extend(_dsn_recipients(part))
        elif ctype in ("message/rfc822", "text/rfc822-headers") and not original:
            original = _reported_id(part)
    return Bounce(original_message_id=original, recipients=tuple(recipients[:50]))


def _dsn_recipients(part: Message) -> list[str]:
    out = []
    for block in part.get_payload() if isinstance(part.get_payload(), list) else []:
        if not isinstance(block, Message):
            continue
        final = header_text(block.get("Final-Recipient") or block.get("Original-Recipient"))
        action = header_text(block.get("Action")).strip().lower()
        if final and action in ("failed", ""):
            out.append(clean_line(final.split(";")[-1]).strip("<>").casefold())
    return out


def _reported_id(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return _first_id(payload[0].get("Message-ID"))
    if isinstance(payload, str):
        return _first_id(email.message_from_string(payload).get("Message-ID"))
    return ""
