"""A notification as a MIME message: headers of PRODUCT §3, text and HTML parts; pure.

Every header value goes through the email library, which folds and encodes it; nothing from a
mail is ever concatenated into a header line, and CR, LF and NUL are removed first.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import SMTP, SMTPUTF8, Compat32, EmailPolicy
from email.utils import format_datetime, formataddr
from typing import Any

from gateway.mail.parse import clean_line
from gateway.model import Address
from gateway.notify.render import Rendered, Renderer

SUBJECT_LIMIT = 200
SAFE_ID = re.compile(r"[!-;=?-~]{1,500}")  # printable ASCII without space, < and >
_QP = Charset("utf-8")
_QP.body_encoding = QP  # readable in a raw mail, unlike base64
BOUNDARY = "=_ecr_alternative"  # "=_" never occurs in quoted-printable parts


class _Wire(Compat32):
    """compat32, but a header line that fits is written as it is: the rule of the library's
    modern policies (refold_source="long"). compat32 runs every value through its Header
    folding, which was most of the generator's time; only longer values still go there."""

    def fold_binary(self, name: str, value: str) -> bytes:
        if isinstance(value, str) and _fits(name, value, self.max_line_length or 998):
            return _as_is(self.linesep).fold_binary(name, value)
        return super().fold_binary(name, value)


def _fits(name: str, value: str, limit: int) -> bool:
    # Printable ASCII only: no CR or LF that could start a line, nothing to encode.
    return value.isascii() and value.isprintable() and len(name) + 2 + len(value) <= limit


@functools.cache
def _as_is(linesep: str) -> EmailPolicy[EmailMessage]:
    return SMTP.clone(linesep=linesep, refold_source="none")


_WIRE = _Wire(linesep="\r\n")  # smtplib sends bytes as they are: CRLF is ours to do


@dataclass(frozen=True)
class Headers:
    ref: str
    subject: str
    sender: str  # our support address
    to: Address
    reply_to: str
    message_id: str  # without brackets
    in_reply_to: str
    references: tuple[str, ...]
    auto_submitted: str  # auto-replied (acknowledgements) or auto-generated
    instance_id: str
    date: datetime


TAG = re.compile(r"\[\s*([^\[\]]{1,40}?)\s*\]\s*")


def write_spec(template: str, context: dict[str, Any], h: Headers) -> str:
    fields = {f.name: getattr(h, f.name) for f in dataclasses.fields(h)}  # asdict copies deeply
    fields.update(to=[h.to.email, h.to.name], date=h.date.isoformat())
    return json.dumps({"template": template, "context": context, "headers": fields})


def read_spec(text: str) -> tuple[str, dict[str, Any], Headers]:
    spec = json.loads(text)
    fields = spec["headers"]
    email, name = fields.pop("to")
    headers = Headers(
        **{
            **fields,
            "to": Address(email, name),
            "references": tuple(fields["references"]),
            "date": datetime.fromisoformat(fields["date"]),
        }
    )
    return spec["template"], spec["context"], headers


def tagged_subject(ref: str, subject: str) -> str:
    """`[ECR-000123] subject`, the tag never doubled, one line, capped."""
    text = clean_line(subject)
    if ref:
        text = TAG.sub(
            lambda m: "" if m.group(1).casefold() == ref.casefold() else m.group(0), text
        )
    return clean_line(f"[{ref}] {text}" if ref else text)[:SUBJECT_LIMIT]


def message_id(ref: str, nonce: str, key: bytes, domain: str) -> str:
    """`ecr-000123.<nonce>.<mac>@domain`: the MAC lets us know our own ids when they return."""
    mac = hmac.new(key, f"{ref}.{nonce}".encode(), hashlib.sha256).hexdigest()[:12]
    return f"{ref.lower()}.{nonce}.{mac}@{domain}"


def message(renderer: Renderer, spec: str) -> bytes:
    """An outbox row's mail from its spec: everything that varies (ids, tokens, the date) was
    fixed when it was queued, so a resend is the same mail."""
    template, context, headers = read_spec(spec)
    return build(headers, renderer.render(template, context))


def build(h: Headers, body: Rendered) -> bytes:
    """The message bytes; the compat32 classes are ten times faster than EmailMessage, which
    is kept for the rare Unicode address that needs SMTPUTF8."""
    if not h.to.email.isascii():
        return _build_utf8(h, body)
    # Our own boundary: the library's search for a safe random one compiles a regular
    # expression for every mail, and a fixed one makes the Content-Type line the same in all.
    msg = MIMEMultipart("alternative", boundary=BOUNDARY)
    for name, value in _header_values(h):
        msg[name] = value
    msg["To"] = formataddr((clean_line(h.to.name, 200), h.to.email), charset="utf-8")
    msg["Subject"] = _subject(tagged_subject(h.ref, h.subject))  # type: ignore[assignment]
    msg.attach(_text_part(body.text, "plain"))
    msg.attach(_text_part(body.html, "html"))
    return msg.as_bytes(policy=_WIRE)


def _text_part(text: str, subtype: str) -> MIMENonMultipart:
    """What MIMEText(text, subtype, _QP) makes, at half its cost: MIMEText sets the charset
    twice, parsing back the Content-Type it has just written."""
    part = MIMENonMultipart("text", subtype, charset="utf-8")
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(_QP.body_encode(text))
    return part


def _subject(subject: str) -> str | Header:
    """Plain ASCII is written or folded by _Wire; the rest is encoded (RFC 2047). Both
    know the header's name, so the first line stays within 78 characters too."""
    return subject if subject.isascii() else Header(subject, "utf-8", header_name="Subject")


def _header_values(h: Headers) -> list[tuple[str, str]]:
    """Everything but To and Subject: values we made, and Message-IDs we stored (checked)."""
    out = [
        ("From", h.sender),
        ("Reply-To", h.reply_to),
        ("Date", format_datetime(h.date)),
        ("Message-ID", f"<{h.message_id}>"),
    ]
    if _safe_id(h.in_reply_to):
        out.append(("In-Reply-To", f"<{h.in_reply_to}>"))
    references = [r for r in h.references if _safe_id(r)]
    if references:
        out.append(("References", " ".join(f"<{r}>" for r in references)))
    out += [
        ("Auto-Submitted", h.auto_submitted),
        ("X-Auto-Response-Suppress", "All"),  # Outlook: send no out-of-office to this
        ("X-ECR-Loop", h.instance_id),
    ]
    if h.ref:
        out.append(("X-ECR-Reference", h.ref))
    return out


def _safe_id(ident: str) -> bool:
    """A Message-ID from a stored mail goes into a header only when it is one clean token."""
    return bool(SAFE_ID.fullmatch(ident))


def _build_utf8(h: Headers, body: Rendered) -> bytes:
    msg = EmailMessage()
    for name, value in _header_values(h):
        msg[name] = value
    msg["To"] = _address(h.to)
    msg["Subject"] = tagged_subject(h.ref, h.subject)
    msg.set_content(body.text)
    msg.add_alternative(body.html, subtype="html")
    return msg.as_bytes(policy=SMTPUTF8)  # CRLF, like _WIRE


def _address(a: Address) -> HeaderAddress | str:
    name = clean_line(a.name, 200)
    try:
        return HeaderAddress(display_name=name, addr_spec=a.email)
    except (ValueError, IndexError):
        return a.email
