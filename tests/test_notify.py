"""Notifications end to end: events -> outbox -> a real aiosmtpd relay on loopback -> replies."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from email.message import EmailMessage
from email.policy import compat32
from pathlib import Path

import pytest

from gateway.app import App, build_app
from gateway.model import Status
from gateway.notify import compose
from gateway.notify.pool import MailOrFailure, RenderPool
from gateway.notify.render import SAMPLE, Renderer
from gateway.notify.sender import AHEAD, Sender
from gateway.notify.transport import Transport
from tests.conftest import ROOT, Clock, ingest, mail, make_settings, run_cli
from tests.relay import Captured, Relay

GP = "Dr A <gp@practice.example>"


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay().start()
    yield r
    r.stop()


@pytest.fixture
def napp(data_dir: Path, clock: Clock, relay: Relay) -> Iterator[App]:
    env = {
        "ECR_GATEWAY_OUTBOUND__RELAY_HOST": "127.0.0.1",
        "ECR_GATEWAY_OUTBOUND__RELAY_PORT": str(relay.port),
        "ECR_GATEWAY_OUTBOUND__SECURITY": "none",
    }
    a = build_app(make_settings(data_dir, env), clock=clock)
    yield a
    a.close()


@pytest.fixture
def sender(napp: App) -> Sender:
    return napp.sender()


def new_ecr(app: App, **kw: str) -> str:
    result = ingest(app, mail(sender=kw.pop("sender", GP), **kw))
    assert result.ref
    return str(result.ref)


def to(captured: list[Captured], address: str) -> list[EmailMessage]:
    return [c.message for c in captured if address in c.rcpt_tos]


def test_a_stop_leaves_the_rest_of_a_run_queued(napp: App, sender: Sender, relay: Relay) -> None:
    """A relay that never answers takes its timeout for each mail: on a stop, the sender
    sends no further mail of its run (they go after the restart)."""
    for n in range(3):
        new_ecr(napp, subject=f"Printer {n}")
    stop = threading.Event()
    stop.set()
    assert sender.run_once(stop=stop) == 0 and relay.captured == []
    assert sender.run_once() == 3


def test_acknowledgement_headers_and_parts(napp: App, sender: Sender, relay: Relay) -> None:
    ref = new_ecr(
        napp, cc="Practice Manager <pm@practice.example>", message_id="<first@pr.example>"
    )
    assert sender.run_once() == 2
    [ack] = to(relay.captured, "gp@practice.example")
    assert ack["From"] == "support@localhost"
    assert ack["To"] == "Dr A <gp@practice.example>"
    assert re.fullmatch(r"support\+[a-z0-9]+@localhost", ack["Reply-To"])
    assert ack["Subject"] == f"[{ref}] Printer broken"
    assert re.fullmatch(rf"<{ref.lower()}\.[0-9a-f]+\.[0-9a-f]+@localhost>", ack["Message-ID"])
    assert ack["In-Reply-To"] == "<first@pr.example>"
    assert "<first@pr.example>" in ack["References"]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["X-Auto-Response-Suppress"] == "All"
    assert ack["X-ECR-Loop"] == napp.instance_id
    assert ack["X-ECR-Reference"] == ref
    assert ack["Date"]
    assert relay.captured[0].mail_from == "bounces@localhost"
    parts = {p.get_content_type(): p.get_content() for p in ack.walk() if not p.is_multipart()}
    assert set(parts) == {"text/plain", "text/html"}
    assert ref in parts["text/plain"] and ref in parts["text/html"]
    assert "Dear Dr A" in parts["text/plain"]


@pytest.mark.parametrize(
    "how",
    ["in-reply-to only", "subject only", "reply-to address", "other participant via reply-to"],
)
def test_a_reply_to_our_mail_lands_on_the_same_ecr(
    napp: App, sender: Sender, relay: Relay, how: str
) -> None:
    ref = new_ecr(napp, cc="pm@practice.example")
    sender.run_once()
    [ack] = to(relay.captured, "gp@practice.example")
    kw: dict[str, str] = {"subject": "Something else", "sender": GP, "body": "More detail."}
    if how == "in-reply-to only":
        kw["in_reply_to"] = ack["Message-ID"]
    elif how == "subject only":
        kw["subject"] = f"RE: {ack['Subject']}"
    else:
        kw["to"] = ack["Reply-To"]
        if how.startswith("other"):
            kw["sender"] = "pm@practice.example"
    result = ingest(napp, mail(**kw), rcpt=(kw.get("to", "support@localhost"),))
    assert (result.outcome, result.ref) == ("updated", ref)
    assert result.rung == {"in-reply-to only": "thread", "subject only": "subject"}.get(
        how, "token"
    )


def test_a_stranger_writing_to_a_reply_address_gets_a_new_ecr(
    napp: App, sender: Sender, relay: Relay
) -> None:
    ref = new_ecr(napp)
    sender.run_once()
    [ack] = to(relay.captured, "gp@practice.example")
    stranger = mail(sender="x@elsewhere.example", to=ack["Reply-To"], subject="hello")
    result = ingest(napp, stranger, rcpt=(ack["Reply-To"],))
    assert result.outcome == "created" and result.ref != ref
    shown = napp.queries.ecr(napp.queries.ecr_id(str(result.ref)) or 0)
    assert shown and shown["related_to"] == ref


def test_refused_connections_then_every_mail_arrives_once(
    napp: App, sender: Sender, relay: Relay, clock: Clock
) -> None:
    relay.pause()
    for n in range(3):
        new_ecr(napp, subject=f"Problem {n}", sender=f"p{n}@practice.example")
    assert sender.run_once() == 0
    rows = napp.outbox.listing()
    assert all(r["state"] == "queued" and r["attempts"] == 1 and r["last_error"] for r in rows)
    assert sender.run_once() == 0, "a deferred row is not retried before its backoff"
    clock.advance(minutes=5)
    relay.resume()
    assert sender.run_once() == 3
    clock.advance(hours=1)
    assert sender.run_once() == 0
    ids = [c.message["Message-ID"] for c in relay.captured]
    assert len(ids) == 3 == len(set(ids))


def test_a_5xx_fails_at_once_with_a_note_and_no_retry(
    napp: App, sender: Sender, relay: Relay, clock: Clock
) -> None:
    relay.handler.answer = "550 5.1.1 no such user"
    ref = new_ecr(napp)
    assert sender.run_once() == 0
    [row] = napp.outbox.listing()
    assert row["state"] == "failed" and "550" in row["last_error"]
    clock.advance(days=1)
    sender.run_once()
    [row] = napp.outbox.listing()
    assert row["attempts"] == 1
    events = napp.queries.ecr(napp.queries.ecr_id(ref) or 0)["events"]  # type: ignore[index]
    assert any(e["kind"] == "note" and "failed" in e["note"] for e in events)


def test_retry_after_giving_up_on_4xx(
    napp: App, sender: Sender, relay: Relay, clock: Clock
) -> None:
    relay.handler.answer = "451 4.3.0 try later"
    new_ecr(napp)
    sender.run_once()
    clock.advance(hours=73)
    sender.run_once()
    [row] = napp.outbox.listing()
    assert row["state"] == "failed" and "gave up" in row["last_error"]
    relay.handler.answer = "250 OK"
    assert napp.outbox.retry_now(row["id"], clock.now)
    assert sender.run_once() == 1


CRASHING_SENDER = """
import os, signal
from gateway.app import build_app
from gateway.config import load_settings
from gateway.notify.transport import SmtpRelay, RelayConfig
from gateway.notify.sender import AHEAD, Sender

class DieAfterSends(SmtpRelay):
    sends = 0

    def send(self, *args):
        super().send(*args)
        self.sends += 1
        if self.sends == {die_after}:
            os.kill(os.getpid(), signal.SIGKILL)

settings = load_settings(None, {{"ECR_GATEWAY_GATEWAY__DATA_DIR": {data_dir!r}}})
app = build_app(settings)
relay = DieAfterSends(RelayConfig("127.0.0.1", {port}, "none"))
Sender(app.outbox, relay, app.clock, 72, app.notifier.message, batch_size={batch_size}).run_once()
"""


def crash_while_sending(data_dir: Path, relay: Relay, die_after: int, batch_size: int) -> None:
    """A child sends through the real relay and is killed right after its `die_after`-th mail
    was accepted, before it can mark that mail sent."""
    script = CRASHING_SENDER.format(
        data_dir=str(data_dir), port=relay.port, die_after=die_after, batch_size=batch_size
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert child.returncode == -9, child.stderr.decode()


def relay_app(data_dir: Path, relay: Relay) -> App:
    settings = make_settings(
        data_dir,
        {
            "ECR_GATEWAY_OUTBOUND__RELAY_HOST": "127.0.0.1",
            "ECR_GATEWAY_OUTBOUND__RELAY_PORT": str(relay.port),
            "ECR_GATEWAY_OUTBOUND__SECURITY": "none",
        },
    )
    return build_app(settings)


def test_a_crash_after_the_relay_accepted_sends_at_most_one_duplicate(
    napp: App, relay: Relay, data_dir: Path
) -> None:
    new_ecr(napp)
    napp.close()
    crash_while_sending(data_dir, relay, die_after=1, batch_size=50)
    assert len(relay.captured) == 1
    again = relay_app(data_dir, relay)
    assert again.sender().run_once() == 1
    assert again.sender().run_once() == 0
    first, resent = relay.captured
    assert first.message["Message-ID"] == resent.message["Message-ID"]
    assert first.data == resent.data, "a resend is the same mail, byte for byte"
    again.close()


def test_a_crash_in_the_middle_of_a_batch_resends_only_the_mail_in_flight(
    napp: App, relay: Relay, data_dir: Path
) -> None:
    for n in range(5):
        new_ecr(napp, subject=f"Problem {n}", sender=f"p{n}@practice.example")
    napp.close()
    # Batches of 3 rendered together; the crash comes after the relay took mail 2 of batch 2.
    crash_while_sending(data_dir, relay, die_after=5, batch_size=3)
    again = relay_app(data_dir, relay)
    assert [r["state"] for r in again.outbox.listing()[::-1]] == ["sent"] * 4 + ["queued"]
    assert again.sender().run_once() == 1
    ids = [c.message["Message-ID"] for c in relay.captured]
    assert len(ids) == 6 and len(set(ids)) == 5, "only the unmarked mail goes twice"
    assert all(r["state"] == "sent" and r["attempts"] == 1 for r in again.outbox.listing())
    again.close()


class BreaksOnThirdMail:
    """A transport with a bug our sender does not know: the third mail raises."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.sends = 0

    def send(self, envelope_from: str, recipient: str, raw: bytes) -> None:
        self.sends += 1
        if self.sends == 3:
            raise RuntimeError("unexpected")
        self.inner.send(envelope_from, recipient, raw)

    def close(self) -> None:
        self.inner.close()


def test_an_unexpected_error_still_marks_what_the_relay_accepted(
    napp: App, sender: Sender, relay: Relay
) -> None:
    for n in range(4):
        new_ecr(napp, subject=f"Problem {n}", sender=f"p{n}@practice.example")
    sender.transport = BreaksOnThirdMail(sender.transport)
    with pytest.raises(RuntimeError):
        sender.run_once()
    assert len(relay.captured) == 2
    states = [r["state"] for r in napp.outbox.listing()[::-1]]
    assert states == ["sent", "sent", "queued", "queued"]
    assert sender.run_once() == 2 and len(relay.captured) == 4


def auto_reply(original: EmailMessage, headers: bool) -> bytes:
    """What a misbehaving peer answers; with headers=False it also drops every reference."""
    extra = {"Auto-Submitted": "auto-replied"} if headers else {}
    subject = f"Automatic reply: {original['Subject']}" if headers else "Your message"
    return mail(
        subject=subject,
        body="I am away.",
        sender=str(original["To"]),
        in_reply_to=str(original["Message-ID"]) if headers else "",
        headers=extra,
    )


@pytest.mark.parametrize("headers", [True, False], ids=["auto-reply headers", "no headers"])
def test_an_auto_responder_cannot_start_a_mail_storm(
    napp: App, sender: Sender, relay: Relay, headers: bool
) -> None:
    new_ecr(napp)
    rounds_with_mail = []
    for n in range(50):
        before = len(relay.captured)
        sender.run_once()
        fresh = relay.captured[before:]
        if fresh:
            rounds_with_mail.append(n)
        for c in fresh:
            ingest(napp, auto_reply(c.message, headers))
    if headers:
        assert rounds_with_mail == [0], "the exchange must stop after our first mail"
    else:
        assert len(relay.captured) <= 5, "the acknowledgement rate limit must stop it"
        assert max(rounds_with_mail) < 6


def dsn(original: EmailMessage, recipient: str) -> bytes:
    return textwrap.dedent(f"""\
        From: Mail Delivery System <MAILER-DAEMON@relay.example>
        To: bounces@localhost
        Subject: Undelivered Mail Returned to Sender: {original["Subject"]}
        Message-ID: <dsn-{abs(hash(original["Message-ID"]))}@relay.example>
        Auto-Submitted: auto-replied
        MIME-Version: 1.0
        Content-Type: multipart/report; report-type=delivery-status; boundary="B"

        --B
        Content-Type: text/plain

        The mail could not be delivered.

        --B
        Content-Type: message/delivery-status

        Reporting-MTA: dns; relay.example

        Final-Recipient: rfc822; {recipient}
        Action: failed
        Status: 5.1.1

        --B
        Content-Type: text/rfc822-headers

        Message-ID: {original["Message-ID"]}
        Subject: {original["Subject"]}

        --B--
        """).encode()


def test_a_bounce_marks_the_address_undeliverable_until_cleared(
    napp: App, sender: Sender, relay: Relay, data_dir: Path
) -> None:
    ref = new_ecr(napp, cc="pm@practice.example")
    sender.run_once()
    [ack] = to(relay.captured, "gp@practice.example")
    result = ingest(napp, dsn(ack, "gp@practice.example"), rcpt=("bounces@localhost",))
    assert (result.outcome, result.ref) == ("automatic", ref)
    ecr_id = napp.queries.ecr_id(ref) or 0
    napp.staff.set_status(ecr_id, Status.PENDING, "Which printer?", "staff:cli")
    sender.run_once()
    pending = [
        c.rcpt_tos
        for c in relay.captured
        if "pending" in c.message["Subject"].lower()
        or c.message.get_body(("plain",)).get_content().find("need") >= 0
    ]  # type: ignore[union-attr]
    assert ["gp@practice.example"] not in pending and ["pm@practice.example"] in pending
    events = napp.queries.ecr(ecr_id)["events"]  # type: ignore[index]
    assert any("undeliverable" in e["note"] for e in events)
    cleared = run_cli(data_dir, "contact", "clear-bounce", "gp@practice.example")
    assert cleared.returncode == 0, cleared.stderr
    napp.staff.set_status(ecr_id, Status.RESOLVED, "Replaced the toner", "staff:cli")
    sender.run_once()
    assert to(relay.captured, "gp@practice.example")[-1]["X-ECR-Reference"] == ref
    assert len(to(relay.captured, "gp@practice.example")) == 2


def test_a_forged_bounce_for_a_message_we_never_sent_changes_nothing(napp: App) -> None:
    new_ecr(napp)
    fake = EmailMessage()
    fake["Message-ID"] = "<not-ours@elsewhere.example>"
    fake["Subject"] = "x"
    result = ingest(napp, dsn(fake, "gp@practice.example"))
    assert result.outcome == "automatic" and result.ref is None
    assert not napp.outbox.undeliverable("gp@practice.example")


def test_resolution_mail_carries_five_signed_score_links(
    napp: App, sender: Sender, relay: Relay
) -> None:
    ref = new_ecr(napp)
    napp.staff.set_status(napp.queries.ecr_id(ref) or 0, Status.RESOLVED, "Fixed", "staff:cli")
    sender.run_once()
    resolved = to(relay.captured, "gp@practice.example")[-1]
    text = resolved.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    links = re.findall(r"http://127\.0\.0\.1:8080/score/([a-z0-9]+)\?score=([1-5])", text)
    assert [n for _, n in links] == ["1", "2", "3", "4", "5"]
    assert len({t for t, _ in links}) == 1
    from gateway.mail import tokens

    token = tokens.verify(napp.keys, links[0][0], tokens.Purpose.SCORE, napp.clock())
    assert token.counter == 1 and token.ecr_id == napp.queries.ecr_id(ref)
    with pytest.raises(tokens.TokenError):
        tokens.verify(napp.keys, links[0][0], tokens.Purpose.REPLY, napp.clock())


def test_a_note_holding_our_mime_boundary_cannot_split_the_mail(
    napp: App, sender: Sender, relay: Relay
) -> None:
    ref = new_ecr(napp)
    note = f"--{compose.BOUNDARY}--"  # our closing boundary, on a line of its own
    napp.staff.set_status(napp.queries.ecr_id(ref) or 0, Status.PENDING, note, "staff:cli")
    sender.run_once()
    pending = to(relay.captured, "gp@practice.example")[-1]
    parts = [p for p in pending.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert note in parts[0].get_content() and note in parts[1].get_content()


@pytest.mark.parametrize("words", ["Printer broken", "Drucker für die Praxis"])
def test_long_subjects_are_folded_within_78_characters(
    napp: App, sender: Sender, relay: Relay, words: str
) -> None:
    ref = new_ecr(napp, subject=" ".join([words] * 12))
    sender.run_once()
    head = relay.captured[0].data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert max(len(line) for line in head) <= 78
    subject = str(relay.captured[0].message["Subject"])
    assert subject.startswith(f"[{ref}] {words} {words}") and len(subject) <= 200


@pytest.mark.parametrize(
    "value",
    [
        "Dr A <gp@practice.example>",
        "  spaced  out ; with, separators = ?",
        "x" * 67,  # "Subject: " + 67 = 76: fits
        "x" * 70,  # 79: must be left to the library's folding
        "<a@b.example> " * 8,
        "tab\there",
    ],
)
def test_our_header_lines_are_the_email_librarys(value: str) -> None:
    """Writing a line that fits as it is must give what compat32's folding gives."""
    assert compose._WIRE.fold_binary("Subject", value) == compat32.clone(
        linesep="\r\n"
    ).fold_binary("Subject", value)


def test_templates_are_read_once_per_start(tmp_path: Path) -> None:
    """What the start-up check rendered is what mails use: an edit needs a restart (and its
    check), and no mail pays for looking at the template files."""
    folder = tmp_path / "tpl" / "mail"
    folder.mkdir(parents=True)
    created = folder / "created.txt"
    created.write_text("First version: {{ ref }}\n")
    renderer = Renderer(tmp_path / "tpl")
    renderer.check()
    created.write_text("{% if %}broken")
    later = created.stat().st_mtime + 10
    os.utime(created, (later, later))
    assert renderer.render("created", SAMPLE).text == "First version: ECR-000001\n"


HOSTILE = [
    ("=?utf-8?Q?Help=0D=0ABcc:_x@evil?=", "gp@practice.example", "Dr A"),
    ("Printer", "gp@practice.example", "<img src=x onerror=alert(1)>"),
    ("x" * 2000, "gp@practice.example", "Dr A"),
    ("Drucker", "dr.müller@praxis.example", "Dr Müller"),
]


@pytest.mark.parametrize(
    "subject,address,name",
    HOSTILE,
    ids=["crlf subject", "script name", "long subject", "unicode address"],
)
def test_hostile_values_never_break_our_mails(
    napp: App, sender: Sender, relay: Relay, subject: str, address: str, name: str
) -> None:
    raw = (
        f'From: "{name}" <{address}>\r\nTo: support@localhost\r\nSubject: {subject}\r\n'
        "Message-ID: <h@x.example>\r\n\r\nhelp\r\n"
    ).encode()
    assert ingest(napp, raw).outcome == "created"
    assert sender.run_once() == 1
    data = relay.captured[0].data
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    names = [line.split(b":", 1)[0].lower() for line in head if line[:1] not in (b" ", b"\t")]
    assert b"bcc" not in names and len(names) == len(set(names))
    assert all(re.fullmatch(rb"[A-Za-z0-9-]+", n) for n in names)
    message = relay.captured[0].message
    assert "\n" not in str(message["Subject"]) and len(str(message["Subject"])) <= 200
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<img src=x" not in html and "<script" not in html


def test_a_broken_template_override_stops_serve_with_one_line(
    tmp_path: Path, data_dir: Path
) -> None:
    folder = tmp_path / "tpl" / "mail"
    folder.mkdir(parents=True)
    (folder / "pending.txt").write_text("{% if %}broken")
    done = run_cli(data_dir, "serve", env={"ECR_GATEWAY_TEMPLATES__FOLDER": str(tmp_path / "tpl")})
    err = done.stderr.decode().strip()
    assert done.returncode != 0
    assert "pending.txt" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_an_override_replaces_one_template_file(
    tmp_path: Path, data_dir: Path, clock: Clock
) -> None:
    folder = tmp_path / "tpl" / "mail"
    folder.mkdir(parents=True)
    (folder / "created.txt").write_text("Hello from our desk: {{ ref }}\n")
    settings = make_settings(data_dir, {"ECR_GATEWAY_TEMPLATES__FOLDER": str(tmp_path / "tpl")})
    app = build_app(settings, clock=clock)
    app.renderer.check()
    ingest(app, mail())
    app.sender().run_once()
    sent = list((data_dir / "sent" / "new").iterdir())
    assert len(sent) == 1
    body = sent[0].read_bytes()
    assert b"Hello from our desk: ECR-000001" in body
    assert b"Thank you for your mail" in body  # the HTML part is still ours
    app.close()


def test_imported_history_sends_no_mail(
    napp: App, sender: Sender, relay: Relay, tmp_path: Path
) -> None:
    from gateway.inbound import files

    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "a.eml").write_bytes(mail(subject="Old problem"))
    outcomes = files.run_import(napp.pipeline, folder, lambda n: None, workers=1)
    assert outcomes["created"] == 1
    assert sender.run_once() == 0 and relay.captured == []


# --- rendering in a process of its own -------------------------------------------------------


class CountingPool(RenderPool):
    """Our pool, counting the mails it was asked to render."""

    rendered = 0

    def render(self, specs: list[str]) -> Future[list[MailOrFailure]]:
        self.rendered += len(specs)
        return super().render(specs)


@pytest.fixture
def pool() -> Iterator[CountingPool]:
    p = CountingPool(None)
    yield p
    p.close()


def acknowledgements(app: App, n: int) -> list[dict[str, str]]:
    for k in range(n):
        new_ecr(app, subject=f"Problem {k}", sender=f"p{k}@practice.example")
    return app.db.rows("SELECT id, message_id, spec FROM outbox ORDER BY id")


def test_a_burst_rendered_in_the_pool_arrives_once_each_as_rendered_here(
    napp: App, relay: Relay, pool: CountingPool
) -> None:
    rows = acknowledgements(napp, 7)
    sender = napp.sender(pool)
    sender.batch_size, sender.first_rows = 1, 2  # two rendered here; five batches there,
    assert AHEAD < 5  # more than it holds at a time
    assert sender.run_once() == 7
    assert sender.run_once() == 0
    assert pool.rendered == 5
    got = {str(c.message["Message-ID"]).strip("<>"): c.data for c in relay.captured}
    assert len(relay.captured) == 7
    assert got == {r["message_id"]: napp.notifier.message(r["spec"]) for r in rows}


def test_a_mail_that_cannot_be_rendered_there_fails_alone(
    napp: App, relay: Relay, pool: CountingPool
) -> None:
    rows = acknowledgements(napp, 4)
    spec = json.loads(rows[-1]["spec"])
    spec["template"] = "no-such-template"
    napp.db.execute("UPDATE outbox SET spec = ? WHERE id = ?", [json.dumps(spec), rows[-1]["id"]])
    sender = napp.sender(pool)
    sender.batch_size = sender.first_rows = 2
    assert sender.run_once() == 3 and pool.rendered == 2
    failed = napp.outbox.listing()[0]
    assert failed["state"] == "failed" and "cannot be rendered" in failed["last_error"]
    assert len(relay.captured) == 3


def test_a_dead_rendering_process_costs_no_mail(napp: App, relay: Relay) -> None:
    rows = acknowledgements(napp, 6)
    before = set(multiprocessing.active_children())
    pool = CountingPool(None)
    try:
        pool.render(["{}"]).result()  # started
        [process] = set(multiprocessing.active_children()) - before
        os.kill(process.pid, signal.SIGKILL)  # as the out-of-memory killer would
        process.join(10)
        sender = napp.sender(pool)
        sender.batch_size = sender.first_rows = 2
        assert sender.run_once() == 6  # the batches it held rendered here instead
        assert len({str(c.message["Message-ID"]) for c in relay.captured}) == 6
        again = pool.render([rows[0]["spec"]]).result(timeout=30)  # in a new process
        assert again == [napp.notifier.message(rows[0]["spec"])]
    finally:
        pool.close()


def test_the_rendering_process_ends_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL leaves no orphan process behind."""
    script = textwrap.dedent(
        """
        import multiprocessing, time
        from gateway.notify.pool import RenderPool
        if __name__ == "__main__":
            pool = RenderPool(None)
            pool.render(["{}"]).result()
            print(multiprocessing.active_children()[0].pid, flush=True)
            time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_rendering_process_whose_starter_is_gone_exits() -> None:
    """The pool's process watches the pid its starter passed it: one that asked the system
    for its parent after the starter had died would watch init's pid, and never exit."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; from gateway.notify import pool; "
            "pool._start(None, 999999999); time.sleep(30)",  # a starter that is gone
        ],
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 0 and time.monotonic() - started < 10
