"""A mail too large to take, seen through IMAP (PRODUCT §2.6).

Its sole purpose in life: such a mail is recorded once, explained, and its sender told once,
without its body ever being fetched. What the spool keeps is a stand-in: the mail's own header
block (so `why`, `quarantine list` and the dedupe key are the mail's own) above a plain-text
note naming the bound and where the complete mail was left. The row is born quarantined, so no
processor ever makes an ECR of the stand-in by itself; `quarantine replay` would make one whose
text is that note, which is what a person replaying it asks for.

One transaction holds the skip mark, the quarantined row and the outbox row: each of them
exists exactly when the others do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from gateway.mail import classify as classify_mod
from gateway.mail import parse as parse_mod
from gateway.model import Envelope, Kind, ParsedMail, Rejection
from gateway.notify.notifier import Notifier
from gateway.pipeline import Clock, Pipeline
from gateway.store.imap import ImapState

log = logging.getLogger(__name__)

# The MIME structure of the original describes a body we do not have; the stand-in's own
# structure replaces it.
STRUCTURE = re.compile(rb"(?i)(content-[a-z-]+|mime-version)[ \t]*:")


@dataclass(frozen=True)
class TooLarge:
    source: str  # "imap:<mailbox name>"
    mailbox: str
    uidvalidity: int
    uid: int
    header: bytes  # the header block as the server sent it, perhaps cut short
    size: int
    limit: int
    left_in: str  # the folder the complete mail is left in

    @property
    def reason(self) -> str:
        return (
            f"over max_message_size: {self.size} bytes, the limit is {self.limit} "
            f"(IMAP {self.mailbox} UID {self.uid}, not fetched, left in {self.left_in})"
        )


class OversizeDesk:
    def __init__(
        self, pipeline: Pipeline, state: ImapState, notifier: Notifier, clock: Clock
    ) -> None:
        self.pipeline = pipeline
        self.state = state
        self.notifier = notifier
        self.clock = clock

    def __call__(self, mail: TooLarge) -> bool:
        """Record, quarantine and answer once; False when this UID was handled before."""
        if self.state.skipped(mail.mailbox, mail.uidvalidity, [mail.uid]):
            return False
        raw = stand_in(mail)
        now = self.clock()
        arrival = self.pipeline.arrive(Envelope(raw, mail.source, received_at=now), sync=True)
        parsed = parse_mod.parse(raw, self.pipeline.p.limits)
        db = self.pipeline.records.db
        with db.write(durable=True):
            if not self.state.skip(mail.mailbox, mail.uidvalidity, mail.uid, mail.reason, now):
                return False
            accepted = self.pipeline.records.accept_quarantined(arrival, mail.reason)
            new = accepted.duplicate_of is None
            told = new and self._answer(parsed, arrival.dedupe_key, mail, now)
        log.warning(
            "inbound %d quarantined from %s: %s%s",
            accepted.inbound_id,
            mail.source,
            mail.reason,
            "; sender told" if told else "",
        )
        return True

    def _answer(
        self, parsed: ParsedMail | Rejection, key: str, mail: TooLarge, now: datetime
    ) -> bool:
        """The sender hears once, unless the mail was automatic or its sender unclear (an
        answer to either only feeds loops and backscatter)."""
        if not isinstance(parsed, ParsedMail) or parsed.sender is None or not parsed.trusted:
            return False
        kind = classify_mod.classify(parsed, False, self.pipeline.p.own)
        if kind.automatic or kind.kind is Kind.LOOP:
            return False
        return self.notifier.oversize(
            parsed.sender, parsed.subject, key, mail.size, mail.limit, now
        )


def stand_in(mail: TooLarge) -> bytes:
    """The original header block, its MIME structure fields removed, above our note. Nothing
    in it names the UID (the row's reason does): a mail without a Message-ID is known again
    by these bytes when it comes back under another UID (moved back, a new UIDVALIDITY)."""
    note = (
        f"The body of this mail was not fetched: it is {mail.size} bytes, over the gateway's "
        f"limit of {mail.limit} bytes (smtp.max_message_size). The complete mail is in the "
        f'folder "{mail.left_in}" of the IMAP mailbox "{mail.mailbox}".\r\n'
    )
    head = b"".join(_fields_without_structure(_header_lines(mail.header)))
    return (
        head + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + note.encode()
    )


def _header_lines(header: bytes) -> list[bytes]:
    """Complete lines up to the blank line; a block cut short loses its partial last line."""
    end = header.find(b"\r\n\r\n")
    block = header[: end + 2] if end >= 0 else header[: header.rfind(b"\n") + 1]
    return [line.rstrip(b"\r\n") + b"\r\n" for line in block.splitlines() if line.strip()]


def _fields_without_structure(lines: list[bytes]) -> list[bytes]:
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # a continuation belongs to the field above it
            if not dropping and kept:
                kept.append(line)
            continue
        dropping = bool(STRUCTURE.match(line))
        if not dropping and b":" in line:
            kept.append(line)
    return kept
