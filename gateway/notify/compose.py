"""A notification as a MIME message: headers of PRODUCT §3, text and HTML parts; pure.

Every header value goes through the email library, which folds and encodes it; nothing from a
mail is ever concatenated into a header line, and CR, LF and NUL are removed first.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime

from gateway.mail.parse import clean_line
from gateway.model import Address
from gateway.notify.render import Rendered

SUBJECT_LIMIT = 200


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


def tagged_subject(ref: str, subject: str) -> str:
    """`[ECR-000123] subject`, the tag never doubled, one line, capped."""
    text = clean_line(subject)
    text = re.sub(rf"\[\s*{re.escape(ref)}\s*\]\s*", "", text, flags=re.IGNORECASE).strip()
    return clean_line(f"[{ref}] {text}" if ref else text)[:SUBJECT_LIMIT]


def message_id(ref: str, nonce: str, key: bytes, domain: str) -> str:
    """`ecr-000123.<nonce>.<mac>@domain`: the MAC lets us know our own ids when they return."""
    mac = hmac.new(key, f"{ref}.{nonce}".encode(), hashlib.sha256).hexdigest()[:12]
    return f"{ref.lower()}.{nonce}.{mac}@{domain}"


def build(h: Headers, body: Rendered) -> bytes:
    msg = EmailMessage()
    msg["From"] = h.sender
    msg["To"] = _address(h.to)
    msg["Reply-To"] = h.reply_to
    msg["Subject"] = tagged_subject(h.ref, h.subject)
    msg["Date"] = format_datetime(h.date)
    msg["Message-ID"] = f"<{h.message_id}>"
    if h.in_reply_to:
        msg["In-Reply-To"] = f"<{h.in_reply_to}>"
    if h.references:
        msg["References"] = " ".join(f"<{r}>" for r in h.references)
    msg["Auto-Submitted"] = h.auto_submitted
    msg["X-Auto-Response-Suppress"] = "All"  # Outlook: send no out-of-office to this
    msg["X-ECR-Loop"] = h.instance_id
    if h.ref:
        msg["X-ECR-Reference"] = h.ref
    msg.set_content(body.text)
    msg.add_alternative(body.html, subtype="html")
    try:
        return msg.as_bytes(policy=SMTP)
    except (UnicodeEncodeError, ValueError):  # a Unicode address needs SMTPUTF8
        return msg.as_bytes(policy=SMTPUTF8)


def _address(a: Address) -> HeaderAddress | str:
    name = clean_line(a.name, 200)
    try:
        return HeaderAddress(display_name=name, addr_spec=a.email)
    except (ValueError, IndexError):
        return a.email
