"""Events -> rendered outbox rows, inside the transaction of the change that caused them."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.mail import tokens
from gateway.model import Address, Happened, ParsedMail
from gateway.notify import compose, plan
from gateway.notify.render import Renderer
from gateway.store.outbox import Audience, Outbox, Queued

log = logging.getLogger(__name__)

SCORE_LABELS = ("very poor", "poor", "fair", "good", "excellent")
SCORE_DAYS = 28


@dataclass(frozen=True)
class Identity:
    """Who we are in our mails."""

    support_address: str
    bounce_address: str
    domain: str
    base_url: str
    instance_id: str
    team_name: str
    reply_token_days: int
    reopen_days: int


class Notifier:
    def __init__(
        self,
        outbox: Outbox,
        renderer: Renderer,
        me: Identity,
        recipients: plan.Recipients,
        keys: list[bytes],
        ref_prefix: str,
        ref_width: int,
    ) -> None:
        self.outbox = outbox
        self.renderer = renderer
        self.me = me
        self.recipients = recipients
        self.keys = keys
        self.prefix = ref_prefix
        self.width = ref_width

    def ref(self, ecr_id: int) -> str:
        return f"{self.prefix}{ecr_id:0{self.width}d}"

    def queue(self, happened: Sequence[Happened], now: datetime) -> int:
        """Outbox rows for everything that happened; the caller's transaction commits them."""
        queued = 0
        for h in happened:
            audience = self.outbox.audience(h.ecr_id)
            if audience is None:
                continue
            for p in plan.plan(
                h,
                audience.participants,
                audience.undeliverable,
                self.recipients,
                functools.partial(self._acks_since, now - timedelta(hours=1)),
            ):
                if p.why_skipped:
                    log.warning(
                        "%s: no %s mail to %s (%s)",
                        self.ref(h.ecr_id),
                        p.template,
                        p.to.email,
                        p.why_skipped,
                    )
                    continue
                queued += self._queue_one(h, p, audience, now)
        return queued

    def _acks_since(self, since: datetime, email: str) -> int:
        return self.outbox.recent(email, "created", since)

    def bounced(self, mail: ParsedMail, now: datetime) -> tuple[int | None, str]:
        """Attribute a delivery-status report to the notification it reports (§2.3)."""
        report = mail.bounce
        if report is None or not report.original_message_id:
            return None, "delivery-status report naming no message"
        row = self.outbox.bounced(report.original_message_id, report.recipients, now)
        if row is None:
            return None, "delivery-status report for a message that is not ours"
        log.warning(
            "outbox %d to %s bounced; address marked undeliverable", row["id"], row["recipient"]
        )
        return row["ecr_id"], f"bounce of our {row['template']} mail to {row['recipient']}"

    def oversize(
        self, to: Address, subject: str, about: str, size: int, limit: int, now: datetime
    ) -> bool:
        """One `oversize` mail to the sender of a mail too large to take (PRODUCT §2.6), in
        the caller's transaction. `about` is the refused mail's dedupe key: the outbox's unique
        (event, recipient) key makes the mail go once, however often the mail is seen."""
        why = self._no_oversize_mail(to.email, now)
        if why:
            log.warning("no oversize mail to %s (%s)", to.email, why)
            return False
        mid = compose.message_id("oversize", secrets.token_hex(6), self.keys[0], self.me.domain)
        cause = about[4:] if about.startswith("mid:") else ""
        headers = compose.Headers(
            ref="",
            subject=f"Your mail was too large: {subject}",
            sender=self.me.support_address,
            to=to,
            reply_to=self.me.support_address,
            message_id=mid,
            in_reply_to=cause,
            references=(cause,) if cause else (),
            auto_submitted="auto-replied",  # it answers their mail (RFC 3834)
            instance_id=self.me.instance_id,
            date=now,
        )
        context = {
            "ref": "",
            "subject": subject,
            "name": to.name,
            "team_name": self.me.team_name,
            "size_mb": _megabytes(size),
            "limit_mb": _megabytes(limit),
        }
        spec = compose.write_spec("oversize", context, headers)
        key = f"oversize:{about}"
        row = Queued(key, to.email, "oversize", None, mid, self.me.bounce_address, spec)
        return self.outbox.queue(row, now)

    def _no_oversize_mail(self, email: str, now: datetime) -> str:
        """Why the sender of an oversize mail gets no answer, or "" when they get one."""
        if not plan.deliverable(email, self.recipients.own):
            return "not an address we answer"
        if self.outbox.undeliverable(email):
            return "address is undeliverable"
        recent = self.outbox.recent(email, "oversize", now - timedelta(hours=1))
        if recent >= self.recipients.ack_limit_per_hour:  # a peer must not start a mail storm
            return "acknowledgement rate limit"
        return ""

    def _queue_one(self, h: Happened, p: plan.Planned, audience: Audience, now: datetime) -> int:
        ref = self.ref(h.ecr_id)
        contact = 0
        if p.template != "staff_update":
            contact = audience.contact_ids.get(p.to.email) or self.outbox.contact_id(p.to)
        mid = compose.message_id(ref, secrets.token_hex(6), self.keys[0], self.me.domain)
        headers = compose.Headers(
            ref=ref,
            subject=audience.subject,
            sender=self.me.support_address,
            to=p.to,
            reply_to=self._reply_to(h.ecr_id, contact, now),
            message_id=mid,
            in_reply_to=h.message_id or audience.last_inbound,
            references=_references(ref, self.me.domain, audience.thread, h.message_id),
            auto_submitted="auto-replied" if p.template == "created" else "auto-generated",
            instance_id=self.me.instance_id,
            date=now,
        )
        context = self._context(h, p, audience, contact, now)
        spec = compose.write_spec(p.template, context, headers)
        row = Queued(h.key, p.to.email, p.template, h.ecr_id, mid, self.me.bounce_address, spec)
        return int(self.outbox.queue(row, now))

    def message(self, spec: str) -> bytes:
        """An outbox row's mail, rendered when it is sent (compose.message)."""
        return compose.message(self.renderer, spec)

    def _reply_to(self, ecr_id: int, contact_id: int, now: datetime) -> str:
        if not contact_id:
            return self.me.support_address
        token = tokens.issue(
            self.keys[0],
            tokens.Purpose.REPLY,
            ecr_id,
            contact_id,
            0,
            now,
            timedelta(days=self.me.reply_token_days),
        )
        local, _, domain = self.me.support_address.partition("@")
        return f"{local}+{token}@{domain}"

    def _context(
        self, h: Happened, p: plan.Planned, audience: Audience, contact_id: int, now: datetime
    ) -> dict[str, Any]:
        return {
            "ref": self.ref(h.ecr_id),
            "subject": audience.subject,
            "name": p.to.name,
            "note": h.note,
            "text": h.text,
            "author": h.author,
            "status": audience.status,
            "named_missing": h.named_missing,
            "team_name": self.me.team_name,
            "reopen_days": self.me.reopen_days,
            "size_mb": 0,
            "limit_mb": 0,
            "score_links": self._score_links(h, audience, contact_id, now)
            if p.template == "resolved"
            else [],
        }

    def _score_links(
        self, h: Happened, audience: Audience, contact_id: int, now: datetime
    ) -> list[dict[str, Any]]:
        token = tokens.issue(
            self.keys[0],
            tokens.Purpose.SCORE,
            h.ecr_id,
            contact_id,
            audience.resolution_no,
            now,
            timedelta(days=SCORE_DAYS),
        )
        base = self.me.base_url.rstrip("/")
        return [
            {"score": n, "label": label, "url": f"{base}/score/{token}?score={n}"}
            for n, label in enumerate(SCORE_LABELS, start=1)
        ]


def _references(ref: str, domain: str, thread: tuple[str, ...], cause: str) -> tuple[str, ...]:
    """A per-ECR root id, the first mail of the thread and the last few: enough to thread."""
    root = f"{ref.lower()}.root@{domain}"
    ids = [root, *thread[:1], *thread[-4:], *([cause] if cause else [])]
    return tuple(dict.fromkeys(i for i in ids if i))


def _megabytes(size: int) -> str:
    """52428800 -> "50", 62914561 -> "60", 20000 -> "0.02": what a person reads."""
    mb = size / 1048576
    return f"{mb:.2f}" if mb < 1 else f"{mb:.1f}".removesuffix(".0")
