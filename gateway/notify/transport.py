"""Delivering one rendered mail: to the SMTP relay, or to the local maildir `data/sent/`.

Errors are sorted the way the outbox needs them: TempFail (4xx, connection trouble: try again
later) and PermFail (5xx: give up now).
"""

from __future__ import annotations

import contextlib
import mailbox
import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TempFail(Exception):
    """Try again later."""


class PermFail(Exception):
    """The relay refused for good."""


class Transport(Protocol):
    def send(self, envelope_from: str, recipient: str, raw: bytes) -> None: ...
    def close(self) -> None: ...


class MaildirSink:
    """The embedded default: what would have been sent, readable with any mail client."""

    def __init__(self, path: Path) -> None:
        self.box = mailbox.Maildir(str(path), create=True)

    def send(self, envelope_from: str, recipient: str, raw: bytes) -> None:
        self.box.add(raw)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RelayConfig:
    host: str
    port: int
    security: str  # tls / starttls / none
    username: str = ""
    password: str = ""
    timeout: float = 30.0
    tls_context: ssl.SSLContext | None = None


class SmtpRelay:
    """One connection, kept open between mails and re-opened when the relay drops it."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.conn: smtplib.SMTP | None = None
        self.context = config.tls_context  # made at first use: loading the CA store takes ~20 ms

    def send(self, envelope_from: str, recipient: str, raw: bytes) -> None:
        try:
            conn = self._connection()
            conn.ehlo_or_helo_if_needed()
            options = ["SMTPUTF8"] if _needs_utf8(recipient, raw) else []
            if options and not conn.has_extn("smtputf8"):
                raise PermFail("the relay does not offer SMTPUTF8, which this address needs")
            conn.sendmail(envelope_from, [recipient], raw, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            self._raise(code, reply)
        except smtplib.SMTPResponseException as exc:
            self._raise(exc.smtp_code, exc.smtp_error)
        except (TimeoutError, smtplib.SMTPServerDisconnected, OSError) as exc:
            self.close()
            raise TempFail(f"connection: {exc}") from None
        except smtplib.SMTPException as exc:
            self.close()
            raise TempFail(str(exc)) from None
        except UnicodeError as exc:  # an address no SMTP command can carry
            raise PermFail(f"cannot be encoded: {exc}") from None

    def _raise(self, code: int, reply: bytes | str) -> None:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        if 500 <= code < 600:
            raise PermFail(f"{code} {text}")
        self.close()
        raise TempFail(f"{code} {text}")

    def _connection(self) -> smtplib.SMTP:
        if self.conn is not None:
            return self.conn
        c = self.config
        conn: smtplib.SMTP
        if c.security == "tls":
            conn = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout, context=self._tls())
        else:
            conn = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
            if c.security == "starttls":
                conn.starttls(context=self._tls())
        if c.username:
            conn.login(c.username, c.password)
        self.conn = conn
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self.context is None:
            self.context = ssl.create_default_context()
        return self.context

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                self.conn.quit()
            self.conn = None


def _needs_utf8(recipient: str, raw: bytes) -> bool:
    return not recipient.isascii() or not raw.isascii()
