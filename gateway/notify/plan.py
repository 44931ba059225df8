"""Who gets which notification for what happened (PRODUCT §3): pure.

Never to undeliverable addresses, our own addresses (with or without a +tag), role addresses
or empty ones; automatic mail causes no event at all, so nothing here answers it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.model import Address, Happened

CUSTOMER_TEMPLATES = {
    "created": "created",
    "pending": "pending",
    "reactivated": "reactivated",
    "resolved": "resolved",
}
ROLE_LOCALS = (
    "mailer-daemon",
    "postmaster",
    "noreply",
    "no-reply",
    "donotreply",
    "do-not-reply",
    "bounces",
    "bounce",
)


@dataclass(frozen=True)
class Recipients:
    own: frozenset[str]
    staff_alert: str
    ack_limit_per_hour: int


@dataclass(frozen=True)
class Planned:
    template: str
    to: Address
    why_skipped: str = ""  # set when the rate limit held an acknowledgement back


def plan(
    h: Happened,
    people: tuple[Address, ...],
    undeliverable: frozenset[str],
    rules: Recipients,
    acks_last_hour: Callable[[str], int],
) -> list[Planned]:
    if h.kind == "updated":
        alert = rules.staff_alert.strip().casefold()
        return [Planned("staff_update", Address(alert))] if alert else []
    template = CUSTOMER_TEMPLATES.get(h.kind)
    if template is None:
        return []
    out = []
    for person in people:
        if not deliverable(person.email, rules.own) or person.email in undeliverable:
            continue
        if template == "created" and acks_last_hour(person.email) >= rules.ack_limit_per_hour:
            out.append(Planned(template, person, "acknowledgement rate limit"))
            continue
        out.append(Planned(template, person))
    return out


# A plausible addr-spec: what a relay would take. A mangled address (replacement characters,
# spaces, brackets) gets no mail; answering it would only feed a bounce loop.
PLAUSIBLE = re.compile(r"[^\s@<>()\[\],;:\"\\\ufffd]+@[^\s@<>()\[\],;:\"\\\ufffd]+\.[^\s@.\ufffd]+")


def deliverable(email: str, own: frozenset[str]) -> bool:
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain or not PLAUSIBLE.fullmatch(email):
        return False
    base = local.partition("+")[0]
    return base not in ROLE_LOCALS and f"{base}@{domain}" not in own and email not in own
