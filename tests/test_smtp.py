"""The SMTP receiver inside a real `ecr-gateway serve`, driven by a real client (smtplib)."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App, build_app
from gateway.inbound.smtp import Acceptor, SmtpPolicy
from gateway.model import Envelope as Mail
from gateway.store.files import Spool
from gateway.store.records import Accepted
from tests.conftest import mail, make_settings
from tests.serving import Served

LIMITS = {
    "ECR_GATEWAY_SMTP__MAX_MESSAGE_SIZE": "100000",
    "ECR_GATEWAY_SMTP__IDLE_TIMEOUT": "1",
    "ECR_GATEWAY_SMTP__SESSION_TIMEOUT": "3",
    "ECR_GATEWAY_SMTP__MAX_CONNECTIONS_PER_PEER": "3",
    "ECR_GATEWAY_HTTP__ENABLED": "false",
}


@pytest.fixture
def served(data_dir: Path) -> Iterator[Served]:
    s = Served(data_dir, LIMITS).start()
    yield s
    s.stop()


def client(served: Served) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", served.smtp_port, timeout=10)


def rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(data_dir / "gateway.db") as db:
        return db.execute(sql).fetchall()


def wait_for(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_mail_becomes_an_ecr_after_250(served: Served, data_dir: Path) -> None:
    with client(served) as c:
        refused = c.sendmail("gp@practice.example", ["support@localhost"], mail())
    assert refused == {}  # sendmail itself raises unless DATA got its 250
    wait_for(lambda: rows(data_dir, "SELECT outcome FROM inbound") == [("created",)])
    assert rows(data_dir, "SELECT source, mail_from, rcpt_tos FROM inbound") == [
        ("smtp", "gp@practice.example", '["support@localhost"]')
    ]
    assert rows(data_dir, "SELECT COUNT(*) FROM ecrs") == [(1,)]


def test_an_unknown_recipient_is_refused_at_rcpt(served: Served, data_dir: Path) -> None:
    with client(served) as c:
        c.ehlo()
        c.mail("x@outside.example")
        assert c.rcpt("someone@elsewhere.example")[0] == 550
        assert c.rcpt("support+anything@localhost")[0] == 250
        assert c.rcpt("lv@localhost")[0] == 250  # any address of our domain
    assert rows(data_dir, "SELECT COUNT(*) FROM inbound") == [(0,)]


def test_addresses_read_before_are_judged_by_their_own_text(
    served: Served, data_dir: Path
) -> None:
    """The receiver remembers how it read each MAIL FROM and RCPT TO argument: a repeated one
    gets the same answer, and each mail keeps its own sender."""
    with client(served) as c:
        c.ehlo()
        for _ in range(2):
            assert c.docmd("MAIL FROM:<a@b@c>")[0] == 553
            assert c.docmd("MAIL FROM:<a@[1.2>")[0] == 553  # breaks aiosmtpd's own reading
            assert c.mail("a@practice-a.example")[0] == 250
            assert c.rcpt("someone@elsewhere.example")[0] == 550
            assert c.rcpt("support@localhost")[0] == 250
            assert c.rset()[0] == 250
        for sender in ("a@practice-a.example", "b@practice-b.example", "a@practice-a.example"):
            assert c.sendmail(sender, ["support@localhost"], mail()) == {}
    wait_for(lambda: len(rows(data_dir, "SELECT id FROM inbound")) == 3)
    assert rows(data_dir, "SELECT mail_from FROM inbound ORDER BY id") == [
        ("a@practice-a.example",),
        ("b@practice-b.example",),
        ("a@practice-a.example",),
    ]


def test_oversize_with_declared_size_is_refused_at_mail(served: Served, data_dir: Path) -> None:
    with client(served) as c:
        c.ehlo()
        code, _ = c.mail("gp@practice.example", options=["SIZE=200000"])
    assert code == 552
    assert rows(data_dir, "SELECT COUNT(*) FROM inbound") == [(0,)]


def test_oversize_without_size_is_refused_after_the_data(served: Served, data_dir: Path) -> None:
    big = mail(body=("x" * 70 + "\n") * 2200)
    with client(served) as c:  # sendmail would declare SIZE=; these commands do not
        c.ehlo()
        assert c.mail("gp@practice.example")[0] == 250
        assert c.rcpt("support@localhost")[0] == 250
        code, _ = c.data(big)
    assert code == 552
    assert rows(data_dir, "SELECT COUNT(*) FROM inbound") == [(0,)]
    assert not Spool(data_dir / "spool").files()


def test_recipients_past_the_cap_get_452(served: Served) -> None:
    with client(served) as c:
        c.ehlo()
        c.mail("gp@practice.example")
        codes = [c.rcpt(f"user{n}@localhost")[0] for n in range(150)]
    assert codes[:100] == [250] * 100 and codes[100:] == [452] * 50


def test_a_silent_client_is_cut_off_at_the_idle_timeout(served: Served) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.smtp_port), timeout=10) as s:
        greeting = s.recv(1024)
        assert greeting.startswith(b"220")
        rest = _read_until_closed(s)
    assert time.monotonic() - started < 5
    assert b"421" in rest or rest == b""


def test_a_trickling_client_is_cut_off_at_the_session_deadline(
    served: Served, data_dir: Path
) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.smtp_port), timeout=10) as s:
        s.recv(1024)
        for line in (
            b"EHLO x\r\n",
            b"MAIL FROM:<gp@practice.example>\r\n",
            b"RCPT TO:<support@localhost>\r\n",
            b"DATA\r\n",
        ):
            s.sendall(line)
            time.sleep(0.1)
        closed = False
        for _ in range(100):  # a byte every 0.2 s: never idle, never done
            try:
                s.sendall(b"x")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > 8:
                break
        if not closed:
            closed = _read_until_closed(s) is not None
    assert closed and time.monotonic() - started < 8
    assert rows(data_dir, "SELECT COUNT(*) FROM inbound") == [(0,)]


def test_connections_per_peer_are_capped(served: Served) -> None:
    held = [client(served) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", served.smtp_port), timeout=5) as s:
            assert b"421" in _read_until_closed(s)
    finally:
        for c in held:
            c.close()


def test_our_own_failure_is_451_and_nothing_half_stored(served: Served, data_dir: Path) -> None:
    spool, aside = data_dir / "spool", data_dir / "spool-aside"
    spool.rename(aside)
    spool.write_text("a file where the spool should be")  # writes now fail
    try:
        with client(served) as c, pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("gp@practice.example", ["support@localhost"], mail())
        assert refused.value.smtp_code == 451
        assert rows(data_dir, "SELECT COUNT(*) FROM inbound") == [(0,)]
    finally:
        spool.unlink()
        aside.rename(spool)
    with client(served) as c:
        c.sendmail("gp@practice.example", ["support@localhost"], mail())
    wait_for(lambda: rows(data_dir, "SELECT outcome FROM inbound") == [("created",)])


def test_clients_that_hang_up_while_waiting_for_their_250_stop_no_one(
    served: Served, data_dir: Path
) -> None:
    """A session that ends while its mail is being accepted cancels its answer; the acceptor
    must go on answering the others (it died on the cancelled answer, and every later mail
    then waited for its idle timeout)."""
    for n in range(10):
        s = socket.create_connection(("127.0.0.1", served.smtp_port), timeout=10)
        s.recv(1000)
        s.sendall(
            b"EHLO p.example\r\nMAIL FROM:<gp@practice.example>\r\n"
            b"RCPT TO:<support@localhost>\r\nDATA\r\n"
        )
        s.sendall(mail(subject=f"Hung up {n}") + b".\r\n")
        s.close()  # at once: no QUIT, no waiting for the 250
    with client(served) as c:
        c.sendmail("gp@practice.example", ["support@localhost"], mail(subject="Later"))
    wait_for(lambda: ("Later",) in rows(data_dir, "SELECT subject FROM ecrs"))


def test_body_lines_sent_as_commands_never_reach_the_log(served: Served) -> None:
    """A client that sends its body although DATA was refused (no recipient was accepted)
    makes each line an unknown command, which aiosmtpd logs at warning with its first word."""
    secret = "SMITH-JOHN-19700101"
    with client(served) as c:
        c.ehlo()
        c.mail("gp@practice.example")
        assert c.rcpt("someone@elsewhere.example")[0] == 550
        c.putcmd("DATA")
        assert c.getreply()[0] == 503
        for line in (f"{secret} attended today", "NHS:943-476-5919 results"):
            c.putcmd(line)
            assert c.getreply()[0] == 500
    time.sleep(0.5)  # whatever serve logs about it is in its stderr by now
    assert not any(secret in line or "943-476" in line for line in served.lines)


def test_a_sender_address_that_is_not_utf8_is_refused_at_mail(served: Served) -> None:
    with client(served) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<gp\xff@practice.example>\r\n")
        code, _ = c.getreply()
        assert code == 553
        c.rset()
        assert c.sendmail("gp@practice.example", ["support@localhost"], mail()) == {}


def test_sigterm_stops_cleanly(data_dir: Path) -> None:
    s = Served(data_dir, LIMITS).start()
    with client(s) as c:
        c.sendmail("gp@practice.example", ["support@localhost"], mail())
    assert s.stop() == 0
    assert any("ecr-gateway stopped" in line for line in s.lines)
    assert not list((data_dir / "spool" / "tmp").iterdir())
    # Accepted is enough before the stop; the next start finishes what was left.
    assert rows(data_dir, "SELECT state FROM inbound") in ([("done",)], [("accepted",)])
    s.start()
    wait_for(lambda: rows(data_dir, "SELECT state FROM inbound") == [("done",)])
    s.stop()


def test_sigterm_lets_a_mail_under_way_finish_and_closes_idle_sessions(data_dir: Path) -> None:
    """Within the grace: a session in the middle of its data gets its 250 (then 421), one
    between mails gets 421 at once; nothing is cut that was answered."""
    s = Served(data_dir, {**LIMITS, "ECR_GATEWAY_SMTP__IDLE_TIMEOUT": "30"}).start()
    sending = socket.create_connection(("127.0.0.1", s.smtp_port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", s.smtp_port), timeout=10)
    try:
        for sock in (sending, idle):
            sock.recv(1000)
            sock.sendall(b"EHLO p.example\r\n")
            time.sleep(0.2)
            sock.recv(1000)
        raw = mail(subject="Under way")
        sending.sendall(
            b"MAIL FROM:<gp@practice.example>\r\nRCPT TO:<support@localhost>\r\nDATA\r\n"
            + raw[:100]
        )
        time.sleep(0.3)
        assert s.proc is not None
        s.proc.send_signal(signal.SIGTERM)
        assert _read_until_closed(idle).startswith(b"421")  # at once, not after the grace
        time.sleep(1.0)  # the sender is still sending
        sending.sendall(raw[100:] + b".\r\n")
        answers = _read_until_closed(sending).decode()
        assert "250 2.0.0 OK queued" in answers and answers.rstrip().endswith(
            "421 4.3.2 Service shutting down, try again later"
        )
        assert s.proc.wait(30) == 0
    finally:
        sending.close()
        idle.close()
    assert rows(data_dir, "SELECT COUNT(*) FROM inbound") == [(1,)]


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(1024):
            data += chunk
    except OSError:
        pass
    return data


def test_a_killed_serve_leaves_no_worker_behind(data_dir: Path) -> None:
    s = Served(data_dir, LIMITS).start()
    assert s.proc is not None
    children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children")
    workers = [int(p) for p in children.read_text().split()] if children.exists() else []
    assert workers, "serve runs its worker in a child process"
    s.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]]
    assert not alive, f"orphaned worker processes: {alive}"


def worker_of(s: Served) -> int:
    """The pid of serve's worker process (the one running multiprocessing's spawn_main)."""
    assert s.proc is not None
    children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
    for pid in map(int, children):
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no worker among serve's children {children}")


def test_a_worker_killed_by_the_kernel_is_replaced_and_smtp_goes_on(data_dir: Path) -> None:
    s = Served(data_dir, LIMITS).start()
    try:
        first = worker_of(s)
        os.kill(first, signal.SIGKILL)  # as the out-of-memory killer would
        with client(s) as c:  # the 250 must not wait on the dead worker
            assert c.sendmail("gp@practice.example", ["support@localhost"], mail()) == {}
        wait_for(lambda: rows(data_dir, "SELECT state FROM inbound") == [("done",)])
        assert worker_of(s) != first
        assert any("worker exited with code -9; starting another" in x for x in s.lines)
    finally:
        assert s.stop() == 0


def test_a_signal_to_the_whole_process_group_stops_serve_cleanly(data_dir: Path) -> None:
    # What a terminal's ^C and systemd's stop do: every process of the group gets the signal.
    s = Served(data_dir, LIMITS, new_group=True).start()
    assert s.proc is not None
    worker = worker_of(s)
    os.killpg(s.proc.pid, signal.SIGTERM)
    assert s.proc.wait(30) == 0, "".join(s.lines[-20:])
    assert any("ecr-gateway stopped" in line for line in s.lines)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text()


def test_a_message_that_cannot_be_stored_fails_only_its_own_session(
    app: App, data_dir: Path
) -> None:
    """The acceptor takes waiting messages as one batch; when the batch fails, each is tried
    alone, so one message that cannot be stored (here a sender that is not UTF-8, which the
    receiver refuses at MAIL) does not answer 451 to everyone it was batched with."""
    good = [Mail(mail(subject=f"Good {n}"), "smtp", "gp@practice.example") for n in range(3)]
    poison = Mail(mail(subject="Poison"), "smtp", "gp\udcff@practice.example")
    # The acceptor's pipeline is its own: an SQLite connection stays in its thread.
    acceptor = Acceptor(lambda: build_app(make_settings(data_dir)).pipeline, lambda: None)

    results = one_batch(acceptor, [*good[:2], poison, good[2]])
    assert [isinstance(r, Accepted) for r in results] == [True, True, False, True]
    assert app.db.value("SELECT COUNT(*) FROM inbound") == 3


@pytest.mark.parametrize(
    "address,ours",
    [
        ("support@localhost", True),
        ("Support+Anything@LOCALHOST", True),
        ("anyone@localhost", True),  # our domain
        ("ecr+lv@partner.example", True),  # configured with its +tag
        ("ecr+lv+x@partner.example", False),  # only the tag stripped as a whole
        ("pcs+tag@partner.example", True),
        ("victim@localho\u017ft", False),  # casefolds to localhost, lowers to itself
        ("victim@\u212aliniek.example", False),  # the Kelvin sign lowers to a k
        ("victim@kliniek.example", True),
        ("someone@elsewhere.example", False),
        ("no-at-sign", False),
    ],
)
def test_recipients_are_ours_by_domain_or_configured_address(address: str, ours: bool) -> None:
    policy = SmtpPolicy(
        domain="localhost" if "kliniek" not in address else "kliniek.example",
        own_addresses=frozenset(
            ["support@localhost", "ecr+lv@partner.example", "pcs@partner.example"]
        ),
        max_message_size=1000,
        max_recipients=10,
        max_connections_per_peer=10,
        idle_timeout=1.0,
        session_timeout=1.0,
    )
    assert policy.ours(address) is ours


def test_a_failure_of_the_store_fails_the_batch_at_once_not_once_per_message(
    data_dir: Path,
) -> None:
    """A lock held past the busy timeout fails every message alike: trying them one by one
    would wait it out once per message while every session waits behind the acceptor."""
    calls: list[int] = []

    def make_pipeline() -> Any:
        pipeline = build_app(make_settings(data_dir)).pipeline

        def locked(envelopes: Any) -> Any:
            calls.append(len(envelopes))
            raise sqlite3.OperationalError("database is locked")

        pipeline.accept_many = locked  # type: ignore[method-assign]
        return pipeline

    acceptor = Acceptor(make_pipeline, lambda: None)
    mails = [Mail(mail(subject=f"Mail {n}"), "smtp", "gp@practice.example") for n in range(4)]

    results = one_batch(acceptor, mails)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    assert calls == [4]


def one_batch(acceptor: Acceptor, mails: list[Mail]) -> list[Accepted | BaseException]:
    """The mails submitted to an acceptor not yet started, so that it takes them as one
    batch; what each submission came to."""

    async def submit_all() -> list[Accepted | BaseException]:
        waiting = [asyncio.ensure_future(acceptor.submit(m)) for m in mails]
        await asyncio.sleep(0.05)  # all of them queued before the acceptor starts
        acceptor.start()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)

    try:
        return asyncio.run(submit_all())
    finally:
        acceptor.stop()


def test_an_acceptor_that_cannot_open_the_store_answers_451_and_tries_again(
    data_dir: Path,
) -> None:
    """The store locked while serve starts: the acceptor's first open fails; it must not die
    with it (every later mail would wait forever), but fail those mails and open again."""
    opens: list[str] = []

    def make_pipeline() -> Any:
        opens.append("open")
        if len(opens) == 1:
            raise sqlite3.OperationalError("database is locked")
        return build_app(make_settings(data_dir)).pipeline

    acceptor = Acceptor(make_pipeline, lambda: None).start()

    async def two_mails() -> list[Accepted | BaseException]:
        answers: list[Accepted | BaseException] = []
        for subject in ("While locked", "Later"):
            submitted = acceptor.submit(Mail(mail(subject=subject), "smtp", "gp@p.example"))
            done = await asyncio.gather(asyncio.wait_for(submitted, 10), return_exceptions=True)
            answers += done
        return answers

    try:
        first, later = asyncio.run(two_mails())
    finally:
        acceptor.stop()
    assert isinstance(first, sqlite3.OperationalError)
    assert isinstance(later, Accepted) and len(opens) == 2
