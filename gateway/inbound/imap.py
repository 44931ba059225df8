"""IMAP as a transport: the only module that imports imapclient.

Its sole purpose in life: watch one folder of one mailbox and hand every new message to
`accept` as an Envelope, and touch the message on the server (move, delete) only once it is
accepted (PRODUCT §2.1). A cursor (UIDVALIDITY, last UID) per mailbox keeps passes cheap; the
inbound dedupe key, not the cursor, is what makes a re-fetch harmless, so every failure here is
answered the same way: drop the connection, back off, fetch again.

A pass: SELECT, `UID SEARCH UID n:*`, `FETCH RFC822.SIZE`, then in UID order batches of
`BODY.PEEK[]` (PEEK: the practice's mail client still shows the mail as unread), accept;
each batch is moved while the next one is accepted, and the cursor passes it once moved. Mail
over the size limit is never fetched: its headers are, once, for the quarantined row and the
one answer to its sender (gateway/oversize.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import shlex
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from gateway.app import App, build_app
from gateway.config import ConfigError, Settings
from gateway.model import Envelope
from gateway.oversize import OversizeDesk, TooLarge
from gateway.pipeline import Clock, utcnow
from gateway.store.files import Beside
from gateway.store.imap import Cursor, ImapState
from gateway.store.records import Accepted

log = logging.getLogger(__name__)

# RFC 2177: a server may end an IDLE after 30 minutes of it; re-issue well before 29.
IDLE_RENEW = 25 * 60.0
STOP_CHECK = 1.0  # seconds between looks at the stop flag while idling
TIMEOUT = 60.0  # connect and read timeout outside IDLE
BATCH_COUNT = 500  # messages per BODY.PEEK[] fetch
BATCH_BYTES = 16 * 1024 * 1024  # and at most this much of them in memory at once
HEADER_CAP = 65536  # bytes of an oversize mail's header block we fetch for its stand-in
SEARCH_CHUNK = 1000  # UIDs per FETCH RFC822.SIZE, to bound the command line
TOKEN_TIMEOUT = 30.0
FETCH_STRIKES = 3  # fetches of one message alone the server failed before it is set aside
# or fetches of it alone that failed in any way, the connection dropping: a server that dies
# on the message holds the others back this long (with the backoff, about half a minute)
DROP_STRIKES = 5
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 300.0
WARNING_MARGIN = 0.5  # seconds past an outage's warning time that the attempt giving it comes


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    name: str
    kind: type
    default: Any
    help: str


# Every key of one [[imap.mailboxes]] table, declared once: parsing and the README use these.
KEYS = (
    Key("name", str, None, "required; names the mailbox in logs and keys its cursor"),
    Key("host", str, None, "required; the IMAP server"),
    Key("port", int, None, "993 for tls, 143 for starttls and none"),
    Key("security", str, "tls", "tls (implicit), starttls, or none (loopback hosts only)"),
    Key("username", str, None, "required; the login"),
    Key("password_env", str, "", "environment variable holding the password"),
    Key("password_file", str, "", "file holding the password (read at each login)"),
    Key(
        "oauth2_token_command",
        str,
        "",
        "command printing an OAuth2 access token (XOAUTH2; Microsoft 365, Google); run "
        "without a shell at each login",
    ),
    Key("folder", str, "INBOX", "the folder watched"),
    Key("processed_folder", str, "Processed", "where accepted mail goes (after = move)"),
    Key("failed_folder", str, "Failed", "where oversize and unfetchable mail goes"),
    Key("after", str, "move", "move / delete / keep: what happens to an accepted mail"),
    Key("poll_interval", int, 60, "seconds between passes (also under IDLE, as a safety net)"),
    Key("idle", bool, True, "use IDLE when the server offers it"),
    Key(
        "unreachable_warning_seconds",
        int,
        300,
        "warn in the log when the mailbox cannot be reached for this long",
    ),
)
SECRET_KEYS = ("password_env", "password_file", "oauth2_token_command")


@dataclass(frozen=True)
class Secret:
    """Where the login's secret comes from. A password from the environment is read once at
    start-up (like every setting); a file and a token command at each login (rotation)."""

    kind: str  # one of SECRET_KEYS
    source: str  # the variable's name, the file's path or the command: never the secret
    value: str = ""  # the password from the environment

    def __repr__(self) -> str:  # never the value: configs end up in logs and tracebacks
        return f"Secret({self.kind}={self.source!r})"


@dataclass(frozen=True)
class MailboxConfig:
    name: str
    host: str
    port: int
    security: str
    username: str
    secret: Secret
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    failed_folder: str = "Failed"
    after: str = "move"
    poll_interval: int = 60
    idle: bool = True
    unreachable_warning_seconds: int = 300

    @property
    def source(self) -> str:
        return f"imap:{self.name}"


def parse_mailboxes(
    tables: Sequence[Mapping[str, Any]], environ: Mapping[str, str]
) -> list[MailboxConfig]:
    """Every [[imap.mailboxes]] table, checked; raises ConfigError naming the mailbox."""
    configs = [parse_mailbox(t, environ, f"imap.mailboxes[{i}]") for i, t in enumerate(tables)]
    names = [c.name for c in configs]
    for name in names:
        if names.count(name) > 1:  # the name keys the cursor: two would fight over it
            raise ConfigError(f"imap.mailboxes: the name {name!r} is used twice")
    return configs


def parse_mailbox(
    table: Mapping[str, Any], environ: Mapping[str, str], where: str = "imap.mailboxes"
) -> MailboxConfig:
    values = _typed(table, where)
    if values.get("name"):
        where = f"imap.mailboxes {values['name']!r}"
    for required in ("name", "host", "username"):
        if not values.get(required):
            raise ConfigError(f"{where}: {required} is required")
    security = values.setdefault("security", "tls")
    _check_choice(where, "security", security, ("tls", "starttls", "none"))
    _check_choice(where, "after", values.get("after", "move"), ("move", "delete", "keep"))
    if security == "none" and not is_loopback(values["host"]):
        raise ConfigError(
            f"{where}: security = \"none\" would send the password in clear to "
            f"{values['host']!r}; it is allowed only to a loopback host (use tls or starttls)"
        )
    port = values.pop("port", 993 if security == "tls" else 143)
    secret = _secret(values, environ, where)
    config = MailboxConfig(
        port=port,
        secret=secret,
        **{k: v for k, v in values.items() if k not in SECRET_KEYS},
    )
    _check_numbers(config, where)
    _check_folders(config, where)
    return config


def _typed(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    keys = {k.name: k for k in KEYS}
    out = {}
    for name, value in table.items():
        if name not in keys:
            raise ConfigError(f"{where}.{name}: no such setting")
        kind = keys[name].kind
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise ConfigError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")
        out[name] = value
    return out


def _check_choice(where: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(allowed)}, not {value!r}")


def _secret(values: Mapping[str, Any], environ: Mapping[str, str], where: str) -> Secret:
    given = [k for k in SECRET_KEYS if values.get(k)]
    if len(given) != 1:
        raise ConfigError(
            f"{where}: exactly one of password_env, password_file or oauth2_token_command "
            f"is required{f', not {len(given)}' if given else ''}"
        )
    kind, source = given[0], str(values[given[0]])
    if kind == "password_env":
        if source not in environ:
            raise ConfigError(f"{where}: password_env {source} is not set in the environment")
        return Secret(kind, source, environ[source])
    if kind == "password_file" and not Path(source).is_file():
        raise ConfigError(f"{where}: password_file {source} does not exist")
    if kind == "oauth2_token_command" and not shlex.split(source):
        raise ConfigError(f"{where}: oauth2_token_command is empty")
    return Secret(kind, source)


def _check_numbers(c: MailboxConfig, where: str) -> None:
    if not 0 < c.port <= 65535:
        raise ConfigError(f"{where}: port must be a port number")
    if c.poll_interval <= 0:
        raise ConfigError(f"{where}: poll_interval must be positive")
    if c.unreachable_warning_seconds <= 0:
        raise ConfigError(f"{where}: unreachable_warning_seconds must be positive")


def _check_folders(c: MailboxConfig, where: str) -> None:
    if not c.folder:
        raise ConfigError(f"{where}: folder must not be empty")
    if c.after == "move" and c.processed_folder in ("", c.folder):
        raise ConfigError(f"{where}: processed_folder must be another folder than {c.folder}")
    if c.failed_folder in ("", c.folder):
        raise ConfigError(f"{where}: failed_folder must be another folder than {c.folder}")


def is_loopback(host: str) -> bool:
    """Literal loopback addresses and `localhost` only: a name is never resolved here, since
    what it resolves to may change after the check."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the client seam ------------------------------------------------------------------------


class Client(Protocol):
    """What we use of imapclient.IMAPClient (a test may hand in a subclass that records)."""

    def starttls(self, ssl_context: ssl.SSLContext | None = None) -> Any: ...
    def login(self, username: str, password: str) -> Any: ...
    def oauth2_login(self, user: str, access_token: str) -> Any: ...
    def capabilities(self) -> tuple[bytes, ...]: ...
    def folder_exists(self, folder: str) -> bool: ...
    def create_folder(self, folder: str) -> Any: ...
    def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]: ...
    def folder_status(self, folder: str, what: Any = None) -> dict[bytes, Any]: ...
    def search(self, criteria: Any = "ALL", charset: str | None = None) -> list[int]: ...
    def fetch(self, messages: Any, data: Any, modifiers: Any = None) -> dict[int, Any]: ...
    def move(self, messages: Any, folder: str) -> Any: ...
    def copy(self, messages: Any, folder: str) -> Any: ...
    def add_flags(self, messages: Any, flags: Any, silent: bool = False) -> Any: ...
    def uid_expunge(self, messages: Any) -> Any: ...
    def enable(self, *capabilities: str) -> Any: ...
    def idle(self) -> Any: ...
    def idle_check(self, timeout: float | None = None) -> list[Any]: ...
    def idle_done(self) -> Any: ...
    def logout(self) -> Any: ...
    def shutdown(self) -> None: ...


ClientFactory = Callable[..., Client]


def default_client(*args: Any, **kw: Any) -> Client:
    """The real thing (tests wrap it, to watch what is fetched, rather than replace it), with
    imaplib's trace off. imapclient turns it on (level 5) to route it to the
    `imapclient.imaplib` logger, so imaplib formats every line it reads, mail bodies included,
    into a debug message whether or not anything logs at DEBUG: half the CPU of a FETCH, and
    patient data one log level away from the log (PRODUCT §6). imapclient's own debug lines,
    which it truncates, are unchanged."""
    client = imapclient.IMAPClient(*args, **kw)
    connection = getattr(client, "_imap", None)  # imapclient's imaplib.IMAP4
    if connection is not None:
        connection.debug = 0
    return client  # type: ignore[no-any-return]
Accept = Callable[[Sequence[Envelope]], list[Accepted]]


class Stop(Protocol):
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class LocalError(Exception):
    """Our side failed (an OSError of the spool's disk), not the server or the connection."""


class TokenError(Exception):
    """The OAuth2 token command failed; the message says how, never what it printed."""


# Everything that means "this connection, or this login, did not work": drop it, back off.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, IMAPClientError, TokenError)


@dataclass
class Session:
    """One logged-in connection with the watched folder selected."""

    client: Client
    uidvalidity: int
    can_move: bool
    can_uid_expunge: bool
    can_idle: bool
    uidnext: int | None = None  # as the last SELECT said


@dataclass(frozen=True)
class Taken:
    """A batch accepted: (UID, size, acceptance) of each mail fetched, and the step's last
    UID, which the cursor passes once the batch is disposed of."""

    last_uid: int
    mails: tuple[tuple[int, int, Accepted], ...]


@dataclass(frozen=True)
class Step:
    """Part of a pass, in UID order: a batch to take, or one UID not to fetch."""

    kind: str  # "take" | "oversize" | "known" (decided about before)
    uids: tuple[int, ...]


def plan_steps(
    uids: Sequence[int],
    sizes: Mapping[int, int],
    known: AbstractSet[int],
    limit: int,
    alone: AbstractSet[int] = frozenset(),
    count: int = BATCH_COUNT,
    nbytes: int = BATCH_BYTES,
) -> Iterator[Step]:
    """Batches bounded by count and bytes, in UID order, so the cursor can pass each step in
    turn. An oversize or known UID is a step of its own, and so is a UID of a batch whose
    fetch failed (`alone`): that is how the one message that breaks a fetch is found."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if uid in known or size > limit or uid in alone:
            if batch:
                yield Step("take", tuple(batch))
                batch, total = [], 0
            kind = "known" if uid in known else "oversize" if size > limit else "take"
            yield Step(kind, (uid,))
            continue
        if batch and (len(batch) >= count or total + size > nbytes):
            yield Step("take", tuple(batch))
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield Step("take", tuple(batch))


# --- the watcher ----------------------------------------------------------------------------


def _nothing() -> None:
    return None


class ImapWatcher:
    def __init__(
        self,
        config: MailboxConfig,
        accept: Accept,
        state: ImapState,
        clock: Clock = utcnow,
        client_factory: ClientFactory = default_client,
        wake: Callable[[], None] = _nothing,
        oversize: Callable[[TooLarge], bool] | None = None,
        max_message_size: int = 52428800,
        batch_count: int = BATCH_COUNT,
        batch_bytes: int = BATCH_BYTES,
        idle_renew: float = IDLE_RENEW,
    ) -> None:
        self.config = config
        self.accept = accept
        self.state = state
        self.clock = clock
        self.factory = client_factory
        self.wake = wake
        self.oversize = oversize
        self.limit = max_message_size
        self.batch_count = batch_count
        self.batch_bytes = batch_bytes
        self.idle_renew = idle_renew
        self.session: Session | None = None
        self._stop: Stop = threading.Event()  # run()'s, once it runs
        self._down_since: datetime | None = None  # when the current outage began
        self._warned_at: datetime | None = None
        self._told_no_uidplus = False
        # (UIDVALIDITY, UID) of messages to fetch one by one, and failed single fetches.
        self._alone: set[tuple[int, int]] = set()
        self._failures: dict[tuple[int, int], list[bool]] = {}  # each: the connection dropped
        self._mover = Beside(f"imap-{config.name}-move")

    @property
    def name(self) -> str:
        return self.config.name

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop: Stop) -> None:
        """Passes until `stop`: IDLE between them when offered, else sleep poll_interval;
        after a failure, reconnect with exponential backoff."""
        failures = 0
        self._stop = stop
        try:
            while not stop.is_set():
                if self.try_once():
                    failures = 0
                    self._wait_for_news(stop)
                else:
                    failures += 1
                    stop.wait(self._retry_in(failures))
        finally:
            self.disconnect()
            self._mover.close()

    def try_once(self) -> bool:
        """Passes until one finds nothing new, with failures recorded and reported instead of
        raised; what `run` repeats. A connection that died while we slept or idled (a server
        restart) gets one immediate fresh try before it counts as a failure."""
        fresh = self.session is None
        try:
            self._drain()
        except Exception as exc:
            if fresh or not isinstance(exc, CONNECTION_ERRORS):
                self._failed(exc)
                return False
            log.info("imap %s: connection lost (%s); reconnecting", self.name, _safe_text(exc))
            self.disconnect()
            return self.try_once()
        self._reached()
        return True

    def _drain(self) -> None:
        while (self.poll_once() or self._arrived()) and not self._stop.is_set():
            pass

    def _arrived(self) -> bool:
        """Whether mail arrived since the last SELECT. A server may tell of it in its reply to
        that pass's SEARCH (which did not see it yet), where imapclient keeps it to itself,
        and never again: IDLE would wait for the next mail, or the next poll."""
        session = self.session
        if session is None or session.uidnext is None:
            return False
        try:
            status = session.client.folder_status(self.config.folder, ["UIDNEXT"])
        except IMAPClientError as exc:
            if isinstance(exc, IMAPClientAbortError):
                raise
            return False  # STATUS of the selected folder refused: the next poll takes it
        return int(status.get(b"UIDNEXT", 0)) > session.uidnext

    def poll_once(self) -> int:
        """One pass; returns how many messages it handled (0: nothing new). Raises on any
        failure, leaving every message it did not finish untouched on the server."""
        session = self._select()
        cursor = self._cursor(session)
        found = session.client.search(["UID", f"{cursor.last_uid + 1}:*"])
        # `UID n:*` always matches the highest UID, even when it is below n (RFC 3501 6.4.8).
        uids = sorted(u for u in found if u > cursor.last_uid)
        if not uids:
            return 0
        sizes = self._sizes(session, uids)
        known = self.state.skipped(self.name, session.uidvalidity, uids)
        alone = {u for v, u in self._alone if v == session.uidvalidity}
        steps = plan_steps(
            uids, sizes, known, self.limit, alone, self.batch_count, self.batch_bytes
        )
        behind: Taken | None = None  # accepted; moved while the next batch is accepted
        for step in steps:
            if self._stop.is_set():  # between steps: each one is finished or not begun
                break
            if step.kind == "take":
                behind = self._take(session, step.uids, behind)
                continue
            self._settle(session, behind)
            behind = None
            if step.kind == "oversize":
                self._refuse(session, step.uids[0], sizes[step.uids[0]])
            else:
                self._set_aside(session, list(step.uids))
            self.state.advance(self.name, session.uidvalidity, step.uids[-1], self.clock())
        self._settle(session, behind)
        return len(uids)

    # --- connecting ---------------------------------------------------------------------------

    def _select(self) -> Session:
        """The session with the folder (re)selected: every pass reads UIDVALIDITY afresh."""
        session = self.session or self._connect()
        info = session.client.select_folder(self.config.folder, readonly=self._read_only)
        session.uidvalidity = int(info[b"UIDVALIDITY"])
        session.uidnext = int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None
        return session

    @property
    def _read_only(self) -> bool:
        # `keep` promises to change nothing: EXAMINE lets the server hold us to it.
        return self.config.after == "keep"

    def _connect(self) -> Session:
        c = self.config
        context = ssl.create_default_context()
        client = self.factory(
            c.host,
            port=c.port,
            ssl=c.security == "tls",
            ssl_context=context if c.security == "tls" else None,
            timeout=TIMEOUT,
        )
        try:
            if c.security == "starttls":
                client.starttls(context)
            self._login(client)
            self._ensure_folders(client)
            caps = set(client.capabilities())
            if {b"ENABLE", b"QRESYNC"} <= caps:
                _enable_qresync(client)
        except BaseException:
            _close(client)
            raise
        self.session = Session(
            client,
            0,
            can_move=b"MOVE" in caps,
            can_uid_expunge=b"UIDPLUS" in caps,
            can_idle=c.idle and b"IDLE" in caps,
        )
        log.info(
            "imap %s: connected to %s:%d (%s)%s",
            self.name,
            c.host,
            c.port,
            c.security,
            "" if self.session.can_idle else f", polling every {c.poll_interval}s",
        )
        return self.session

    def _login(self, client: Client) -> None:
        secret = self.config.secret
        if secret.kind == "oauth2_token_command":
            client.oauth2_login(self.config.username, token_from(secret.source))
        elif secret.kind == "password_file":
            client.login(self.config.username, Path(secret.source).read_text().rstrip("\r\n"))
        else:
            client.login(self.config.username, secret.value)

    def _ensure_folders(self, client: Client) -> None:
        if self._read_only:
            return
        wanted = [self.config.failed_folder]
        if self.config.after == "move":
            wanted.insert(0, self.config.processed_folder)
        for folder in wanted:
            if not client.folder_exists(folder):
                try:
                    client.create_folder(folder)
                    log.info("imap %s: created folder %s", self.name, folder)
                except IMAPClientError as exc:
                    if isinstance(exc, IMAPClientAbortError):
                        raise
                    log.warning("imap %s: cannot create %s: %s", self.name, folder, exc)

    def disconnect(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            _close(session.client)

    # --- one pass's parts ----------------------------------------------------------------------

    def _cursor(self, session: Session) -> Cursor:
        cursor = self.state.cursor(self.name)
        if cursor.uidvalidity == session.uidvalidity:
            return cursor
        if cursor.uidvalidity is not None:
            # The UIDs we remember name other messages now (RFC 3501 2.3.1.1): read it all
            # again; what we had already is recorded as duplicates, nothing more.
            log.warning(
                "imap %s: UIDVALIDITY of %s changed from %d to %d; re-scanning it",
                self.name,
                self.config.folder,
                cursor.uidvalidity,
                session.uidvalidity,
            )
        self.state.advance(self.name, session.uidvalidity, 0, self.clock())
        return Cursor(session.uidvalidity, 0)

    def _sizes(self, session: Session, uids: Sequence[int]) -> dict[int, int]:
        """Each mail's size, or for a small one an upper bound. Parsing a FETCH RFC822.SIZE
        answer costs more per mail than accepting it, and most mail is small: one SEARCH
        LARGER names the mails above `small` bytes, only those are FETCHed, and the rest count
        as `small`: a batch of `batch_count` of them stays within `batch_bytes`, and none of
        them is over the size limit."""
        small = min(self.batch_bytes // self.batch_count, self.limit)  # never taken for oversize
        wanted = set(uids)
        found = session.client.search(["UID", f"{uids[0]}:*", "LARGER", str(small)])
        large = sorted(wanted.intersection(found))
        sizes = {uid: small for uid in uids}
        for start in range(0, len(large), SEARCH_CHUNK):
            fetched = session.client.fetch(large[start : start + SEARCH_CHUNK], ["RFC822.SIZE"])
            sizes |= {uid: int(data[b"RFC822.SIZE"]) for uid, data in fetched.items()}
        return sizes

    def _take(self, session: Session, uids: Sequence[int], behind: Taken | None) -> Taken:
        """Fetch and accept (durable) a batch, to be moved later. The server moves the batch
        before it (`behind`) meanwhile: the connection is free while we accept, and a MOVE
        takes the server about as long as an acceptance takes us."""
        bodies = self._bodies(session, uids)
        now = self.clock()
        envelopes = [Envelope(raw, self.config.source, received_at=now) for raw in bodies.values()]
        moving = self._mover.start(lambda: self._dispose(session, behind))
        try:
            accepted = self._accept(envelopes)
        except BaseException:
            # The connection is only ours again once the move is done; this failure, not
            # the move's, is the one to report.
            with contextlib.suppress(Exception):
                self._passed(session, behind, moving.result())
            raise
        self._passed(session, behind, moving.result())
        if accepted:
            self.wake()
        mails = zip(bodies.items(), accepted, strict=True)
        return Taken(uids[-1], tuple((uid, len(raw), a) for (uid, raw), a in mails))

    def _accept(self, envelopes: list[Envelope]) -> list[Accepted]:
        """`accept`, whose failures are ours (the spool's disk, the database): a full disk
        is no reason to reconnect and fetch again at once, and its traceback is logged."""
        if not envelopes:
            return []
        try:
            return self.accept(envelopes)
        except OSError as exc:
            raise LocalError(f"accepting {len(envelopes)} fetched mails failed: {exc}") from exc

    def _settle(self, session: Session, taken: Taken | None) -> None:
        self._passed(session, taken, self._dispose(session, taken))

    def _passed(self, session: Session, taken: Taken | None, done: str) -> None:
        """The log's line for each mail of a disposed-of batch; the cursor passes it."""
        if taken is None:
            return
        for uid, size, a in taken.mails:
            log.info(
                "imap %s uid %d: inbound %d, %d bytes, %s, %s",
                self.name,
                uid,
                a.inbound_id,
                size,
                f"duplicate of {a.duplicate_of}" if a.duplicate_of else "accepted",
                done,
            )
        self.state.advance(self.name, session.uidvalidity, taken.last_uid, self.clock())

    def _bodies(self, session: Session, uids: Sequence[int]) -> dict[int, bytes]:
        found = self._fetch(session, uids, "BODY.PEEK[]")
        bodies = {uid: data[b"BODY[]"] for uid, data in found.items() if b"BODY[]" in data}
        for uid in set(uids) - set(bodies):
            # Expunged by someone else since the SEARCH: nothing left to take.
            log.info("imap %s uid %d: gone before it was fetched", self.name, uid)
        return {uid: bytes(bodies[uid]) for uid in uids if uid in bodies}  # in UID order

    def _fetch(self, session: Session, uids: Sequence[int], item: str) -> dict[int, Any]:
        """A FETCH that may fail because of one of its messages. A failed fetch raises (the
        pass ends, the connection is dropped: servers such as Dovecot hang up on a message
        they cannot read), and leaves its messages to be fetched one by one next time; one
        that fails alone is set aside, so it never holds back the others (`_blame`)."""
        try:
            found: dict[int, Any] = session.client.fetch(list(uids), [item])
        except Exception as exc:
            self._blame(session.uidvalidity, uids, exc)
            raise
        for uid in uids:
            self._alone.discard((session.uidvalidity, uid))
            self._failures.pop((session.uidvalidity, uid), None)
        return found

    def _blame(self, uidvalidity: int, uids: Sequence[int], exc: Exception) -> None:
        """Set a message aside once the server failed FETCH_STRIKES fetches of it alone, or
        the connection dropped under DROP_STRIKES of them: a drop (EOF, a reset, a timeout)
        may be a server that dies on the message, but also a flaky link or a restart."""
        if len(uids) > 1:
            self._alone |= {(uidvalidity, u) for u in uids}
            return
        key = (uidvalidity, uids[0])
        failures = self._failures.setdefault(key, [])
        failures.append(_dropped(exc))
        refused = failures.count(False)
        if refused < FETCH_STRIKES and len(failures) < DROP_STRIKES:
            return
        # Recorded in the database: the next pass, on a new connection, sets it aside.
        reason = (
            f"fetching it failed {len(failures)} times ({refused} failed by the server): "
            f"{_safe_text(exc)}"
        )
        self.state.skip_now(self.name, uidvalidity, uids[0], reason, self.clock())
        log.warning("imap %s uid %d: %s; set aside", self.name, uids[0], reason)
        del self._failures[key]

    def _refuse(self, session: Session, uid: int, size: int) -> None:
        """Over the limit: headers only, once, for the record and the sender's answer."""
        left_in = self.config.folder if self._read_only else self.config.failed_folder
        found = self._fetch(session, [uid], f"BODY.PEEK[HEADER]<0.{HEADER_CAP}>")
        header = next(
            (bytes(v) for k, v in found.get(uid, {}).items() if k.startswith(b"BODY[HEADER]")),
            b"",
        )
        mail = TooLarge(
            self.config.source,
            self.name,
            session.uidvalidity,
            uid,
            header,
            size,
            self.limit,
            left_in,
        )
        if self.oversize is not None:
            try:
                self.oversize(mail)
            except OSError as exc:
                raise LocalError(f"recording an oversize mail failed: {exc}") from exc
        else:
            self.state.skip_now(self.name, session.uidvalidity, uid, mail.reason, self.clock())
            log.warning("imap %s uid %d: %s", self.name, uid, mail.reason)
        self._set_aside(session, [uid])

    def _set_aside(self, session: Session, uids: list[int]) -> None:
        """Mail we did not take goes to the failed folder, where a person looks."""
        if not self._read_only:
            self._move(session, uids, self.config.failed_folder)

    def _dispose(self, session: Session, taken: Taken | None) -> str:
        """What `after` says, for accepted mail; returns what was done, for the log."""
        uids = [uid for uid, _, _ in taken.mails] if taken else []
        if not uids or self.config.after == "keep":
            return "kept"
        if self.config.after == "delete":
            return "deleted" if self._delete(session, uids) else "delete failed"
        moved = self._move(session, uids, self.config.processed_folder)
        return f"moved to {self.config.processed_folder}" if moved else "move failed"

    def _move(self, session: Session, uids: list[int], folder: str) -> bool:
        """UID MOVE, or where it is missing COPY + \\Deleted + UID EXPUNGE of these UIDs only.
        A refusal (NO) is logged, not raised: the mail is accepted and the cursor passes it,
        so it merely stays where it is."""
        try:
            if session.can_move:
                session.client.move(uids, folder)
                return True
            session.client.copy(uids, folder)
        except IMAPClientError as exc:
            return self._refused(exc, f"move to {folder}")
        return self._delete(session, uids)

    def _delete(self, session: Session, uids: list[int]) -> bool:
        try:
            session.client.add_flags(uids, [imapclient.DELETED], silent=True)
            if session.can_uid_expunge:
                session.client.uid_expunge(uids)
            elif not self._told_no_uidplus:
                # A plain EXPUNGE would also remove what others flagged \Deleted: never.
                log.warning(
                    "imap %s: no UIDPLUS; our mail is left flagged \\Deleted for the server "
                    "or a mail client to expunge",
                    self.name,
                )
                self._told_no_uidplus = True
        except IMAPClientError as exc:
            return self._refused(exc, "delete")
        return True

    def _refused(self, exc: IMAPClientError, what: str) -> bool:
        if isinstance(exc, IMAPClientAbortError):
            raise exc
        log.warning("imap %s: %s refused: %s", self.name, what, _safe_text(exc))
        return False

    # --- between passes ---------------------------------------------------------------------

    def _wait_for_news(self, stop: Stop) -> None:
        session = self.session
        if session is None or not session.can_idle:
            stop.wait(self.config.poll_interval)
            return
        try:
            self._idle(session, stop, min(float(self.config.poll_interval), self.idle_renew))
        except CONNECTION_ERRORS as exc:
            log.info("imap %s: connection lost while idling: %s", self.name, _safe_text(exc))
            self.disconnect()  # the next pass reconnects at once

    def _idle(self, session: Session, stop: Stop, period: float) -> None:
        """IDLE until the server reports new mail, `period` ends, or `stop`."""
        client = session.client
        client.idle()
        deadline = time.monotonic() + period
        try:
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                wait = min(left, STOP_CHECK)
                began = time.monotonic()
                responses = client.idle_check(timeout=wait)
                if any(_is_news(r) for r in responses):
                    return
                if not responses and time.monotonic() - began < wait / 2:
                    # imapclient answers a closed connection with nothing, at once and
                    # forever: end IDLE, whose DONE then fails and reconnects.
                    return
        finally:
            client.idle_done()

    # --- health -----------------------------------------------------------------------------

    def _reached(self) -> None:
        now = self.clock()
        if self._down_since is not None:
            log.info(
                "imap %s: reachable again after %ds",
                self.name,
                (now - self._down_since).total_seconds(),
            )
        self._down_since = self._warned_at = None
        self.state.reachable(self.name, now)

    def _failed(self, exc: Exception) -> None:
        self.disconnect()
        now = self.clock()
        since = self._down_since = self._down_since or now
        text = _safe_text(exc)
        if isinstance(exc, CONNECTION_ERRORS):
            log.info("imap %s: %s", self.name, text)
        else:  # our side (the database, a bug): the traceback is for the operator
            log.exception("imap %s: pass failed", self.name)
        try:
            self.state.unreachable(self.name, text)
        except Exception:
            log.exception("imap %s: cannot record the failure", self.name)
        self._warn_if_long(now, since, text, ours=not isinstance(exc, CONNECTION_ERRORS))

    def _retry_in(self, failures: int) -> float:
        """The backoff, cut short where the outage would otherwise pass its warning's time
        with no attempt there to fail and give the warning (5 minutes late, at worst)."""
        delay = backoff(failures)
        if self._down_since is None:
            return delay
        due = (self._warned_at or self._down_since) + timedelta(
            seconds=self.config.unreachable_warning_seconds
        )
        return min(delay, max((due - self.clock()).total_seconds(), 0.0) + WARNING_MARGIN)

    def _warn_if_long(self, now: datetime, since: datetime, text: str, ours: bool) -> None:
        """A warning once the outage passes the limit, and again each further limit; one
        whose last failure was ours (`ours`: our disk, a bug) does not blame the server."""
        limit = self.config.unreachable_warning_seconds
        down = (now - since).total_seconds()
        since_warned = (now - self._warned_at).total_seconds() if self._warned_at else None
        if down >= limit and (since_warned is None or since_warned >= limit):
            c = self.config
            where = "no mail taken" if ours else f"{c.host}:{c.port} unreachable"
            log.warning("imap %s: %s for %ds: %s", self.name, where, down, text)
            self._warned_at = now


def backoff(failures: int) -> float:
    """1, 2, 4 … seconds, at most 5 minutes, with jitter so that watchers of one server
    do not all knock at once after it restarts."""
    delay: float = min(BACKOFF_FIRST * 2.0 ** max(failures - 1, 0), BACKOFF_MAX)
    return delay * random.uniform(0.8, 1.0)


def _is_news(response: Any) -> bool:
    return isinstance(response, tuple) and len(response) >= 2 and response[1] in (
        b"EXISTS",
        b"RECENT",
    )


def _dropped(exc: BaseException) -> bool:
    """The connection failed under a command (imaplib's "socket error", a reset, a timeout),
    which says nothing for or against the message it was fetching."""
    return isinstance(exc, OSError) or "socket error" in str(exc)


def _safe_text(exc: BaseException) -> str:
    """An error for the log. imaplib quotes the line it could not parse, which may be a line
    of a mail: such messages keep their type only (patient data, PRODUCT §6)."""
    text = str(exc)
    if "unexpected response" in text.lower() or "command_complete" in text.lower():
        text = "(detail withheld)"
    return f"{type(exc).__name__}: {text[:200]}"


def _enable_qresync(client: Client) -> None:
    """RFC 7162: the server then reports the UIDs a MOVE or an expunge removed as one VANISHED
    range instead of an EXPUNGE line for each, which costs the client far less to read. A
    refusal only means the lines."""
    try:
        client.enable("QRESYNC")
    except IMAPClientError as exc:
        if isinstance(exc, IMAPClientAbortError):
            raise
        log.info("imap: ENABLE QRESYNC refused: %s", _safe_text(exc))


def _close(client: Client) -> None:
    """Log out politely, or just close; a connection being dropped may already be dead."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()


def token_from(command: str) -> str:
    """The access token the configured command prints (e.g. an OAuth helper that refreshes
    it); run without a shell, so nothing in the setting is interpreted twice."""
    try:
        done = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=TOKEN_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TokenError(f"oauth2_token_command could not run: {type(exc).__name__}") from None
    if done.returncode != 0:
        raise TokenError(f"oauth2_token_command exited with status {done.returncode}")
    token = done.stdout.strip()
    if not token:
        raise TokenError("oauth2_token_command printed no token")
    return token


# --- wiring for `serve` -------------------------------------------------------------------


def watcher_for(app: App, config: MailboxConfig, **kw: Any) -> ImapWatcher:
    """A watcher on one App: its pipeline accepts, its database keeps the cursor."""
    state = ImapState(app.db)
    desk = OversizeDesk(app.pipeline, state, app.notifier, app.clock)
    return ImapWatcher(
        config,
        app.pipeline.accept_many,
        state,
        clock=app.clock,
        oversize=desk,
        max_message_size=app.settings.smtp.max_message_size,
        **kw,
    )


def start_watchers(
    settings: Settings, environ: Mapping[str, str], stop: Stop, wake: Callable[[], None]
) -> list[threading.Thread]:
    """One thread per configured mailbox, each with its own App (SQLite connections stay in
    the thread that opened them). Raises ConfigError before any thread starts."""
    configs = parse_mailboxes(settings.imap.mailboxes, environ)
    threads = []
    for config in configs:
        thread = threading.Thread(
            target=_watch,
            args=(settings, dict(environ), config, stop, wake),
            name=f"imap-{config.name}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


def _watch(
    settings: Settings,
    environ: Mapping[str, str],
    config: MailboxConfig,
    stop: Stop,
    wake: Callable[[], None],
) -> None:
    """The thread's body: a watcher on an App of its own, started again after anything that
    escapes it (the store locked at start-up, a bug), so one mailbox never stops for good."""
    failures = 0
    while not stop.is_set():
        try:
            app = build_app(settings, environ=environ)
        except Exception:
            log.exception("imap %s: cannot open the gateway's store", config.name)
        else:
            try:
                watcher_for(app, config, wake=wake).run(stop)
                return
            except Exception:
                log.exception("imap %s: watcher failed", config.name)
            finally:
                app.close()
        failures += 1
        stop.wait(backoff(failures))
