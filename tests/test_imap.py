"""The IMAP watcher against a real Dovecot (tests/dovecot.py): no mock of imapclient or of the
server. Where a test needs to see or disturb what the watcher does on the wire, it wraps the
real client (Watching) or hooks `accept`; the server and the protocol stay real.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App, build_app
from gateway.config import ConfigError, load_settings
from gateway.inbound import imap
from gateway.model import Envelope
from gateway.oversize import TooLarge, stand_in
from gateway.store.imap import ImapState
from gateway.store.records import Accepted
from tests import dovecot
from tests.conftest import ROOT, Clock, mail, make_settings
from tests.dovecot import Dovecot

# --- fixtures -------------------------------------------------------------------------------


def _server(capability: str = "") -> Iterator[Dovecot]:
    reason = dovecot.missing()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    server = Dovecot(capability).start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def server() -> Iterator[Dovecot]:
    yield from _server()


@pytest.fixture
def plain_server() -> Iterator[Dovecot]:
    """A Dovecot that offers neither MOVE nor IDLE."""
    yield from _server(dovecot.PLAIN_CAPABILITIES)


def config(server: Dovecot, **overrides: Any) -> imap.MailboxConfig:
    return imap.parse_mailbox(server.mailbox(**overrides), server.environ)


def watcher(app: App, server: Dovecot, **overrides: Any) -> imap.ImapWatcher:
    kw = {k: overrides.pop(k) for k in list(overrides) if k in WATCHER_ARGS}
    return imap.watcher_for(app, config(server, **overrides), **kw)


WATCHER_ARGS = ("client_factory", "wake", "batch_count", "batch_bytes", "idle_renew")


class Watching:
    """A real imapclient connection that notes every FETCH and may act just before one."""

    def __init__(self, real: Any, fetches: list[tuple[tuple[int, ...], str]], hook: Any) -> None:
        self.real = real
        self.fetches = fetches
        self.hook = hook
        self.logins: list[tuple[str, str]] = []

    def fetch(self, messages: Any, data: Any, modifiers: Any = None) -> Any:
        what = " ".join(data)
        self.fetches.append((tuple(messages), what))
        if self.hook:
            self.hook(what)
        return self.real.fetch(messages, data, modifiers)

    def oauth2_login(self, user: str, access_token: str) -> Any:
        LOGINS.append((user, access_token))
        return self.real.oauth2_login(user, access_token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


LOGINS: list[tuple[str, str]] = []


def watching(
    fetches: list[tuple[tuple[int, ...], str]], hook: Callable[[str], None] | None = None
) -> imap.ClientFactory:
    return lambda *a, **kw: Watching(imap.default_client(*a, **kw), fetches, hook)


def count(app: App, sql: str, params: Sequence[Any] = ()) -> int:
    return int(app.db.value(sql, params))


def ecrs(app: App) -> int:
    app.pipeline.process_waiting()
    return count(app, "SELECT COUNT(*) FROM ecrs")


def outcomes(app: App) -> Counter[str]:
    return Counter(
        r["outcome"] or r["state"] for r in app.db.rows("SELECT outcome, state FROM inbound")
    )


def message_ids(raws: dict[int, bytes]) -> list[str]:
    out = []
    for raw in raws.values():
        head = raw.split(b"\r\n\r\n", 1)[0].decode()
        out += [ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln[:11] == "Message-ID:"]
    return out


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not within {seconds}s")
        time.sleep(0.02)
    return time.monotonic() - start


# --- configuration --------------------------------------------------------------------------

BASE = {"name": "support", "host": "imap.example.org", "username": "u", "password_env": "PW"}


def test_a_mailbox_gets_the_documented_defaults() -> None:
    c = imap.parse_mailbox(BASE, {"PW": "s3cret"})
    assert (c.port, c.security, c.folder, c.processed_folder, c.failed_folder) == (
        993,
        "tls",
        "INBOX",
        "Processed",
        "Failed",
    )
    assert (c.after, c.poll_interval, c.idle, c.unreachable_warning_seconds) == (
        "move",
        60,
        True,
        300,
    )
    assert imap.parse_mailbox({**BASE, "security": "starttls"}, {"PW": "x"}).port == 143


def test_plain_imap_to_a_remote_host_is_refused_naming_the_mailbox() -> None:
    with pytest.raises(ConfigError, match=r"'support'.*loopback"):
        imap.parse_mailbox({**BASE, "security": "none"}, {"PW": "x"})
    for host in ("127.0.0.1", "::1", "localhost"):
        assert imap.parse_mailbox({**BASE, "security": "none", "host": host}, {"PW": "x"})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"password_env": ""}, "exactly one of password_env"),
        ({"password_file": "/etc/hostname"}, "exactly one of .*not 2"),
        ({"password_env": "MISSING"}, "MISSING is not set"),
        ({"password_env": "", "password_file": "/nonexistent/pw"}, "does not exist"),
        ({"after": "archive"}, "after must be one of move, delete, keep"),
        ({"security": "ssl"}, "security must be one of"),
        ({"processed_folder": "INBOX"}, "processed_folder must be another folder"),
        ({"poll_interval": 0}, "poll_interval must be positive"),
        ({"port": "993"}, "expected int"),
        ({"idle": "yes"}, "expected bool"),
        ({"colour": "red"}, "no such setting"),
        ({"host": ""}, "host is required"),
    ],
)
def test_bad_mailbox_settings_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        imap.parse_mailbox({**BASE, **change}, {"PW": "x"})


def test_two_mailboxes_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        imap.parse_mailboxes([BASE, BASE], {"PW": "x"})


def test_the_password_never_shows_in_a_repr() -> None:
    c = imap.parse_mailbox(BASE, {"PW": "s3cret"})
    assert "s3cret" not in repr(c) and c.secret.value == "s3cret"


def test_every_mailbox_key_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k.name for k in imap.KEYS if f"`{k.name}`" not in readme]
    assert not missing, f"imap.mailboxes keys missing from README.md: {missing}"


def test_steps_keep_uid_order_and_bound_batches() -> None:
    sizes = {1: 10, 2: 10, 3: 999, 4: 10, 5: 10, 6: 10, 7: 10}
    steps = list(imap.plan_steps([1, 2, 3, 4, 5, 6, 7], sizes, {5}, 100, {7}, count=2))
    assert [(s.kind, s.uids) for s in steps] == [
        ("take", (1, 2)),
        ("oversize", (3,)),
        ("take", (4,)),
        ("known", (5,)),
        ("take", (6,)),
        ("take", (7,)),
    ]
    by_bytes = imap.plan_steps([1, 2, 4], sizes, set(), 100, nbytes=15)
    assert [s.uids for s in by_bytes] == [(1,), (2,), (4,)]


def test_the_stand_in_keeps_the_headers_and_names_the_bound() -> None:
    header = (
        b"From: Dr A <gp@practice.example>\r\nSubject: Scans\r\nContent-Type: multipart/mixed;"
        b"\r\n boundary=xyz\r\nMessage-ID: <big@practice.example>\r\nMIME-Version: 1.0\r\n\r\n"
    )
    raw = stand_in(TooLarge("imap:test", "test", 7, 3, header, 60_000_000, 52428800, "Failed"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"boundary" not in head and head.count(b"MIME-Version") == 1
    assert b"Message-ID: <big@practice.example>" in head
    assert b"Content-Type: text/plain; charset=utf-8" in head
    assert b"60000000 bytes" in body and b'folder "Failed"' in body
    cut = stand_in(TooLarge("imap:test", "test", 7, 3, header[:40], 1, 0, "Failed"))
    assert cut.startswith(b"From: Dr A <gp@practice.example>\r\nMIME-Version")  # no half line


# --- against Dovecot ------------------------------------------------------------------------


def test_appended_mails_become_ecrs_and_move_to_processed(
    server: Dovecot, app: App, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = tmp_path / "imap.pw"
    secret.write_text(dovecot.PASSWORD + "\n")
    w = watcher(app, server, password_env="", password_file=str(secret))
    bodies = [f"Secret patient detail number {i}" for i in range(3)]
    with server.other_client() as other:
        for i, body in enumerate(bodies):
            other.append(mail(subject=f"Printer {i}", body=body))
        caplog.set_level(logging.INFO)
        assert w.try_once()
        assert ecrs(app) == 3
        assert other.messages("INBOX") == {}
        assert len(other.messages("Processed")) == 3
    assert ImapState(app.db).cursor("test").last_uid == 3
    assert w.try_once() and count(app, "SELECT COUNT(*) FROM inbound") == 3
    for uid in (1, 2, 3):
        assert f"imap test uid {uid}: inbound {uid}," in caplog.text
    assert "accepted, moved to Processed" in caplog.text
    assert not any(body in caplog.text for body in bodies)  # logs never carry bodies


def test_no_mail_body_reaches_the_log_even_at_debug(
    server: Dovecot, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """imapclient sets imaplib's trace to route every line read to a debug logger; the
    watcher's client turns it off, so a DEBUG log level never shows a FETCHed body."""
    secret = "Patient Jane Roe, born 1970-01-01, results attached"
    with server.other_client() as other:
        other.append(mail(subject="Results", body=secret))
    caplog.set_level(logging.DEBUG)
    w = watcher(app, server)
    assert w.try_once()
    app.pipeline.process_waiting()
    assert ecrs(app) == 1
    assert "imapclient" in caplog.text  # debug logging was on, and imapclient used it
    assert secret not in caplog.text


def test_sizes_are_exact_for_large_mails_and_a_bound_for_small_ones(
    server: Dovecot, app: App
) -> None:
    w = watcher(app, server, batch_count=4, batch_bytes=4000)  # "small" is up to 1,000 bytes
    raws = [mail(subject="Small"), mail(subject="Large", body="x" * 3000), mail(subject="Tiny")]
    with server.other_client() as other:
        for raw in raws:
            other.append(raw)
        session = w._select()
        try:
            sizes = w._sizes(session, [1, 2, 3])
        finally:
            w.disconnect()
    assert sizes[2] == len(raws[1]) > 3000  # fetched: over the small bound
    assert sizes[1] == sizes[3] == 1000 >= max(len(raws[0]), len(raws[2]))
    steps = list(imap.plan_steps([1, 2, 3], sizes, set(), 10**6, count=4, nbytes=4000))
    assert [s.uids for s in steps] == [(1,), (2,), (3,)]  # the bytes bound still splits them


@pytest.mark.parametrize("after", ["move", "delete"])
def test_without_move_the_mail_is_copied_and_only_its_uid_expunged(
    plain_server: Dovecot, app: App, after: str
) -> None:
    w = watcher(app, plain_server, after=after)
    with plain_server.other_client() as other:
        other.append(mail(subject="Someone else's"))
        other.imap.select("INBOX")
        other.imap.store("1", "+FLAGS", "\\Deleted")  # flagged by a person: not ours to expunge
        [validity] = other.imap.response("UIDVALIDITY")[1]
        ImapState(app.db).advance("test", int(validity), 1, app.clock())  # passed long ago
        other.append(mail(subject="Ours"))
        assert w.try_once()
        assert w.session is not None and not w.session.can_move and not w.session.can_idle
        left = other.messages("INBOX")
        assert list(left) == [1]  # the other program's \Deleted mail is still there
        assert len(other.messages("Processed")) == (1 if after == "move" else 0)
    assert ecrs(app) == 1


def test_keep_leaves_the_mail_unread_and_the_cursor_stops_a_refetch(
    server: Dovecot, app: App
) -> None:
    w = watcher(app, server, after="keep")
    with server.other_client() as other:
        other.append(mail())
        assert w.try_once() and w.try_once()
        assert len(other.messages("INBOX")) == 1
        assert b"\\Seen" not in b" ".join(other.flags("INBOX"))
    assert count(app, "SELECT COUNT(*) FROM inbound") == 1 and ecrs(app) == 1


@pytest.mark.parametrize("offered", [True, False])
@pytest.mark.parametrize("after", ["move", "delete"])
def test_qresync_is_enabled_where_offered_and_accepted_mail_still_leaves(
    request: pytest.FixtureRequest, app: App, after: str, offered: bool
) -> None:
    """With QRESYNC the server reports removed UIDs as VANISHED ranges instead of EXPUNGE
    lines; either way the mail leaves the folder and each is one ECR."""
    used: Dovecot = request.getfixturevalue("server" if offered else "plain_server")
    enabled: list[tuple[str, ...]] = []

    def factory(*args: Any, **kw: Any) -> imap.Client:
        client = Watching(imap.default_client(*args, **kw), [], None)
        enable = client.real.enable

        def noted_enable(*capabilities: str) -> Any:
            enabled.append(capabilities)
            return enable(*capabilities)

        client.enable = noted_enable  # type: ignore[method-assign]
        return client

    w = watcher(app, used, after=after, client_factory=factory, batch_count=2)
    with used.other_client() as other:
        for i in range(5):
            other.append(mail(subject=f"Printer {i}"))
        assert w.try_once()
        assert other.messages("INBOX") == {}
        assert len(other.messages("Processed")) == (5 if after == "move" else 0)
    assert enabled == ([("QRESYNC",)] if offered else [])
    assert ecrs(app) == 5 and ImapState(app.db).cursor("test").last_uid == 5


def run_in_thread(
    data_dir: Path, clock: Clock, server: Dovecot, **overrides: Any
) -> tuple[threading.Thread, threading.Event]:
    """A watcher's `run` in its own thread with its own App, as `serve` runs it."""
    stop = threading.Event()

    def main() -> None:
        own = build_app(make_settings(data_dir), clock=clock)
        try:
            watcher(own, server, **overrides).run(stop)
        finally:
            own.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, stop


def inbound_rows(app: App) -> Callable[[int], bool]:
    return lambda n: count(app, "SELECT COUNT(*) FROM inbound") >= n


def test_idle_picks_up_a_new_mail_without_a_poll(
    server: Dovecot, app: App, data_dir: Path, clock: Clock
) -> None:
    thread, stop = run_in_thread(data_dir, clock, server, poll_interval=3600)
    try:
        wait_for(lambda: ImapState(app.db).cursor("test").uidvalidity is not None)
        time.sleep(0.3)  # the first pass found nothing; the watcher is idling now
        with server.other_client() as other:
            other.append(mail(subject="Arrives while idling"))
        took = wait_for(lambda: inbound_rows(app)(1), seconds=5)
        assert took < 5  # a poll would have come after an hour
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert ecrs(app) == 1
    assert "Logged out" in server.log()  # a clean LOGOUT on stop


def test_a_mail_told_of_only_in_a_passes_search_reply_is_taken_before_idling(
    server: Dovecot, app: App, data_dir: Path, clock: Clock
) -> None:
    """A mail delivered just after a pass's SELECT is missed by its SEARCH, and the EXISTS
    that tells of it comes with that reply, not during the IDLE after it."""
    selects = 0

    def factory(*args: Any, **kw: Any) -> imap.Client:
        client = Watching(imap.default_client(*args, **kw), [], None)
        select = client.real.select_folder

        def select_then_deliver(folder: str, readonly: bool = False) -> Any:
            nonlocal selects
            info = select(folder, readonly)
            selects += 1
            if selects == 1:
                with server.other_client() as other:
                    other.append(mail(subject="Right after the SELECT"))
            return info

        client.select_folder = select_then_deliver  # type: ignore[method-assign]
        return client

    thread, stop = run_in_thread(
        data_dir, clock, server, poll_interval=3600, client_factory=factory
    )
    try:
        took = wait_for(lambda: inbound_rows(app)(1), seconds=5)
        assert took < 5  # a poll would have come after an hour
    finally:
        stop.set()
        thread.join(5)
    assert ecrs(app) == 1 and selects >= 2


def test_run_reconnects_after_the_server_restarts(
    server: Dovecot, app: App, data_dir: Path, clock: Clock
) -> None:
    thread, stop = run_in_thread(data_dir, clock, server, poll_interval=3600)
    try:
        wait_for(lambda: ImapState(app.db).cursor("test").uidvalidity is not None)
        server.kill()
        time.sleep(0.5)
        server.start()
        with server.other_client() as other:
            other.append(mail(subject="After the restart"))
        wait_for(lambda: inbound_rows(app)(1), seconds=15)
    finally:
        stop.set()
        thread.join(5)
    assert ecrs(app) == 1
    assert count(app, "SELECT reconnects FROM imap_state") >= 1


@pytest.mark.parametrize("when", ["during_fetch", "after_accept"])
def test_a_connection_dropped_mid_batch_loses_and_duplicates_nothing(
    server: Dovecot, app: App, when: str
) -> None:
    with server.other_client() as other:
        for i in range(12):
            other.append(mail(subject=f"Batch mail {i}"))
    bodies_fetched = 0

    def before_fetch(what: str) -> None:
        nonlocal bodies_fetched
        if what == "BODY.PEEK[]":
            bodies_fetched += 1
            if when == "during_fetch" and bodies_fetched == 2:
                server.kill()  # the first batch is accepted, its MOVE still to come

    moved = threading.Event()

    def factory(*args: Any, **kw: Any) -> imap.Client:
        client = Watching(imap.default_client(*args, **kw), [], before_fetch)
        move = client.real.move

        def noted_move(messages: Any, folder: str) -> Any:
            result = move(messages, folder)
            moved.set()
            return result

        client.move = noted_move  # type: ignore[method-assign]
        return client

    accepted = 0

    def accept(envelopes: Sequence[Envelope]) -> list[Accepted]:
        nonlocal accepted
        result = app.pipeline.accept_many(envelopes)
        accepted += 1
        if when == "after_accept" and accepted == 2:
            assert moved.wait(10)  # the first batch's MOVE, made meanwhile, is done
            server.kill()  # the second is committed, but its MOVE and the cursor never happen
        return result

    state = ImapState(app.db)
    w = imap.ImapWatcher(
        config(server), accept, state, clock=app.clock, client_factory=factory, batch_count=5
    )
    assert not w.try_once()
    # The cursor passes a batch once it is moved, and only then.
    assert state.cursor("test").last_uid == (5 if when == "after_accept" else 0)
    server.start()
    assert w.try_once()
    assert ecrs(app) == 12
    assert outcomes(app)["duplicate"] == 5  # one batch fetched again, recorded as such
    with server.other_client() as other:
        assert other.messages("INBOX") == {}
        moved_ids = message_ids(other.messages("Processed"))
    assert len(moved_ids) == 12 and len(set(moved_ids)) == 12


def test_a_failed_acceptance_still_lets_the_batch_before_it_be_moved_and_passed(
    server: Dovecot, app: App
) -> None:
    with server.other_client() as other:
        for i in range(12):
            other.append(mail(subject=f"Batch mail {i}"))
    calls = 0

    def accept(envelopes: Sequence[Envelope]) -> list[Accepted]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        return app.pipeline.accept_many(envelopes)

    state = ImapState(app.db)
    w = imap.ImapWatcher(config(server), accept, state, clock=app.clock, batch_count=5)
    assert not w.try_once()
    assert state.cursor("test").last_uid == 5
    with server.other_client() as other:
        assert len(other.messages("Processed")) == 5
        assert len(other.messages("INBOX")) == 7  # the failed batch and the one after it
    assert w.try_once()
    assert ecrs(app) == 12 and outcomes(app)["duplicate"] == 0
    with server.other_client() as other:
        assert other.messages("INBOX") == {} and len(other.messages("Processed")) == 12


def test_a_uidvalidity_change_duplicates_nothing(server: Dovecot, app: App) -> None:
    old = [mail(subject=f"Old {i}") for i in range(3)]
    w = watcher(app, server, folder="Support")
    with server.other_client() as other:
        other.create("Support")
        for raw in old:
            other.append(raw, "Support")
        assert w.try_once() and ecrs(app) == 3
        before = state_of(app)
        other.delete("Support")
        other.create("Support")
        # The new mails take the UIDs the cursor has passed: only a re-scan finds them.
        for i in range(2):
            other.append(mail(subject=f"New {i}"), "Support")
        for raw in old:
            other.append(raw, "Support")
        assert w.try_once()
    assert state_of(app)[0] != before[0]
    assert ecrs(app) == 5
    assert outcomes(app)["duplicate"] == 3


def state_of(app: App) -> tuple[int | None, int]:
    cursor = ImapState(app.db).cursor("test")
    return cursor.uidvalidity, cursor.last_uid


def test_an_oversize_mail_is_quarantined_once_and_never_fetched(
    server: Dovecot, data_dir: Path, clock: Clock
) -> None:
    app = build_app(make_settings(data_dir, {"ECR_GATEWAY_SMTP__MAX_MESSAGE_SIZE": "20000"}), clock)
    fetches: list[tuple[tuple[int, ...], str]] = []
    w = watcher(app, server, client_factory=watching(fetches))
    big = mail(subject="Scans", attachments=[("scan.pdf", "application/pdf", b"%PDF" * 8000)])
    try:
        with server.other_client() as other:
            other.append(mail(subject="Small"))
            other.append(big)
            assert w.try_once()
            assert len(other.messages("Failed")) == 1
            other.copy_all("Failed", "INBOX")  # someone puts it back: a new UID
            assert w.try_once()
        assert ecrs(app) == 1
        rows = app.db.rows("SELECT state, outcome, reason, duplicate_of FROM inbound ORDER BY id")
        assert [r["outcome"] for r in rows] == ["created", "quarantined", "duplicate"]
        assert "over max_message_size" in rows[1]["reason"] and "20000" in rows[1]["reason"]
        assert "Failed" in rows[1]["reason"]
        told = app.db.rows("SELECT recipient, spec FROM outbox WHERE template = 'oversize'")
        assert [t["recipient"] for t in told] == ["gp@practice.example"]
        text = app.notifier.message(told[0]["spec"]).decode()
        assert "too large" in text and "0.02 MB" in text
        body_fetches = [uids for uids, what in fetches if what == "BODY.PEEK[]"]
        assert body_fetches == [(1,)]  # only the small one, ever
        assert len(ImapState(app.db).skips("test")) == 2
    finally:
        app.close()


def test_an_oversize_mail_without_a_message_id_is_quarantined_once_too(
    server: Dovecot, data_dir: Path, clock: Clock
) -> None:
    app = build_app(make_settings(data_dir, {"ECR_GATEWAY_SMTP__MAX_MESSAGE_SIZE": "20000"}), clock)
    big = (
        b"From: Dr Who <gp@practice.example>\r\nTo: support@localhost\r\n"
        b"Subject: Scans\r\n\r\n" + b"A line of a long report.\r\n" * 1200
    )
    try:
        with server.other_client() as other:
            other.append(big)
            w = watcher(app, server)
            assert w.try_once()
            other.copy_all("Failed", "INBOX")  # someone puts it back: a new UID
            assert w.try_once()
        rows = app.db.rows("SELECT outcome, reason FROM inbound ORDER BY id")
        assert [r["outcome"] for r in rows] == ["quarantined", "duplicate"]
        assert "UID 1," in rows[0]["reason"]  # the row says where the mail is
        told = app.db.rows("SELECT recipient FROM outbox WHERE template = 'oversize'")
        assert len(told) == 1
    finally:
        app.close()


def test_one_unreadable_message_never_blocks_the_rest(server: Dovecot, app: App) -> None:
    with server.other_client() as other:
        for subject in ("First", "Broken", "Third"):
            other.append(mail(subject=subject))
    maildir = server.root / "mail" / dovecot.USER
    broken = next(p for p in maildir.rglob("*,S=*") if b"Subject: Broken" in p.read_bytes())
    os.chmod(broken, 0)  # the server cannot read it: Dovecot hangs up on every FETCH of it
    w = watcher(app, server)
    for _ in range(2 * imap.FETCH_STRIKES):
        if w.try_once():
            break
    assert w.try_once()
    assert ecrs(app) == 2
    [skip] = ImapState(app.db).skips("test")
    assert skip["uid"] == 2 and "failed 3 times" in skip["reason"]
    with server.other_client() as other:
        assert other.messages("INBOX") == {}  # the broken one was moved aside, to Failed
        other.imap.select("Failed", readonly=True)
        assert other.imap.uid("SEARCH", "ALL")[1][0].split() == [b"1"]


def test_an_oversize_mail_the_server_cannot_read_never_blocks_the_rest(
    server: Dovecot, data_dir: Path, clock: Clock
) -> None:
    app = build_app(make_settings(data_dir, {"ECR_GATEWAY_SMTP__MAX_MESSAGE_SIZE": "20000"}), clock)
    try:
        with server.other_client() as other:
            other.append(mail(subject="Scans", body="x" * 30000))
            other.append(mail(subject="After"))
        maildir = server.root / "mail" / dovecot.USER
        broken = next(p for p in maildir.rglob("*,S=*") if b"Subject: Scans" in p.read_bytes())
        os.chmod(broken, 0)  # even its header block cannot be fetched
        w = watcher(app, server)
        for _ in range(2 * imap.FETCH_STRIKES):
            if w.try_once():
                break
        assert w.try_once()
        assert ecrs(app) == 1  # the mail after it
        [skip] = ImapState(app.db).skips("test")
        assert skip["uid"] == 1 and "failed 3 times" in skip["reason"]
        with server.other_client() as other:
            assert other.messages("INBOX") == {}  # moved aside, to Failed
            other.imap.select("Failed", readonly=True)
            assert other.imap.uid("SEARCH", "ALL")[1][0].split() == [b"1"]
    finally:
        app.close()


def test_connections_dropped_under_a_good_mail_do_not_set_it_aside(
    server: Dovecot, app: App
) -> None:
    with server.other_client() as other:
        for subject in ("One", "Two", "Three"):
            other.append(mail(subject=subject))
    fetches: list[tuple[tuple[int, ...], str]] = []
    drops = 0

    def before_fetch(what: str) -> None:
        nonlocal drops
        uids = fetches[-1][0]
        if what == "BODY.PEEK[]" and (len(uids) > 1 or uids == (2,)) and drops < 4:
            drops += 1
            server.kill()  # the batch's fetch once, then mail 2's alone three times

    w = watcher(app, server, client_factory=watching(fetches, before_fetch))
    for _ in range(4):
        assert not w.try_once()
        server.start()
    assert w.try_once()
    assert drops == 4 and ecrs(app) == 3
    assert ImapState(app.db).skips("test") == []
    with server.other_client() as other:
        assert other.messages("INBOX") == {} and len(other.messages("Processed")) == 3


def test_a_full_disk_of_ours_is_reported_as_ours_not_as_the_server(
    server: Dovecot, app: App, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    def accept(envelopes: Sequence[Envelope]) -> list[Accepted]:
        raise OSError(28, "No space left on device")

    w = imap.ImapWatcher(config(server), accept, ImapState(app.db), clock=app.clock)
    assert w.try_once()  # connected, nothing to take yet
    with server.other_client() as other:
        other.append(mail(subject="Waits for the disk"))
        other.append(mail(subject="Also waits"))
    caplog.set_level(logging.INFO)
    assert not w.try_once()
    [failure] = [r for r in caplog.records if "pass failed" in r.getMessage()]
    assert failure.levelno == logging.ERROR and failure.exc_info  # with its traceback
    assert "reconnecting" not in caplog.text  # not taken for a dropped connection
    [health] = ImapState(app.db).health()
    assert "LocalError" in health["last_error"] and "No space" in health["last_error"]
    clock.advance(seconds=301)
    assert not w.try_once()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "no mail taken for 301s" in warning and "unreachable" not in warning
    with server.other_client() as other:
        assert len(other.messages("INBOX")) == 2  # nothing moved that was not accepted


def test_a_full_disk_while_recording_an_oversize_mail_is_reported_as_ours(
    server: Dovecot, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    def full(mail: TooLarge) -> bool:
        raise OSError(28, "No space left on device")

    w = imap.ImapWatcher(
        config(server),
        app.pipeline.accept_many,
        ImapState(app.db),
        clock=app.clock,
        oversize=full,
        max_message_size=2000,
    )
    assert w.try_once()
    with server.other_client() as other:
        other.append(mail(subject="Scans", body="x" * 5000))
    caplog.set_level(logging.INFO)
    assert not w.try_once()
    assert "reconnecting" not in caplog.text
    [health] = ImapState(app.db).health()
    assert "LocalError" in health["last_error"]


def test_the_same_mail_through_smtp_and_imap_is_one_ecr(server: Dovecot, app: App) -> None:
    raw = mail(subject="Sent twice")
    app.pipeline.ingest(Envelope(raw, "smtp", "gp@practice.example", ("support@localhost",)))
    with server.other_client() as other:
        other.append(raw)
    assert watcher(app, server).try_once()
    assert ecrs(app) == 1
    assert outcomes(app) == Counter({"created": 1, "duplicate": 1})


def test_xoauth2_logs_in_with_the_token_the_command_prints(server: Dovecot, app: App) -> None:
    LOGINS.clear()
    w = watcher(
        app,
        server,
        username=dovecot.OAUTH_USER,
        password_env="",
        oauth2_token_command=f"echo {dovecot.OAUTH_TOKEN}",
        client_factory=watching([]),
    )
    assert w.try_once()
    assert LOGINS == [(dovecot.OAUTH_USER, dovecot.OAUTH_TOKEN)]
    assert f"user=<{dovecot.OAUTH_USER}>, method=XOAUTH2" in server.log()


@pytest.mark.parametrize("command,error", [("echo wrong", "LoginError"), ("false", "status 1")])
def test_a_bad_token_is_a_failed_login(server: Dovecot, app: App, command: str, error: str) -> None:
    w = watcher(
        app, server, username=dovecot.OAUTH_USER, password_env="", oauth2_token_command=command
    )
    assert not w.try_once()
    assert error in str(app.db.value("SELECT last_error FROM imap_state"))


def test_an_unreachable_mailbox_is_warned_about_after_the_configured_time(
    app: App, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    table = {**BASE, "host": "127.0.0.1", "port": dovecot.free_port(), "security": "none"}
    w = imap.watcher_for(app, imap.parse_mailbox(table, {"PW": "x"}))
    caplog.set_level(logging.INFO)
    assert not w.try_once()
    clock.advance(seconds=299)
    assert not w.try_once()
    assert "unreachable" not in caplog.text
    clock.advance(seconds=2)
    assert not w.try_once()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable for 301s" in warnings[0].getMessage()
    assert not w.try_once()  # not repeated until another full interval has passed
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    [health] = ImapState(app.db).health()
    assert health["reconnects"] == 4 and "ConnectionRefused" in health["last_error"]


def test_the_unreachable_warning_comes_on_time_whatever_the_backoff(
    app: App, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Attempts back off to minutes apart; the warning, given by a failed attempt, must
    still come when the outage reaches the configured time, not at the next attempt."""
    table = {**BASE, "host": "127.0.0.1", "port": dovecot.free_port(), "security": "none"}
    w = imap.watcher_for(app, imap.parse_mailbox(table, {"PW": "x"}))

    class Waits:  # run()'s waits pass on the gateway's clock, at once
        def __init__(self) -> None:
            self.waited: list[float] = []

        def is_set(self) -> bool:
            return clock() - start > timedelta(seconds=1000)

        def wait(self, timeout: float | None = None) -> bool:
            self.waited.append(timeout or 0.0)
            clock.advance(seconds=timeout or 0.0)
            return False

    start = clock()
    caplog.set_level(logging.INFO)
    w.run(Waits())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    downs = [int(m.split("unreachable for ")[1].split("s:")[0]) for m in warned]
    # At 300 s of outage, then every further 300 s (the backoff alone reaches 256 s).
    assert len(downs) >= 3
    assert all(300 * n <= d <= 300 * n + 1 for n, d in enumerate(downs[:3], 1))


def test_start_watchers_runs_one_thread_per_mailbox(server: Dovecot, data_dir: Path) -> None:
    tables = [server.mailbox(), server.mailbox(name="second", folder="Other")]
    settings = load_settings(
        None,
        {
            "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data_dir),
            "ECR_GATEWAY_IMAP__MAILBOXES": json.dumps(tables),
        },
    )
    with server.other_client() as other:
        other.create("Other")
        other.append(mail(subject="One"))
        other.append(mail(subject="Two"), "Other")
    stop, woken = threading.Event(), threading.Event()
    threads = imap.start_watchers(settings, server.environ, stop, woken.set)
    try:
        assert [t.name for t in threads] == ["imap-test", "imap-second"]
        assert woken.wait(10)
        app = build_app(settings)
        try:
            wait_for(lambda: inbound_rows(app)(2))
            assert {r["source"] for r in app.db.rows("SELECT source FROM inbound")} == {
                "imap:test",
                "imap:second",
            }
        finally:
            app.close()
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert not any(t.is_alive() for t in threads)


def test_start_watchers_refuses_a_bad_mailbox_before_starting_any(data_dir: Path) -> None:
    settings = make_settings(
        data_dir, {"ECR_GATEWAY_IMAP__MAILBOXES": '[{"name": "x", "host": "h", "username": "u"}]'}
    )
    with pytest.raises(ConfigError, match="exactly one of"):
        imap.start_watchers(settings, {}, threading.Event(), lambda: None)
