"""The journey of one mail, top to bottom: accept -> parse -> classify -> match -> apply.

Its sole purpose in life: every transport hands an Envelope to `accept`, and every accepted
row is carried to exactly one recorded outcome by `process`. A failure at any step is recorded
with the step's name; after `max_attempts` the mail is quarantined, never dropped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.mail import classify as classify_mod
from gateway.mail import large, rules
from gateway.mail import match as match_mod
from gateway.mail import parse as parse_mod
from gateway.model import (
    Attachment,
    Classification,
    Envelope,
    Kind,
    Match,
    Outcome,
    ParsedMail,
    Rejection,
    Result,
    Rung,
)
from gateway.notify.notifier import Notifier
from gateway.store.db import NotDurable, Row
from gateway.store.files import Blobs, Spool
from gateway.store.records import Accepted, Arrival, Records

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
SILENT_SOURCES = frozenset({"import"})
# Starts of processing that never recorded an ending (the process died: out of memory, a
# kill) before the mail is quarantined. Higher than gateway.max_attempts, which counts
# recorded failures: an operator's restarts must not use up a healthy mail's chances.
INTERRUPTED_LIMIT = 10
HEAD_LIMIT = 65536  # bytes searched for the Message-ID
# A Message-ID header line and its continuation lines (`.` stops at LF, keeps a CR).
MESSAGE_ID_HEADER = re.compile(rb"^message-id:(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
EARLIER_LIMIT = 100  # waiting mails an ingest finishes before its own; recovery does the rest
# Above this, `accept` parses nothing ahead: such a parse dwarfs the sync it would overlap, and
# a mail big enough to exhaust memory must be accepted (its attempts counted) before it is
# parsed, or it would end in an MTA's endless retries instead of in quarantine.
EARLY_PARSE_LIMIT = 1024 * 1024
# Attachments of an import batch under this size are stored together (one sync for all);
# larger ones are streamed one by one, never whole in memory. Kept-out bodies this small are
# held decoded already (large.HELD), so storing them together decodes nothing again.
BATCHED_ATTACHMENT = large.HELD
Parsed = Callable[[int], ParsedMail | Rejection]  # inbound id -> its mail, parsed elsewhere


@dataclass(frozen=True)
class Policies:
    """Everything the pure steps need from the settings, built once by the app."""

    limits: parse_mod.Limits
    own: classify_mod.Own
    rules: rules.Policy
    keys: list[bytes]
    reply_locals: frozenset[str]
    domain: str
    ref_prefix: str
    ref_width: int
    max_attempts: int
    max_attachment_size: int


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def dedupe_key(message_id: str, raw: bytes) -> str:
    """Normalised Message-ID when present, else the sha256 of the bytes (PRODUCT §2.1)."""
    return f"mid:{message_id}" if message_id else f"sha256:{hashlib.sha256(raw).hexdigest()}"


class Pipeline:
    def __init__(
        self,
        records: Records,
        spool: Spool,
        blobs: Blobs,
        policies: Policies,
        notifier: Notifier,
        clock: Clock = utcnow,
    ) -> None:
        self.records = records
        self.spool = spool
        self.blobs = blobs
        self.p = policies
        self.notifier = notifier
        self.clock = clock
        self._early: tuple[bytes, Callable[[], ParsedMail | Rejection]] | None = None

    # --- 1 accept ------------------------------------------------------------------------------

    def accept(self, envelope: Envelope) -> Accepted:
        """One mail, accepted by a process that goes on to process it (`ingest`), with its two
        flushes each made on a helper thread (one system call, free of the interpreter's lock
        for its whole length) beside work of its own: while the spool file is synced, the mail
        is parsed here, and `finish` takes that parse up instead of parsing again; while the
        row's commit is flushed, `finish` applies the mail, whose own commit waits for that
        flush. Only `finish`'s return (or a `settle()`) says the mail is durably accepted.

        Parsing is pure: what it finds counts only once the mail is accepted, and a parse
        that fails is an attempt's failure, recorded by `finish`."""
        if len(envelope.raw) > EARLY_PARSE_LIMIT:
            return self.accept_many([envelope])[0]
        (arrival,) = self.arrive_many([envelope])
        synced = self.spool.sync_beside([arrival.spool_name])
        parsed = _parse_now(envelope.raw, self.p.limits)
        synced.result()
        (accepted,) = self.record_arrivals([arrival], beside=True)
        self._early = (envelope.raw, parsed)
        return accepted

    def accept_many(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        """Raw bytes durably in the spool, then the rows in one durable commit; only then may a
        transport acknowledge. Several envelopes share their fsyncs and their commit."""
        return self.commit_arrivals(self.arrive_many(envelopes))

    def commit_arrivals(self, arrivals: Sequence[Arrival]) -> list[Accepted]:
        """The second half of accepting: the spool files made durable (one sync for all of
        them: a syncfs flushes file and directory entries at once, where fsyncing a lone file
        and then its directory takes two flushes), then their rows in one durable commit."""
        names = [a.spool_name for a in arrivals]
        try:
            self.spool.sync(names)
            return self.record_arrivals(arrivals)
        except BaseException:
            # Their sender is told to send again: bytes no row names are patient data kept
            # for nothing. Only when the database says so: an interruption after the commit
            # (the log's lines) leaves rows that name them.
            with contextlib.suppress(Exception):
                if not self.records.name_any(names):
                    self.spool.discard(names)
            raise

    def record_arrivals(self, arrivals: Sequence[Arrival], beside: bool = False) -> list[Accepted]:
        """Rows for arrivals whose spool files are durable, in one durable commit (whose
        flush may still be running `beside`: `Database.write`)."""
        accepted = self.records.accept(arrivals, beside)
        for a, arrival in zip(accepted, arrivals, strict=True):
            log.info(
                "inbound %d accepted from %s, %d bytes%s",
                a.inbound_id,
                arrival.source,
                arrival.size,
                f", duplicate of {a.duplicate_of}" if a.duplicate_of else "",
            )
        return accepted

    def arrive(self, envelope: Envelope, sync: bool = False) -> Arrival:
        return self.arrive_many([envelope], sync)[0]

    def arrive_many(self, envelopes: Sequence[Envelope], sync: bool = False) -> list[Arrival]:
        """The first half of accepting: the raw mails written to the spool, in one file when
        there are several. Touches files only, never the database, so transports may call it
        from any thread."""
        names = self.spool.write_many([e.raw for e in envelopes], sync=sync)
        return [self._arrival(e, name) for e, name in zip(envelopes, names, strict=True)]

    def _arrival(self, envelope: Envelope, name: str) -> Arrival:
        message_id = sniff_message_id(envelope.raw)
        return Arrival(
            dedupe_key=dedupe_key(message_id, envelope.raw),
            message_id=message_id,
            source=envelope.source,
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            received_at=envelope.received_at or self.clock(),
            size=len(envelope.raw),
            spool_name=name,
        )

    # --- 2..5 process --------------------------------------------------------------------------

    def ingest(self, envelope: Envelope) -> Result:
        return self.finish(self.accept(envelope), envelope.raw)

    def finish(self, accepted: Accepted, raw: bytes | None = None) -> Result:
        """Process an accepted mail: first any mail accepted before it and left waiting (a
        crashed ingest), so a reply never overtakes the mail it answers. `raw`, the mail as
        accepted, is parsed as it is instead of being read back from the spool (one copy of
        a large mail in memory, not two). Returns once the acceptance is durable too; raises
        `NotDurable` when it could not be made so (the sender must send again)."""
        try:
            return self._finish(accepted, raw)
        finally:
            self.records.db.settle()

    def _finish(self, accepted: Accepted, raw: bytes | None) -> Result:
        early, self._early = self._early, None
        self.process_many(self.earlier_than(accepted.inbound_id))
        if raw is None:
            return self.process(accepted.inbound_id)
        if early is not None and early[0] is raw:  # accept() parsed this very mail
            parsed = early[1]
        else:
            parsed = functools.partial(parse_mod.parse, raw, self.p.limits)
        (result,) = self.process_many([accepted.inbound_id], lambda _: parsed())
        return result

    def earlier_than(self, inbound_id: int) -> list[int]:
        return [i for i in self.records.waiting(EARLIER_LIMIT) if i < inbound_id]

    def process_waiting(
        self, batch: int = 256, stop: Callable[[], bool] = lambda: False
    ) -> list[Result]:
        """Every accepted, unprocessed row (start-up recovery, replay, the service's spool
        processor), batch by batch; `stop` is asked between batches for a clean shutdown."""
        results: list[Result] = []
        while not stop() and (ids := self.records.waiting(batch)):
            results += self.process_many(ids)
        return results

    def process_many(self, ids: Sequence[int], parsed: Parsed | None = None) -> list[Result]:
        """Rows in order; `parsed(inbound_id)` may hand over a mail parsed elsewhere (on
        another core); without it, or when it fails, the row is parsed here.

        Several such rows (an import batch) are applied in one transaction, each mail in its
        own savepoint, after their attachments are stored and their attempts counted in a
        commit of their own: a crash loses the batch's work, never an attempt's count."""
        if parsed is None:
            return [self.process(i) for i in ids]
        rows = [(i, self.records.inbound(i)) for i in ids]  # read once: _apply checks again
        if len(rows) == 1:  # one mail: nothing to share a sync or a commit with
            return self._process_rows(rows, parsed, counted=False)
        self._store_attachments_ahead(rows, parsed)
        self.records.begin_attempts([i for i, row in rows if _ready(row)])
        with self.records.db.write():
            return self._process_rows(rows, parsed, counted=True)

    def _process_rows(
        self, rows: Sequence[tuple[int, Row | None]], parsed: Parsed, counted: bool
    ) -> list[Result]:
        results = []
        for inbound_id, row in rows:
            if row is None or not _ready(row):
                results.append(self.process(inbound_id))
                continue
            if not counted:
                self.records.begin_attempt(inbound_id)
            done = self._attempt(inbound_id, row, functools.partial(parsed, inbound_id))
            results.append(done or self.process(inbound_id))
        return results

    def _store_attachments_ahead(
        self, rows: Sequence[tuple[int, Row | None]], parsed: Parsed
    ) -> None:
        """The attachments `_apply` will store for these mails, stored first, before the
        batch's transaction holds the write lock: the small ones made durable together (one
        sync for the batch instead of several per file), the large ones streamed one by one;
        `_apply` then finds them in place. A mail that failed to parse is left to its attempt."""
        small: list[tuple[str, bytes]] = []
        for inbound_id, row in rows:
            try:
                mail = parsed(inbound_id)
            except Exception:
                continue
            if row is None or row["state"] != "accepted" or not isinstance(mail, ParsedMail):
                continue
            for a in self._to_store(row, mail):
                if a.size < BATCHED_ATTACHMENT:  # held whole: one sync for the batch's files
                    # (one kept out of the parser is held since it was measured: large.HELD)
                    small.append((a.sha256, b"".join(a.chunks())))
                else:
                    _ahead(self.blobs.put_chunks, a.sha256, a.chunks())
        _ahead(self.blobs.put_many, small)

    def process(self, inbound_id: int) -> Result:
        """Attempts until an outcome is recorded; the attempt count bounds the loop."""
        while True:
            row = self.records.inbound(inbound_id)
            if row is None:
                raise LookupError(f"no inbound row {inbound_id}")
            if row["state"] != "accepted":
                return self._existing(row)
            if row["attempts"] >= INTERRUPTED_LIMIT:
                return self._interrupted(inbound_id, row["attempts"])
            self.records.begin_attempt(inbound_id)
            read = functools.partial(self._read, row["spool_path"])
            result = self._attempt(inbound_id, row, read)
            if result is not None:
                return result

    def _read(self, spool_path: str) -> ParsedMail | Rejection:
        """The raw mail from the spool, parsed; a missing or unreadable file is a failed
        attempt like any other, so it ends in quarantine instead of stopping the processor."""
        return parse_mod.parse(self.spool.read(spool_path), self.p.limits)

    def _attempt(
        self, inbound_id: int, row: Row, parse: Callable[[], ParsedMail | Rejection]
    ) -> Result | None:
        """One attempt: an outcome, or None when it failed and another attempt is due."""
        step = "parse"
        try:
            parsed = parse()
            if isinstance(parsed, Rejection):
                return self._reject(inbound_id, parsed)
            step = "apply"
            return self._apply(inbound_id, row, parsed)
        except NotDurable:
            raise  # the acceptance itself failed: not this attempt's to record
        except Exception as exc:
            return self._failed(inbound_id, step, exc)

    def _apply(self, inbound_id: int, row: Row, mail: ParsedMail) -> Result:
        """`row` is the inbound row as read before the attempt; only what never changes is
        taken from it (source, envelope), its state is read again under the write lock."""
        too_big = self._too_big(mail)
        if too_big:
            return self._reject(
                inbound_id,
                Rejection("max_attachment_size", f"an attachment of {too_big[0].size} bytes"),
            )
        kind = self._classify(row, mail)
        # Files first, outside the write lock: content-addressed, so a retry rewrites nothing.
        for a in self._to_store(row, mail, kind):
            if a.content is None:
                self.blobs.put(a.sha256, a.data)
            else:  # a large one: decoded again from the raw mail as it is written
                self.blobs.put_chunks(a.sha256, a.chunks())
        rcpts = [str(r) for r in json.loads(row["rcpt_tos"])]
        now = self.clock()
        with self.records.db.write():
            current = self.records.inbound(inbound_id)
            if current is None or current["state"] != "accepted":  # another process finished it
                return self._existing(current or row)
            found = self._match(mail, kind, rcpts, now)
            if kind.kind is Kind.BOUNCE:
                ecr_id, why = self.notifier.bounced(mail, now)
                result = self.records.record(
                    inbound_id, Outcome.AUTOMATIC, why, kind, mail, now, ecr_id
                )
            elif found is None:
                result = self.records.record(
                    inbound_id, _outcome(kind), kind.reason, kind, mail, now
                )
            else:
                plan = rules.decide(mail, kind, found, rcpts, self.p.rules, now)
                result = self.records.apply(inbound_id, mail, kind, found, plan, now)
            # Same transaction: a notification exists exactly when its cause does. Imported
            # history is recorded silently: nobody wants acknowledgements for last year's mail.
            if row["source"] not in SILENT_SOURCES:
                self.notifier.queue(result.happened, now)
        log.info(
            "inbound %d %s %s via %s: %s",
            inbound_id,
            result.outcome,
            result.ref or "-",
            result.rung or "-",
            result.reason,
        )
        return result

    def _too_big(self, mail: ParsedMail) -> list[Attachment]:
        return [a for a in mail.attachments if a.size > self.p.max_attachment_size]

    def _classify(self, row: Row, mail: ParsedMail) -> Classification:
        return classify_mod.classify(
            mail, row["source"] == "smtp" and not row["mail_from"], self.p.own
        )

    def _to_store(
        self, row: Row, mail: ParsedMail, kind: Classification | None = None
    ) -> tuple[Attachment, ...]:
        """The attachments a mail keeps: none when it is rejected for one's size, or is a
        loop or a bounce (whatever a bounce attaches is our own mail coming back)."""
        if self._too_big(mail):
            return ()
        kind = kind if kind is not None else self._classify(row, mail)
        return () if kind.kind in (Kind.LOOP, Kind.BOUNCE) else mail.attachments

    def _match(
        self, mail: ParsedMail, kind: Classification, rcpts: list[str], now: datetime
    ) -> Match | None:
        """Loops and bounces are never matched: a bounce quotes our mail, references and all."""
        if kind.kind in (Kind.LOOP, Kind.BOUNCE):
            return None
        ctx = match_mod.Context(
            self.p.keys,
            self.p.reply_locals,
            self.p.domain,
            self.p.ref_prefix,
            self.p.ref_width,
            now,
        )
        return match_mod.match(mail, rcpts, self.records, ctx)

    def _reject(self, inbound_id: int, rejection: Rejection) -> Result:
        reason = f"over {rejection.bound}: {rejection.detail}"
        self.records.quarantine(inbound_id, reason, step="parse")
        log.warning("inbound %d quarantined: %s", inbound_id, reason)
        return Result(inbound_id, Outcome.QUARANTINED, reason=reason)

    def _failed(self, inbound_id: int, step: str, exc: Exception) -> Result | None:
        row = self.records.inbound(inbound_id)
        attempts = row["attempts"] if row else self.p.max_attempts
        final = attempts >= self.p.max_attempts
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.records.fail(inbound_id, step, error, quarantine=final)
        # The exception text may quote the mail: the log gets its type only (patient data).
        log.error(
            "inbound %d failed at %s (attempt %d): %s%s",
            inbound_id,
            step,
            attempts,
            type(exc).__name__,
            ", quarantined" if final else "",
        )
        return (
            Result(inbound_id, Outcome.QUARANTINED, reason=f"failed at {step}") if final else None
        )

    def _interrupted(self, inbound_id: int, attempts: int) -> Result:
        """A mail whose attempts never recorded an ending took the process down with it (out
        of memory, a kill): it must not take every later start down too."""
        reason = f"processing was interrupted {attempts} times"
        self.records.quarantine(inbound_id, reason, step="process")
        log.warning("inbound %d quarantined: %s", inbound_id, reason)
        return Result(inbound_id, Outcome.QUARANTINED, reason=reason)

    def _existing(self, row: dict[str, object]) -> Result:
        outcome = Outcome(str(row["outcome"])) if row["outcome"] else Outcome.QUARANTINED
        ecr_id = row["ecr_id"]
        ref = self.records.ref(int(ecr_id)) if isinstance(ecr_id, int) else None
        rung = Rung(str(row["rung"])) if row["rung"] else None
        return Result(int(str(row["id"])), outcome, ref, rung, str(row["reason"] or ""))

    # --- recovery ------------------------------------------------------------------------------

    def recover(self) -> list[Result]:
        """On start: remove half-written temp files, then finish every accepted row."""
        swept = self.spool.sweep() + self.blobs.sweep()
        if swept:
            log.info("removed %d temporary files left by a crash", swept)
        return self.process_waiting()


def _parse_now(raw: bytes, limits: parse_mod.Limits) -> Callable[[], ParsedMail | Rejection]:
    """The mail parsed now, its answer (or its failure) given when called: by an attempt."""
    try:
        mail = parse_mod.parse(raw, limits)
    except Exception as exc:
        failure = exc

        def fail() -> ParsedMail:
            raise failure

        return fail
    return lambda: mail


def _ahead(store: Callable[..., None], *args: object) -> None:
    """Storing ahead is only a head start: a failure (a full disk) is met again, and
    recorded, by the attempt of the mail concerned."""
    try:
        store(*args)
    except Exception:
        log.warning("storing attachments ahead failed; each mail's attempt retries its own")


def _ready(row: Row | None) -> bool:
    """An accepted row with starts to spare: its mail may be attempted."""
    return row is not None and row["state"] == "accepted" and row["attempts"] < INTERRUPTED_LIMIT


def _outcome(kind: Classification) -> Outcome:
    return Outcome.LOOP if kind.kind is Kind.LOOP else Outcome.AUTOMATIC


def sniff_message_id(raw: bytes) -> str:
    """The normalised Message-ID from the header block, without parsing the whole mail."""
    crlf = raw.find(b"\r\n\r\n", 0, HEAD_LIMIT)
    lf = raw.find(b"\n\n", 0, HEAD_LIMIT if crlf < 0 else crlf)  # not through the body
    head = raw[: min((x for x in (crlf, lf) if x >= 0), default=HEAD_LIMIT)]
    found = MESSAGE_ID_HEADER.search(head)
    if found is None:
        return ""
    value = found.group(1).decode("latin-1")
    ids = parse_mod.message_ids([value])
    if ids:
        return ids[0]
    bare = parse_mod.normalise_id(value)
    return bare if "@" in value and not parse_mod.NOT_IN_ID.search(bare) else ""
