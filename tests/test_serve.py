"""`ecr-gateway serve` with every listener at once: SMTP, an IMAP mailbox on a real Dovecot, and
HTTP, in one real child process, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests import dovecot
from tests.conftest import mail
from tests.dovecot import Dovecot
from tests.serving import Served

TOKEN = "serve-test-token-0123456789abcdef"


@pytest.fixture
def server() -> Iterator[Dovecot]:
    reason = dovecot.missing()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    s = Dovecot().start()
    yield s
    s.remove()


def config_file(tmp_path: Path, server: Dovecot) -> Path:
    box = server.mailbox(poll_interval=1)
    lines = ["[http.api_tokens]", f'tracker = "{TOKEN}"', "", "[[imap.mailboxes]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in box.items()]
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(data_dir / "gateway.db") as db:
        return db.execute(sql).fetchall()


def wait_for(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_smtp_imap_and_http_together(tmp_path: Path, data_dir: Path, server: Dovecot) -> None:
    served = Served(data_dir, server.environ, config_file(tmp_path, server)).start()
    try:
        assert served.http_port, "the start-up line names the HTTP address"
        assert any("IMAP: 1 mailbox" in line for line in served.lines)
        with smtplib.SMTP("127.0.0.1", served.smtp_port, timeout=10) as c:
            c.sendmail("gp@practice.example", ["support@localhost"], mail(subject="By SMTP"))
        with server.other_client() as other:
            other.append(mail(subject="By IMAP", sender="Dr B <gp@other.example>"))
        wait_for(lambda: len(rows(data_dir, "SELECT 1 FROM ecrs")) == 2)
        # The worker's sender delivers both acknowledgements (no relay: to the maildir).
        wait_for(lambda: len(list((data_dir / "sent" / "new").glob("*"))) == 2)
        assert sorted(rows(data_dir, "SELECT source, outcome FROM inbound")) == [
            ("imap:test", "created"),
            ("smtp", "created"),
        ]
        base = f"http://127.0.0.1:{served.http_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        listed = httpx.get(f"{base}/api/ecrs", headers=auth, timeout=10).json()
        assert sorted(e["subject"] for e in listed) == ["By IMAP", "By SMTP"]
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=10).json()["imap"][0]["ok"])
        health = httpx.get(f"{base}/healthz", timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["imap"][0]["last_success"]
    finally:
        code = served.stop()
    assert code == 0, "".join(served.lines[-20:])
    assert any("ecr-gateway stopped" in line for line in served.lines)
    assert not any("Traceback" in line for line in served.lines), "".join(served.lines)
    with server.other_client() as other:
        assert other.messages("INBOX") == {}  # accepted, so moved to Processed
        assert len(other.messages("Processed")) == 1


def test_a_bad_mailbox_table_stops_serve_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[imap.mailboxes]]\nname = "x"\nhost = "imap.example"\nusername = "u"\n')
    done = _serve_once(data_dir, config)
    assert done.returncode == 78
    assert "password_env, password_file or oauth2_token_command" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_taken_http_port_stops_serve_with_one_line(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve_once(data_dir, env={"ECR_GATEWAY_HTTP__PORT": str(port)})
    assert done.returncode == 71, done.stderr
    assert "cannot start" in done.stderr and "Traceback" not in done.stderr


def _serve_once(
    data_dir: Path, config: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    served = Served(data_dir, env, config)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=served.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_spool_that_cannot_be_written_stops_serve_before_it_listens(data_dir: Path) -> None:
    """Listening while every mail would get a 451 is a half start: refuse to start."""
    spool = data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "tmp").mkdir(exist_ok=True)
    if os.geteuid() == 0:  # root writes through permissions: only an immutable flag stops it
        if subprocess.run(["chattr", "+i", str(spool)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
    else:
        spool.chmod(0o500)
    try:
        done = _serve_once(data_dir, env={"ECR_GATEWAY_SMTP__PORT": "0"})
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(spool)], check=True)
        else:
            spool.chmod(0o700)
    assert done.returncode == 71, done.stderr
    assert "spool" in done.stderr and "not writable" in done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr
