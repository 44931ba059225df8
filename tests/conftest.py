"""Shared test parts: real SQLite files under tmp_path, a settable clock, a mail builder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App, build_app
from gateway.config import Settings, load_settings
from gateway.model import Envelope

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEST_KEY = "11" * 32  # a fixed secret, so tokens in fixtures are reproducible


class Clock:
    """The gateway's clock in tests: starts at a fixed instant, moves only when told."""

    def __init__(self, start: datetime = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def make_settings(data_dir: Path, environ: dict[str, str] | None = None) -> Settings:
    env = {"ECR_GATEWAY_GATEWAY__DATA_DIR": str(data_dir), **(environ or {})}
    return load_settings(None, env)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "secret.key").write_text(TEST_KEY + "\n")
    return d


@pytest.fixture
def app(data_dir: Path, clock: Clock) -> Iterator[App]:
    a = build_app(make_settings(data_dir), clock=clock)
    yield a
    a.close()


def mail(
    subject: str = "Printer broken",
    body: str = "The printer in room 2 is broken.",
    sender: str = "Dr A <gp@practice.example>",
    to: str = "support@localhost",
    cc: str = "",
    message_id: str | None = "auto",
    in_reply_to: str = "",
    headers: dict[str, str] | None = None,
    attachments: list[tuple[str, str, bytes]] | None = None,
    date: datetime | None = None,
) -> bytes:
    """A well-formed mail built with the standard library; hostile mails are written by hand."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime(2026, 11, 2, 9, 0, tzinfo=UTC))
    if message_id == "auto":
        mail.counter += 1  # type: ignore[attr-defined]
        message_id = f"<test-{mail.counter}@practice.example>"  # type: ignore[attr-defined]
    if message_id:
        msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    for name, ctype, data in attachments or []:
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))  # as on the wire


mail.counter = 0  # type: ignore[attr-defined]


def ingest(app: App, raw: bytes, rcpt: tuple[str, ...] = ("support@localhost",),
           source: str = "ingest", mail_from: str = "") -> Any:
    return app.pipeline.ingest(Envelope(raw, source, mail_from, rcpt))


def run_cli(data_dir: Path, *args: str, stdin: bytes | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real `ecr-gateway` command in a child process, as an MTA or a person runs it."""
    environ = {**os.environ, "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data_dir), **(env or {})}
    environ.pop("ECR_GATEWAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin,
                          capture_output=True, env=environ, timeout=120)
