"""The status rules of PRODUCT §2.5: given a classified, matched mail, decide what applying it does.

Pure: the store carries the returned Plan out in one transaction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.model import (
    Action,
    Address,
    Classification,
    Kind,
    Match,
    Outcome,
    ParsedMail,
    Plan,
    Status,
)

COMMAND = re.compile(r"^\s*(status|problem[ _-]?type)\s*:\s*(.*?)\s*$", re.IGNORECASE)
REACTIVATE = {"re-activate", "reactivate", "re-open", "reopen", "re-activated", "reactivated"}
# Words that may follow a thanks phrase without making it more than thanks.
THANKS_FILLER = {
    "so",
    "much",
    "very",
    "again",
    "a",
    "lot",
    "you",
    "for",
    "your",
    "help",
    "all",
    "the",
    "team",
    "everyone",
    "guys",
    "kindly",
    "and",
    "many",
}
OUTSTANDING = (Status.ACTIVE, Status.REACTIVATED)
# A closing line after which a mail holds only its signature block (Outlook has no `-- `).
VALEDICTION = re.compile(
    r"^((kind|best|warm|warmest)\s+)?(regards|wishes)\b|"
    r"^(best|cheers|sincerely|yours( sincerely| faithfully| truly)?|"
    r"mit freundlichen gr(ü|ue)(ß|ss)en|viele gr(ü|ue)(ß|ss)e|mfg)\W*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Policy:
    reopen_window: timedelta
    thanks_phrases: tuple[str, ...]
    problem_types: Mapping[str, str]  # recipient address (case-folded) -> problem type
    own_addresses: frozenset[str]


@dataclass(frozen=True)
class Commands:
    reactivate: bool
    problem_type: str
    notes: tuple[str, ...]
    text: str  # what remains once the command lines are removed


def decide(
    mail: ParsedMail,
    kind: Classification,
    found: Match,
    rcpt_tos: Sequence[str],
    policy: Policy,
    now: datetime,
) -> Plan:
    if kind.kind is Kind.LOOP:
        return Plan(Action.LOOP, Outcome.LOOP, kind.reason)
    if kind.automatic:
        return _automatic(mail, kind, found)
    cmds = commands(mail.new_text)
    ecr = found.ecr
    if ecr is None:
        return _create(mail, found, cmds, rcpt_tos, policy, "new mail")
    if ecr.status is Status.RESOLVED and not _in_window(ecr.resolved_at, policy, now):
        days = policy.reopen_window.days
        why = f"reply to {ecr.ref}, resolved more than {days} days ago"
        return _create(mail, found, cmds, rcpt_tos, policy, why, related=ecr.id)
    status, why = _next_status(ecr.status, cmds, policy)
    notes = cmds.notes
    if cmds.problem_type:
        notes += (f"Problem Type line not applied to an existing ECR: {cmds.problem_type}",)
    return Plan(
        Action.UPDATE,
        Outcome.UPDATED,
        why,
        ecr_id=ecr.id,
        new_status=status,
        text=cmds.text,
        notes=notes,
        add_participants=_cc(mail, policy),
    )


def _automatic(mail: ParsedMail, kind: Classification, found: Match) -> Plan:
    if found.ecr is not None:
        return Plan(
            Action.NOTE,
            Outcome.AUTOMATIC,
            f"{kind.reason}; noted on {found.ecr.ref}",
            ecr_id=found.ecr.id,
            text=mail.new_text,
        )
    return Plan(Action.RECORD, Outcome.AUTOMATIC, kind.reason)


def _create(
    mail: ParsedMail,
    found: Match,
    cmds: Commands,
    rcpt_tos: Sequence[str],
    policy: Policy,
    why: str,
    related: int | None = None,
) -> Plan:
    related = related if related is not None else found.related_to
    if found.related_to is not None and related == found.related_to:
        why = "sender may not update the ECR it named; new ECR related to it"
    if found.named_missing:
        why = f"{found.named_missing} does not exist; new ECR"
    kind = cmds.problem_type or _mapped_type(mail, rcpt_tos, policy) or "General"
    return Plan(
        Action.CREATE,
        Outcome.CREATED,
        why,
        new_status=Status.ACTIVE,
        related_to=related,
        problem_type=kind,
        text=cmds.text,
        notes=cmds.notes,
        add_participants=_cc(mail, policy) if mail.trusted else (),
        named_missing=found.named_missing,
    )


def _next_status(current: Status, cmds: Commands, policy: Policy) -> tuple[Status | None, str]:
    if current is Status.PENDING:
        return Status.ACTIVE, "customer responded"
    if current is Status.RESOLVED:
        if cmds.reactivate:
            return Status.REACTIVATED, "Status: Re-activate"
        if thanks_only(cmds.text, policy.thanks_phrases):
            return None, "thanks only; stays resolved"
        return Status.REACTIVATED, "reply within the reopen window"
    return None, "update to an outstanding ECR"


def _in_window(resolved_at: datetime | None, policy: Policy, now: datetime) -> bool:
    return resolved_at is None or now - resolved_at <= policy.reopen_window


def _mapped_type(mail: ParsedMail, rcpt_tos: Sequence[str], policy: Policy) -> str:
    for address in [*(a.casefold() for a in rcpt_tos), *(a.email for a in (*mail.to, *mail.cc))]:
        if address in policy.problem_types:
            return policy.problem_types[address]
    return ""


def _cc(mail: ParsedMail, policy: Policy) -> tuple[Address, ...]:
    """To/Cc of a participant's mail become participants; our own addresses never do."""
    sender = mail.sender.email if mail.sender else ""
    return tuple(a for a in (*mail.to, *mail.cc) if a.email != sender and not ours(a.email, policy))


def ours(address: str, policy: Policy) -> bool:
    """One of our addresses, with or without a +tag (reply addresses are ours too)."""
    local, _, domain = address.rpartition("@")
    return (
        address in policy.own_addresses
        or f"{local.partition('+')[0]}@{domain}" in policy.own_addresses
    )


def commands(text: str) -> Commands:
    """`Status:` and `Problem Type:` lines at the top of the text; removed from what is stored."""
    lines = text.split("\n")
    reactivate, kind, notes = False, "", []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        m = COMMAND.match(lines[i])
        if not m:
            break
        name, value = m.group(1).lower(), m.group(2)
        if name == "status" and value.lower() in REACTIVATE:
            reactivate = True
        elif name != "status" and value:
            kind = " ".join(value.split())[:60]
        else:
            notes.append(f"unknown command not applied: {name.title()}: {value[:80]}")
        i += 1
    return Commands(reactivate, kind, tuple(notes), "\n".join(lines[i:]).strip())


def thanks_only(text: str, phrases: Sequence[str]) -> bool:
    """True only for a short thank-you plus sign-off; anything more may be a new problem."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines or "?" in text:
        return False
    words = _words(lines[0])
    matched = next(
        (p for p in sorted(phrases, key=len, reverse=True) if words[: len(_words(p))] == _words(p)),
        None,
    )
    if matched is None:
        return False
    rest = words[len(_words(matched)) :]
    if any(w not in THANKS_FILLER for w in rest):
        return False
    # What follows the thanks line may only be a sign-off: a few short lines, or a closing
    # ("Kind regards") and then a signature block of short lines.
    tail, limit = lines[1:], 3
    if tail and VALEDICTION.match(tail[0]):
        tail, limit = tail[1:], 8
    return len(tail) <= limit and all(_signature_line(line) for line in tail)


# Lower-case words a name, title, practice or address line may hold ("Department of Health").
NAME_LINKS = {"of", "and", "the", "for", "de", "von", "van", "der", "den", "la", "le", "du"}


def _signature_line(line: str) -> bool:
    """A name, title, practice, phone or address: short, and no lower-case sentence words.
    "Dr A Smith", "Practice Manager", "Tel 01234 567890" pass; "Still not working" does not."""
    tokens = line.split()
    return len(tokens) <= 6 and all(_name_token(t) for t in tokens)


def _name_token(token: str) -> bool:
    word = token.strip(".,;:()|-&")
    return (
        not word
        or word[0].isupper()
        or word.lower() in NAME_LINKS
        or any(c.isdigit() or c in "@./" for c in word)
    )


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())
