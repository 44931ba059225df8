"""Score links (PRODUCT §4) without the framework: which tokens admit, and what a form holds.

A token admits only while it is the ECR's current resolution: the ECR is resolved and its
resolution number is the token's counter. A reactivation moves the ECR off `resolved`, and
the next resolution moves the number on, so links of an earlier resolution stay dead (410).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime

from gateway.mail import tokens
from gateway.model import Status
from gateway.notify.notifier import SCORE_LABELS
from gateway.store.scores import Scores

MAX_COMMENT = 2000
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Ticket:
    """An admitted score token: whose score, for which resolution of which ECR."""

    ecr_id: int
    contact_id: int
    resolution_no: int
    by: str  # the contact's address, as the event's author


class Refused(Exception):
    """A token that admits nothing: the status and the plain words of the page."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


def invalid() -> Refused:
    return Refused(
        400,
        "Link not valid",
        "This score link is not valid. Please use the link from your mail exactly as it is.",
    )


def expired() -> Refused:
    return Refused(410, "Link expired", "This score link has expired.")


def superseded() -> Refused:
    return Refused(
        410,
        "Link no longer valid",
        "This incident was reopened after this link was sent, so the link no longer applies. "
        "When it is resolved again you will receive new links.",
    )


def admit(keys: list[bytes], text: str, scores: Scores, now: datetime) -> Ticket:
    try:
        token = tokens.verify(keys, text, tokens.Purpose.SCORE, now)
    except tokens.TokenError as exc:
        raise expired() if exc.reason == "expired" else invalid() from None
    target = scores.target(token.ecr_id, token.contact_id)
    if target is None or target.contact_email is None:
        raise invalid()
    current = target.resolution_no & 0xFFFF  # the token holds the counter's low 16 bits
    if target.status != Status.RESOLVED or token.counter != current:
        raise superseded()
    return Ticket(target.ecr_id, token.contact_id, target.resolution_no, target.contact_email)


def score_value(text: str | None) -> int | None:
    """1 … 5 from a form or query value; None for anything else."""
    text = (text or "").strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= len(SCORE_LABELS):
        return int(text)
    return None


def clean_comment(text: str | None) -> str:
    """Plain text kept as text: line breaks normalised, other control characters dropped,
    length capped. Escaping is the page's job, at output."""
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    kept = "".join(c for c in text if c in "\n\t" or _shown(c))
    return kept.strip()[:MAX_COMMENT]


def _shown(c: str) -> bool:
    # Control characters, and the bidi overrides that could make a comment read otherwise
    # than it is stored; other format characters (emoji joiners) stay.
    return unicodedata.category(c) != "Cc" and c not in BIDI_CONTROLS


def choices(selected: int | None) -> list[dict[str, object]]:
    return [
        {"score": n, "label": label, "checked": n == selected}
        for n, label in enumerate(SCORE_LABELS, start=1)
    ]
