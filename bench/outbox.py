"""Outbox throughput: 2,000 notifications queued (rendered) and delivered to a loopback sink.

Baseline, measured in the same run: a bare loop sending the same pre-rendered mails with the
same SMTP client (smtplib) over one connection. Run by hand: `make bench`.
"""

from __future__ import annotations

import smtplib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.app import App, build_app
from gateway.config import load_settings
from gateway.model import Envelope, Status
from gateway.notify.sender import Sender
from tests.relay import Handler, Relay

N = 2000


class Sink(Handler):
    """Counts and drops: the relay's own cost must not be what we measure."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.count += 1
        return "250 OK"


def make_app(data: Path, port: int) -> App:
    env = {
        "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data),
        "ECR_GATEWAY_OUTBOUND__RELAY_HOST": "127.0.0.1",
        "ECR_GATEWAY_OUTBOUND__RELAY_PORT": str(port),
        "ECR_GATEWAY_OUTBOUND__SECURITY": "none",
        "ECR_GATEWAY_OUTBOUND__ACK_LIMIT_PER_HOUR": "100000",
    }
    return build_app(load_settings(None, env))


def seed(app: App) -> list[int]:
    """N ECRs from N practices, their acknowledgements already out of the way."""
    ids = []
    for n in range(N):
        raw = (
            f"From: Dr {n} <gp{n}@practice{n % 50}.example>\r\nTo: support@localhost\r\n"
            f"Subject: Problem {n}\r\nMessage-ID: <seed-{n}@bench.example>\r\n\r\n"
            f"Problem number {n}.\r\n"
        ).encode()
        result = app.pipeline.ingest(Envelope(raw, "bench", "", ("support@localhost",)))
        ids.append(app.queries.ecr_id(str(result.ref)) or 0)
    app.db.execute("UPDATE outbox SET state = 'sent'")
    return ids


def ours(app: App, ids: list[int], sink: Sink, sender: Sender) -> tuple[float, float]:
    """(end to end: status change + queue + render + deliver, render + delivery of queued
    rows) msgs/s. Mails are rendered by the sender, so the second figure includes rendering."""
    start = time.perf_counter()
    for ecr_id in ids:
        app.staff.set_status(ecr_id, Status.PENDING, "Please send the error log", "staff:bench")
    queued = time.perf_counter()
    while sender.run_once():  # as `serve` calls it
        pass
    done = time.perf_counter()
    assert sink.count == N, sink.count
    return N / (done - start), N / (done - queued)


def baseline(app: App, port: int, sink: Sink) -> float:
    rows = app.db.rows(
        "SELECT envelope_from, recipient, spec FROM outbox WHERE template = 'pending'"
    )
    mails = [(r["envelope_from"], r["recipient"], app.notifier.message(r["spec"])) for r in rows]
    sink.count = 0
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as conn:
        for envelope_from, recipient, raw in mails:  # the same mails, rendered beforehand
            conn.sendmail(envelope_from, [recipient], raw)
    elapsed = time.perf_counter() - start
    assert sink.count == N, sink.count
    return N / elapsed


def main() -> None:
    sink = Sink()
    relay = Relay(sink).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            app = make_app(Path(tmp) / "data", relay.port)
            ids = seed(app)
            sink.count = 0
            pool = app.render_pool()  # as `serve` sends: its process started beforehand
            try:
                total, delivery = ours(app, ids, sink, app.sender(pool))
            finally:
                pool.close()
            base = baseline(app, relay.port, sink)
            app.close()
    finally:
        relay.stop()
    print(f"{'benchmark':<48}{'figure':>10}{'baseline':>10}{'ratio':>8}{'target':>8}")
    for what, rate, target in (  # the target: queued rows delivered
        ("outbox: status+render+queue+deliver, msgs/s", total, ""),
        ("outbox: render+deliver queued rows, msgs/s", delivery, ">=0.70"),
    ):
        print(f"{what:<48}{rate:>10.0f}{base:>10.0f}{rate / base:>8.2f}{target:>8}")


if __name__ == "__main__":
    main()
