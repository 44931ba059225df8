"""The IMAP watcher against a real Dovecot (Debian's dovecot-imapd, tests/dovecot.py), beside
baselines measured in the same run:

  (a) drain: 2,000 mails appended, then taken by a logged-in watcher's `try_once()` (fetch, durable
      acceptance, MOVE to Processed, cursor), in msgs/s; baseline: imapclient fetching the same
      mails with BODY.PEEK[] in batches of 100 and doing nothing with them, measured before the
      drain (from INBOX) and after it (from Processed), their mean: stock imapclient,
      which the target (>= 0.5x) is set against; and beside it the same with imaplib's trace
      off, as the watcher runs it (gateway/inbound/imap.py, `default_client`).
  (b) latency under IDLE: the median time from the start of an APPEND (by another client) to
      the committed ECR (the watcher idling in its thread, a spool processor woken by it in
      another); baseline: the time an APPEND takes to reach a bare imapclient client idling
      on a folder of its own, interleaved with ours. Target: within 100 ms of it.

Run by hand (`.venv/bin/python bench/imap.py [--mails N] [--samples N]`); never a timed test.
Everything lives in temporary directories, on loopback.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import imapclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from gateway.app import App, build_app
from gateway.config import Settings, load_settings
from gateway.inbound import imap
from tests import dovecot
from tests.dovecot import Dovecot

BATCH = 100
BASELINE = "Baseline"


def make_mail(n: int, size: int = 2048) -> bytes:
    head = (
        f"From: Dr {n % 97} <gp{n % 97}@practice{n % 13}.example>\r\nTo: support@localhost\r\n"
        f"Subject: Problem {n}\r\nMessage-ID: <bench-imap-{n}-{time.time_ns()}@b.example>"
        "\r\n\r\n"
    )
    line = b"The practice system shows an error when printing labels.\r\n"
    return head.encode() + line * max(1, (size - len(head)) // len(line))


def settings_for(data: Path) -> Settings:
    return load_settings(
        None,
        {
            "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data),
            "ECR_GATEWAY_OUTBOUND__ACK_LIMIT_PER_HOUR": "1000000",
        },
    )


def login(server: Dovecot, factory: imap.ClientFactory = imapclient.IMAPClient) -> Any:
    """Stock imapclient unless told otherwise (the watcher's own turns imaplib's trace off)."""
    client = factory("127.0.0.1", port=server.port, ssl=False, timeout=60)
    client.login(dovecot.USER, dovecot.PASSWORD)
    return client


# --- (a) drain -------------------------------------------------------------------------------


def baseline_fetch(
    server: Dovecot, folder: str = "INBOX", factory: imap.ClientFactory = imapclient.IMAPClient
) -> float:
    """msgs/s of imapclient alone: the mails fetched in batches, nothing done with them."""
    client = login(server, factory)
    try:
        start = time.perf_counter()
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        for i in range(0, len(uids), BATCH):
            client.fetch(uids[i : i + BATCH], ["BODY.PEEK[]"])
        return len(uids) / (time.perf_counter() - start)
    finally:
        client.logout()


def connected(server: Dovecot, app: App) -> imap.ImapWatcher:
    """A watcher logged in and through one pass over the empty mailbox, as in `serve`
    between mails (the baseline's login is not timed either)."""
    config = imap.parse_mailbox(server.mailbox(idle=False), server.environ)
    watcher = imap.watcher_for(app, config)
    assert watcher.try_once()
    return watcher


def drain(watcher: imap.ImapWatcher, app: App, mails: int) -> float:
    try:
        start = time.perf_counter()
        assert watcher.try_once()
        elapsed = time.perf_counter() - start
    finally:
        watcher.disconnect()
    taken = int(app.db.value("SELECT COUNT(*) FROM inbound"))
    assert taken == mails, f"{taken} of {mails} accepted"
    return mails / elapsed


# --- (b) latency under IDLE --------------------------------------------------------------------


class BareIdler(threading.Thread):
    """A bare client idling on a folder of its own (on INBOX the watcher would move each
    mail away before the server got round to telling this client, which then hears nothing):
    when the server tells it about new mail."""

    def __init__(self, server: Dovecot) -> None:
        super().__init__(daemon=True)
        self.client = login(server)
        self.client.create_folder(BASELINE)
        self.client.select_folder(BASELINE)
        self.told: queue.Queue[float] = queue.Queue()
        self.stop = threading.Event()

    def run(self) -> None:
        self.client.idle()
        try:
            while not self.stop.is_set():
                responses = self.client.idle_check(timeout=0.5)
                if any(len(r) > 1 and r[1] == b"EXISTS" for r in responses):
                    self.told.put(time.perf_counter())
        finally:
            self.client.idle_done()
            self.client.logout()


class Processor(threading.Thread):
    """The spool processor of `serve`, in small: woken by the watcher, it finishes every
    accepted mail and notes when each ECR was committed."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.committed: queue.Queue[float] = queue.Queue()

    def run(self) -> None:
        app = build_app(self.settings)
        try:
            while not self.stop.is_set():
                self.wake.wait(0.5)
                self.wake.clear()
                for result in app.pipeline.process_waiting():
                    if result.ref:
                        self.committed.put(time.perf_counter())
        finally:
            app.close()


def latency(server: Dovecot, settings: Settings, samples: int) -> tuple[float, float]:
    processor = Processor(settings)
    processor.start()
    stop = threading.Event()
    config = imap.parse_mailbox(server.mailbox(poll_interval=3600), server.environ)

    def watch() -> None:
        app = build_app(settings)
        try:
            imap.watcher_for(app, config, wake=processor.wake.set).run(stop)
        finally:
            app.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    idler = BareIdler(server)
    idler.start()
    ours, bare = [], []
    with server.other_client() as other:
        time.sleep(1.0)  # both have made their first pass and idle
        for n in range(samples):
            # Interleaved, one of each per round: the same server, load and moment.
            sent = time.perf_counter()
            other.append(make_mail(200_000 + n), BASELINE)
            bare.append(idler.told.get(timeout=10) - sent)
            sent = time.perf_counter()
            other.append(make_mail(100_000 + n))
            ours.append(processor.committed.get(timeout=10) - sent)
            time.sleep(0.3)  # the watcher is back in IDLE before the next one
    stop.set()
    idler.stop.set()
    processor.stop.set()
    for t in (watcher, idler, processor):
        t.join(5)
    return statistics.median(ours), statistics.median(bare)


# --- the report -------------------------------------------------------------------------------


def table(rows: list[tuple[str, float, float, str, str]]) -> str:
    lines = [f"{'what':<50}{'figure':>10}{'baseline':>10}{'ratio':>8}  target"]
    for what, figure, base, ratio, target in rows:
        lines.append(f"{what:<50}{figure:>10.1f}{base:>10.1f}{ratio:>8}  {target}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=25)
    args = parser.parse_args()
    if dovecot.missing():
        sys.exit(f"cannot run: {dovecot.missing()}")
    server = Dovecot().start()
    try:
        with tempfile.TemporaryDirectory() as tmp, server.other_client() as other:
            settings = settings_for(Path(tmp) / "data")
            app = build_app(settings)
            try:
                watcher = connected(server, app)
                for n in range(args.mails):
                    other.append(make_mail(n))
                before = baseline_fetch(server)
                quiet_before = baseline_fetch(server, factory=imap.default_client)
                rate = drain(watcher, app, args.mails)
                after = baseline_fetch(server, "Processed")  # the same mails, moved there
                quiet_after = baseline_fetch(server, "Processed", imap.default_client)
                base_rate = (before + after) / 2
                quiet_rate = (quiet_before + quiet_after) / 2
                app.pipeline.process_waiting()  # the spool processor's work, not timed here
            finally:
                app.close()
            ours, bare = latency(server, settings, args.samples)
    except Exception:
        print(server.log()[-3000:])
        raise
    finally:
        server.remove()
    print(f"{args.mails} mails of 2 KB, {os.cpu_count()} cores, Dovecot on loopback")
    print(
        table(
            [
                (
                    "drain, msgs/s (baseline: imapclient fetch only)",
                    rate,
                    base_rate,
                    f"{rate / base_rate:.2f}x",
                    ">= 0.5x",
                ),
                (
                    "drain, msgs/s (baseline: the same, trace off)",
                    rate,
                    quiet_rate,
                    f"{rate / quiet_rate:.2f}x",
                    "",
                ),
                (
                    "APPEND -> committed ECR under IDLE, median ms",
                    ours * 1000,
                    bare * 1000,
                    f"+{(ours - bare) * 1000:.0f}ms",
                    "<= +100ms",
                ),
            ]
        )
    )
    print(f"drain baseline: {before:.0f} msgs/s before, {after:.0f} after (their mean above)")
    print(
        "second drain baseline: imapclient with imaplib's trace off, as the watcher runs it: "
        f"{quiet_before:.0f} msgs/s before, {quiet_after:.0f} after"
    )
    print("latency baseline: APPEND -> EXISTS at a bare idling imapclient client, same APPENDs")


if __name__ == "__main__":
    main()
