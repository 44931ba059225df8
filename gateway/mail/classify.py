"""Human, automatic, bounce or our own loop (PRODUCT §2.3): a pure function of the parsed mail.

Automatic mail must never create an ECR or a notification; otherwise two auto-responders can
keep each other busy for ever. The signals are RFC 3834's and what field practice adds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.model import Classification, Kind, ParsedMail

ROLE_LOCALS = ("mailer-daemon", "postmaster", "noreply", "no-reply", "donotreply", "do-not-reply")
PRECEDENCE = ("bulk", "junk", "list", "auto_reply")
# Out-of-office subjects. Words that also start real requests ("Absence recording broken",
# "Out of office hours cover") count only as a label: followed by a colon, or by "reply".
OUT_OF_OFFICE = re.compile(
    r"^\s*(?:"
    r"(?:automatic reply|auto[- ]?reply|autoreply|auto[- ]?response|abwesenheitsnotiz|"
    r"automatische antwort|r[ée]ponse automatique|automatisch antwoord|"
    r"respuesta autom[aá]tica)\b"
    r"|(?:out of (?:the )?office|away from (?:the )?office|on (?:annual )?leave|vacation|"
    r"absence|afwezig(?:heid)?)\s*(?:(?:auto)?reply|notice|message|notification)?\s*:"
    r"|out of (?:the )?office (?:auto)?reply\b"
    r"|i am (?:currently )?out of (?:the )?office\b"
    r")",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Own:
    """What marks a mail as ours."""

    instance_id: str
    addresses: frozenset[str]


def classify(mail: ParsedMail, null_sender: bool, own: Own) -> Classification:
    for check in (_loop, _bounce, _automatic):
        found = check(mail, null_sender, own)
        if found:
            return found
    return Classification(Kind.HUMAN, "no automatic signal")


def _loop(mail: ParsedMail, null_sender: bool, own: Own) -> Classification | None:
    if own.instance_id and own.instance_id in mail.headers.get("x-ecr-loop", "").split(", "):
        return Classification(Kind.LOOP, "carries our X-ECR-Loop header")
    if mail.sender and mail.sender.email in own.addresses:
        return Classification(Kind.LOOP, "sent from one of our own addresses")
    return None


def _bounce(mail: ParsedMail, null_sender: bool, own: Own) -> Classification | None:
    if mail.content_type == "multipart/report" and mail.report_type == "delivery-status":
        return Classification(Kind.BOUNCE, "delivery-status report")
    if "x-failed-recipients" in mail.headers:
        return Classification(Kind.BOUNCE, "X-Failed-Recipients header")
    return None


def _automatic(mail: ParsedMail, null_sender: bool, own: Own) -> Classification | None:
    h = mail.headers
    auto = h.get("auto-submitted", "").split(";")[0].strip().lower()
    reasons = [
        (auto not in ("", "no"), f"Auto-Submitted: {auto}"),
        (h.get("precedence", "").strip().lower() in PRECEDENCE, "Precedence header"),
        ("x-autoreply" in h or "x-autorespond" in h, "X-Autoreply/X-Autorespond header"),
        ("list-id" in h or "list-unsubscribe" in h, "mailing-list header"),
        (null_sender or h.get("return-path", "").strip() == "<>", "null return path"),
        (_role_sender(mail), "sent from a role address"),
        (bool(OUT_OF_OFFICE.match(mail.subject)), "out-of-office subject"),
    ]
    for hit, why in reasons:
        if hit:
            return Classification(Kind.AUTOMATIC, why)
    return None


def _role_sender(mail: ParsedMail) -> bool:
    if not mail.sender:
        return False
    local = mail.sender.email.rpartition("@")[0].split("+")[0]
    return local in ROLE_LOCALS
