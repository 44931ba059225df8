"""Which ECR a mail belongs to, and whether its sender may write into it (PRODUCT §2.4).

Pure, given lookups: the ladder is signed reply address, thread headers, subject reference;
the first rung that names an ECR decides. Naming an ECR is not enough to update it: the sender
must be a trusted participant, or the mail becomes a new ECR related to the one it named.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.mail import tokens
from gateway.model import EcrView, Match, ParsedMail, Rung


class Lookups(Protocol):
    def ecr(self, ecr_id: int) -> EcrView | None: ...
    def ecr_for_message_ids(self, ids: Sequence[str]) -> int | None: ...
    def contact_email(self, contact_id: int) -> str | None: ...


@dataclass(frozen=True)
class Context:
    keys: list[bytes]
    reply_locals: frozenset[str]  # local parts that take a +token, e.g. "support"
    domain: str
    ref_prefix: str
    ref_width: int
    now: datetime

    def ref(self, ecr_id: int) -> str:
        return f"{self.ref_prefix}{ecr_id:0{self.ref_width}d}"


def reference_pattern(prefix: str) -> re.Pattern[str]:
    """`[ECR-000123]`, `ECR-000123`, `ECR 123`, `ECR#123`, `ecr000123`; never inside a word."""
    letters = re.escape(prefix.rstrip("-#_ "))
    return re.compile(rf"(?<![A-Za-z0-9]){letters}[-#_ ]?0*(\d{{1,9}})(?![A-Za-z0-9])", re.I)


def match(mail: ParsedMail, rcpt_tos: Sequence[str], look: Lookups, ctx: Context) -> Match:
    trace: list[str] = []
    named: list[EcrView] = []
    for rung, find in (
        (Rung.TOKEN, _by_token),
        (Rung.THREAD, _by_thread),
        (Rung.SUBJECT, _by_subject),
    ):
        ecr, allowed_also = find(mail, rcpt_tos, look, ctx, trace)
        if ecr is None:
            continue
        if _may_update(mail, ecr, allowed_also):
            trace.append(f"{rung}: {ecr.ref}, sender may update it")
            return Match(rung, ecr, trace=tuple(trace))
        trace.append(f"{rung}: {ecr.ref}, but {_who(mail)} may not update it")
        named.append(ecr)
    related = named[0].id if named else None
    missing = _missing_reference(mail, look, ctx) if not named else ""
    trace.append("new ECR" + (f", related to {named[0].ref}" if named else ""))
    return Match(Rung.NEW, None, related_to=related, named_missing=missing, trace=tuple(trace))


def _who(mail: ParsedMail) -> str:
    if not mail.sender:
        return "an unknown sender"
    return mail.sender.email + ("" if mail.trusted else f" (untrusted: {mail.untrusted_reason})")


def _may_update(mail: ParsedMail, ecr: EcrView, allowed_also: str) -> bool:
    if not mail.trusted or not mail.sender:
        return False
    return mail.sender.email in ecr.participants or mail.sender.email == allowed_also


Found = tuple[EcrView | None, str]


def _by_token(
    mail: ParsedMail, rcpt_tos: Sequence[str], look: Lookups, ctx: Context, trace: list[str]
) -> Found:
    tried = False
    for address in _recipients(mail, rcpt_tos):
        local, _, domain = address.rpartition("@")
        base, plus, text = local.partition("+")
        if not plus or base not in ctx.reply_locals or domain != ctx.domain:
            continue
        tried = True
        try:
            token = tokens.verify(ctx.keys, text, tokens.Purpose.REPLY, ctx.now)
        except tokens.TokenError as exc:
            trace.append(f"token: reply address token {exc.reason}")
            continue
        ecr = look.ecr(token.ecr_id)
        if ecr is None:
            trace.append("token: names no existing ECR")
            continue
        return ecr, look.contact_email(token.contact_id) or ""
    if not tried:  # a rejected token has said why already
        trace.append("token: no signed reply address")
    return None, ""


def _recipients(mail: ParsedMail, rcpt_tos: Sequence[str]) -> list[str]:
    seen = [a.casefold() for a in rcpt_tos]
    seen += [a.email for a in (*mail.to, *mail.cc)] + list(mail.delivered_to)
    return list(dict.fromkeys(seen))


def _by_thread(
    mail: ParsedMail, rcpt_tos: Sequence[str], look: Lookups, ctx: Context, trace: list[str]
) -> Found:
    ids = list(dict.fromkeys((*mail.in_reply_to, *mail.references)))
    ecr_id = look.ecr_for_message_ids(ids) if ids else None
    ecr = look.ecr(ecr_id) if ecr_id is not None else None
    if ecr is None:
        trace.append("thread: no known Message-ID" if ids else "thread: no thread headers")
    return ecr, ""


def _by_subject(
    mail: ParsedMail, rcpt_tos: Sequence[str], look: Lookups, ctx: Context, trace: list[str]
) -> Found:
    for m in reference_pattern(ctx.ref_prefix).finditer(mail.subject):
        ecr = look.ecr(int(m.group(1)))
        if ecr is not None:
            return ecr, ""
    trace.append("subject: no reference to an existing ECR")
    return None, ""


def _missing_reference(mail: ParsedMail, look: Lookups, ctx: Context) -> str:
    m = reference_pattern(ctx.ref_prefix).search(mail.subject)
    return ctx.ref(int(m.group(1))) if m else ""
