"""The values that travel between the steps of a mail's journey.

Every step takes and returns these frozen dataclasses, so a step can be tested by building its
input by hand, and no step can change what an earlier one decided.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class Status(enum.StrEnum):
    ACTIVE = "active"
    PENDING = "pending"
    RESOLVED = "resolved"
    REACTIVATED = "reactivated"


class Outcome(enum.StrEnum):
    """What became of one inbound mail; every accepted mail ends as exactly one of these."""

    CREATED = "created"
    UPDATED = "updated"
    AUTOMATIC = "automatic"
    DUPLICATE = "duplicate"
    LOOP = "loop"
    QUARANTINED = "quarantined"


class Rung(enum.StrEnum):
    """The rung of the matching ladder (PRODUCT §2.4) that decided."""

    TOKEN = "token"
    THREAD = "thread"
    SUBJECT = "subject"
    NEW = "new"


class Kind(enum.StrEnum):
    """How a mail was classified (PRODUCT §2.3)."""

    HUMAN = "human"
    AUTOMATIC = "automatic"
    BOUNCE = "bounce"
    LOOP = "loop"


@dataclass(frozen=True)
class Envelope:
    """Raw bytes as a transport received them; every transport hands over one of these."""

    raw: bytes
    source: str  # "smtp", "imap:<mailbox>", "ingest", "import", "replay"
    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()
    received_at: datetime | None = None


class Content(Protocol):
    """A large attachment's bytes, produced piece by piece each time they are asked for, so
    that they are never whole in memory."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


@dataclass(frozen=True)
class Attachment:
    filename: str  # sanitised display name; never part of a path
    content_type: str
    data: bytes  # b"" when `content` holds the bytes
    sha256: str
    content_id: str = ""  # without brackets; set for inline (cid:) parts
    inline: bool = False
    content: Content | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return self.content.size if self.content is not None else len(self.data)

    def chunks(self) -> Iterator[bytes]:
        return self.content.chunks() if self.content is not None else iter((self.data,))


@dataclass(frozen=True)
class Address:
    email: str  # case-folded addr-spec
    name: str = ""


@dataclass(frozen=True)
class Bounce:
    """What a delivery-status report says about the mail it reports on."""

    original_message_id: str  # normalised, "" when the report does not say
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedMail:
    message_id: str  # normalised: case-folded, no brackets; "" when absent
    subject: str  # decoded, CR/LF/NUL removed
    sender: Address | None  # the single From address, when there is one
    trusted: bool  # False: may create a new ECR, never update one (PRODUCT §2.2)
    untrusted_reason: str
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    delivered_to: tuple[str, ...]
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    date: datetime | None
    headers: dict[str, str]  # lower-cased names of the headers classification reads
    body: str  # the whole text body
    new_text: str  # the reply's own words, quotes and signature stripped
    attachments: tuple[Attachment, ...] = ()
    defects: tuple[str, ...] = ()
    content_type: str = "text/plain"
    report_type: str = ""
    bounce: Bounce | None = None


@dataclass(frozen=True)
class Rejection:
    """A mail over one of the parser's bounds: quarantined with the bound named."""

    bound: str
    detail: str


@dataclass(frozen=True)
class Classification:
    kind: Kind
    reason: str

    @property
    def automatic(self) -> bool:
        return self.kind in (Kind.AUTOMATIC, Kind.BOUNCE)


@dataclass(frozen=True)
class EcrView:
    """What matching and the status rules need to know of an existing ECR."""

    id: int
    ref: str
    status: Status
    resolved_at: datetime | None
    participants: frozenset[str]


@dataclass(frozen=True)
class Match:
    """Which ECR a mail belongs to, if any, and the trace of how that was decided."""

    rung: Rung
    ecr: EcrView | None  # the ECR to update; None means a new ECR
    related_to: int | None = None  # an ECR named by a rung whose sender may not update it
    named_missing: str = ""  # a reference that names no existing ECR
    trace: tuple[str, ...] = ()


class Action(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    NOTE = "note"  # automatic mail recorded on a matched ECR
    RECORD = "record"  # automatic mail recorded on no ECR
    LOOP = "loop"


@dataclass(frozen=True)
class Plan:
    """What applying one mail will do, decided purely; the store carries it out atomically."""

    action: Action
    outcome: Outcome
    reason: str
    ecr_id: int | None = None
    new_status: Status | None = None
    related_to: int | None = None
    problem_type: str = "General"
    text: str = ""  # the new text, command lines removed
    notes: tuple[str, ...] = ()
    add_participants: tuple[Address, ...] = ()
    named_missing: str = ""  # the acknowledgement says this reference names no ECR


@dataclass(frozen=True)
class Happened:
    """Something that happened to an ECR and may cause notifications (PRODUCT §3)."""

    kind: str  # created | updated | pending | reactivated | resolved | note
    ecr_id: int
    key: str  # unique per event: the outbox's (event, recipient) key is built on it
    note: str = ""
    author: str = ""
    text: str = ""
    message_id: str = ""  # the inbound mail that caused it, for threading
    named_missing: str = ""


@dataclass(frozen=True)
class Result:
    """The answer `ingest` prints and `why` explains."""

    inbound_id: int
    outcome: Outcome
    ref: str | None = None
    rung: Rung | None = None
    reason: str = ""
    happened: tuple[Happened, ...] = field(default=(), compare=False)

    def as_json(self) -> dict[str, object]:
        return {
            "inbound_id": self.inbound_id,
            "outcome": str(self.outcome),
            "ref": self.ref,
            "rung": str(self.rung) if self.rung else None,
            "reason": self.reason,
        }
