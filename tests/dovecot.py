"""A real Dovecot for the IMAP tests and the benchmark: Debian's dovecot-imapd, started from a
config of its own in a temporary folder, on a loopback port, without TLS, as an unprivileged
user (`nobody` when the tests run as root, else the current user), stopped by its pid.

The second client (the "other mail program" that appends and looks) is the standard library's
imaplib: imapclient stays the gateway's own business (STYLE: one module per library).
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DOVECOT = Path("/usr/sbin/dovecot")
USER, PASSWORD = "test", "secret"
OAUTH_USER, OAUTH_TOKEN = "oauth", "tok"
PASSWORD_ENV = "ECR_TEST_IMAP_PASSWORD"
# Without MOVE and IDLE: the fallbacks (COPY + \Deleted + UID EXPUNGE, polling).
PLAIN_CAPABILITIES = "IMAP4rev1 LITERAL+ SASL-IR UIDPLUS UNSELECT NAMESPACE"

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
# XOAUTH2 checks the token against the passdb like a password: a fixed token for a test user.
auth_mechanisms = plain login xoauth2
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
{capability}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={root}/home/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


def missing() -> str:
    """Why no Dovecot can run here, or "" when one can."""
    if not DOVECOT.exists():
        return f"{DOVECOT} is not installed (apt-get install dovecot-imapd)"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DovecotExited(RuntimeError):
    pass


class Dovecot:
    def __init__(self, capability: str = "") -> None:
        self.user, self.group = _unprivileged()
        # Our own folder under /tmp: pytest's tmp_path is private to root, and the
        # unprivileged server must read and write its mail there.
        self.root = Path(tempfile.mkdtemp(prefix="ecr-dovecot-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config(capability)

    def _write_config(self, capability: str) -> None:
        for sub in ("run", "state", "mail", "home"):
            (self.root / sub).mkdir()
        (self.root / "passwd").write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}\n{OAUTH_USER}:{{PLAIN}}{OAUTH_TOKEN}\n"
        )
        (self.root / "dovecot.conf").write_text(
            CONFIG.format(
                root=self.root,
                user=self.user,
                group=self.group,
                port=self.port,
                capability=f"imap_capability = {capability}" if capability else "",
            )
        )
        if os.geteuid() == 0:
            uid, gid = pwd.getpwnam(self.user).pw_uid, grp.getgrnam(self.group).gr_gid
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, uid, gid)

    def start(self, attempts: int = 3) -> Dovecot:
        """Started and greeting. A master that exits at once is started again: right after a
        kill, a loaded machine has been seen to make the new one give up (rarely)."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except DovecotExited:
                self.proc = None
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2)
        return self

    def _start_once(self) -> None:
        root_only: dict[str, Any] = {}
        if os.geteuid() == 0:
            root_only = {"user": self.user, "group": self.group, "extra_groups": []}
        with open(self.root / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(
                [str(DOVECOT), "-F", "-c", str(self.root / "dovecot.conf")],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: kill() takes its children too
                **root_only,
            )
        self._wait_for_greeting()

    def _wait_for_greeting(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                said = (self.root / "stderr.log").read_text(errors="replace")
                raise DovecotExited(f"dovecot exited: {said[-1000:]}{self.log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ) as s:
                if s.recv(100).startswith(b"* OK"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"dovecot did not answer on {self.port}: {self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL to the server and every child of it: connections drop mid-command."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        _wait_until_closed(self.port)

    def restart(self) -> None:
        self.kill()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def mailbox(self, **overrides: Any) -> dict[str, Any]:
        """An [[imap.mailboxes]] table for this server."""
        return {
            "name": "test",
            "host": "127.0.0.1",
            "port": self.port,
            "security": "none",
            "username": USER,
            "password_env": PASSWORD_ENV,
            **overrides,
        }

    @property
    def environ(self) -> dict[str, str]:
        """What the gateway's environment holds for `password_env`."""
        return {PASSWORD_ENV: PASSWORD}

    @contextlib.contextmanager
    def other_client(self) -> Iterator[Other]:
        other = Other(self.port)
        try:
            yield other
        finally:
            other.close()


class Other:
    """Another mail program on the same mailbox: appends mail, looks at folders."""

    def __init__(self, port: int) -> None:
        self.imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        self.imap.login(USER, PASSWORD)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.imap.logout()

    def append(self, raw: bytes, folder: str = "INBOX") -> None:
        typ, data = self.imap.append(folder, "", None, raw)
        assert typ == "OK", data

    def create(self, folder: str) -> None:
        typ, data = self.imap.create(folder)
        assert typ == "OK", data

    def delete(self, folder: str) -> None:
        self.imap.select("INBOX")  # a folder is deleted best while it is not selected
        typ, data = self.imap.delete(folder)
        assert typ == "OK", data

    def messages(self, folder: str = "INBOX") -> dict[int, bytes]:
        """UID -> the whole raw message, read without marking it seen."""
        typ, _ = self.imap.select(folder, readonly=True)
        if typ != "OK":
            return {}
        typ, data = self.imap.uid("SEARCH", "ALL")
        uids = [int(u) for u in data[0].split()]
        out = {}
        for uid in uids:
            typ, parts = self.imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
            out[uid] = next(p[1] for p in parts if isinstance(p, tuple))
        return out

    def flags(self, folder: str = "INBOX") -> list[bytes]:
        self.imap.select(folder, readonly=True)
        _, data = self.imap.fetch("1:*", "(FLAGS)")
        return [d for d in data if isinstance(d, bytes)]

    def copy_all(self, source: str, target: str) -> None:
        self.imap.select(source)
        typ, data = self.imap.copy("1:*", target)
        assert typ == "OK", data


def _unprivileged() -> tuple[str, str]:
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        return user.pw_name, grp.getgrgid(user.pw_gid).gr_name
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def _wait_until_closed(port: int) -> None:
    """After a kill the port may answer for a moment longer; a restart must not race it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
