"""`serve` killed with SIGKILL at random moments while a client sends 500 mails, retrying each
until it gets a 250 as an MTA would: afterwards every mail is exactly one ECR or update."""

from __future__ import annotations

import os
import random
import smtplib
import socket
import sqlite3
import threading
import time
from pathlib import Path

from tests.conftest import mail
from tests.serving import Served

MAILS = 500
KILLS = 30
SEED = int(os.environ.get("ECR_CRASH_SEED", "20261125"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def corpus(rng: random.Random) -> list[tuple[str, bytes]]:
    """(Message-ID, raw): new problems, and replies (threaded) to earlier ones."""
    out: list[tuple[str, bytes]] = []
    new: list[tuple[str, str]] = []
    for n in range(MAILS):
        mid = f"crash-{n}@practice.example"
        if new and rng.random() < 0.3:
            parent, who = rng.choice(new)
            raw = mail(
                subject="Re: problem",
                body=f"More on it ({n}).",
                sender=who,
                message_id=f"<{mid}>",
                in_reply_to=f"<{parent}>",
            )
        else:
            who = f"gp{n % 40}@practice{n % 7}.example"
            raw = mail(
                subject=f"Problem {n}",
                body=f"Problem number {n}.",
                sender=who,
                message_id=f"<{mid}>",
            )
            new.append((mid, who))
        out.append((mid, raw))
    return out


class Mta(threading.Thread):
    """Sends every mail, retrying each until its 250."""

    def __init__(self, port: int, mails: list[tuple[str, bytes]]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.mails = mails
        self.sent = 0
        self.retries = 0

    def run(self) -> None:
        for _, raw in self.mails:
            while not self._send(raw):
                self.retries += 1
                time.sleep(0.02)
            self.sent += 1

    def _send(self, raw: bytes) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as c:
                c.sendmail("sender@practice.example", ["support@localhost"], raw)
            return True
        except (OSError, smtplib.SMTPException):
            return False


def test_serve_killed_30_times_loses_and_duplicates_nothing(data_dir: Path) -> None:
    rng = random.Random(SEED)
    mails = corpus(rng)
    port = free_port()
    env = {"ECR_GATEWAY_SMTP__PORT": str(port), "ECR_GATEWAY_HTTP__ENABLED": "false"}
    served = Served(data_dir, env)
    mta = Mta(port, mails)
    served.start()
    mta.start()
    kills = 0
    while kills < KILLS or (mta.is_alive() and kills < KILLS * 3):
        time.sleep(rng.uniform(0.05, 0.6))
        served.kill()
        kills += 1
        if not mta.is_alive() and kills >= KILLS:
            break
        served.start()
    served.start()
    mta.join(120)
    assert not mta.is_alive(), f"seed {SEED}: the client did not finish"
    _wait_until_processed(data_dir)
    assert served.stop() == 0
    _check(data_dir, mails, f"seed {SEED}, {kills} kills, {mta.retries} retries")


def _wait_until_processed(data_dir: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _rows(data_dir, "SELECT COUNT(*) FROM inbound WHERE state = 'accepted'") == [(0,)]:
            return
        time.sleep(0.1)


def _rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(data_dir / "gateway.db", timeout=30) as db:
        return db.execute(sql).fetchall()


def _check(data_dir: Path, mails: list[tuple[str, bytes]], why: str) -> None:
    firsts = dict(
        _rows(data_dir, "SELECT message_id, outcome FROM inbound WHERE duplicate_of IS NULL")
    )
    for mid, _ in mails:
        assert firsts.get(mid) in ("created", "updated"), f"{why}: {mid} is {firsts.get(mid)}"
    assert len(firsts) == MAILS, why
    created = sum(1 for o in firsts.values() if o == "created")
    assert _rows(data_dir, "SELECT COUNT(*) FROM ecrs") == [(created,)], why
    per_message = _rows(
        data_dir, "SELECT message_id, COUNT(*) FROM updates GROUP BY message_id HAVING COUNT(*) > 1"
    )
    assert per_message == [], f"{why}: updates applied twice"
    assert _rows(data_dir, "SELECT COUNT(*) FROM inbound WHERE state != 'done'") == [(0,)], why
    assert not list((data_dir / "spool" / "tmp").iterdir()), f"{why}: temp files remain"
