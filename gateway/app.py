"""The one place objects are wired together: build_app(settings) -> App."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from gateway.config import Settings
from gateway.mail import classify, rules
from gateway.mail.parse import Limits
from gateway.notify import plan
from gateway.notify.notifier import Identity, Notifier
from gateway.notify.pool import RenderPool
from gateway.notify.render import Renderer
from gateway.notify.sender import Sender
from gateway.notify.transport import MaildirSink, RelayConfig, SmtpRelay, Transport
from gateway.pipeline import Clock, Pipeline, Policies, utcnow
from gateway.staff import Staff
from gateway.store.db import Database
from gateway.store.files import Blobs, Spool
from gateway.store.outbox import Outbox
from gateway.store.queries import Queries
from gateway.store.records import Records


@dataclass
class App:
    settings: Settings
    db: Database
    records: Records
    queries: Queries
    spool: Spool
    blobs: Blobs
    pipeline: Pipeline
    outbox: Outbox
    notifier: Notifier
    staff: Staff
    renderer: Renderer
    keys: list[bytes]
    instance_id: str
    clock: Clock
    environ: dict[str, str]

    def close(self) -> None:
        try:
            self.pipeline.spool.close()
        finally:
            self.db.close()

    def sender(self, pool: RenderPool | None = None) -> Sender:
        """An outbox sender with its own connection, for its own thread (sqlite3 rule);
        `pool` renders bursts on a second core (what `serve` does)."""
        o = self.settings.outbound
        transport: Transport
        if o.relay_host:
            transport = SmtpRelay(
                RelayConfig(
                    o.relay_host,
                    o.relay_port,
                    o.security,
                    o.username,
                    self.environ.get(o.password_env, "") if o.password_env else "",
                    timeout=float(o.relay_timeout),
                )
            )
        else:
            transport = MaildirSink(self.settings.data_dir / "sent")
        db = Database(self.settings.data_dir / "gateway.db")
        return Sender(
            Outbox(db), transport, self.clock, o.retry_hours, self.notifier.message, pool=pool
        )

    def render_pool(self) -> RenderPool:
        """A process that renders with the same templates as this app."""
        return RenderPool(templates_folder(self.settings))


def build_app(
    settings: Settings, clock: Clock = utcnow, environ: Mapping[str, str] | None = None
) -> App:
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    keys = load_keys(data / "secret.key")
    instance_id = settings.gateway.instance_id or _once(
        data / "instance_id", lambda: secrets.token_hex(8)
    )
    db = Database(data / "gateway.db")
    g = settings.gateway
    records = Records(db, g.ref_prefix, g.ref_width)
    spool, blobs = Spool(data / "spool"), Blobs(data / "attachments")
    outbox = Outbox(db)
    renderer = Renderer(templates_folder(settings))
    notifier = Notifier(
        outbox,
        renderer,
        identity(settings, instance_id),
        recipients(settings),
        keys,
        g.ref_prefix,
        g.ref_width,
    )
    pipeline = Pipeline(
        records, spool, blobs, policies(settings, keys, instance_id), notifier, clock
    )
    return App(
        settings=settings,
        db=db,
        records=records,
        queries=Queries(db, g.ref_prefix, g.ref_width),
        spool=spool,
        blobs=blobs,
        pipeline=pipeline,
        outbox=outbox,
        notifier=notifier,
        staff=Staff(records, notifier, clock),
        renderer=renderer,
        keys=keys,
        instance_id=instance_id,
        clock=clock,
        environ=dict(environ or {}),
    )


def templates_folder(settings: Settings) -> Path | None:
    return Path(settings.templates.folder) if settings.templates.folder else None


def identity(settings: Settings, instance_id: str) -> Identity:
    g = settings.gateway
    return Identity(
        support_address=settings.support_address,
        bounce_address=settings.bounce_address,
        domain=g.domain.lower(),
        base_url=g.base_url,
        instance_id=instance_id,
        team_name=g.team_name,
        reply_token_days=g.reply_token_days,
        reopen_days=g.reopen_window_days,
    )


def recipients(settings: Settings) -> plan.Recipients:
    return plan.Recipients(
        settings.own_addresses,
        settings.gateway.staff_alert_address,
        settings.outbound.ack_limit_per_hour,
    )


def policies(settings: Settings, keys: list[bytes], instance_id: str) -> Policies:
    g, lim = settings.gateway, settings.limits
    own = settings.own_addresses
    return Policies(
        limits=Limits(
            settings.smtp.max_message_size,
            lim.max_header_size,
            lim.max_mime_depth,
            lim.max_parts,
            float(lim.parse_timeout),
            tuple(g.reply_languages),
        ),
        own=classify.Own(instance_id, own),
        rules=rules.Policy(
            reopen_window=timedelta(days=g.reopen_window_days),
            thanks_phrases=tuple(g.thanks_phrases),
            problem_types={k.lower(): v for k, v in g.problem_types.items()},
            own_addresses=own,
        ),
        keys=keys,
        reply_locals=frozenset(a.partition("@")[0] for a in own if a.endswith("@" + g.domain)),
        domain=g.domain.lower(),
        ref_prefix=g.ref_prefix,
        ref_width=g.ref_width,
        max_attempts=g.max_attempts,
        max_attachment_size=lim.max_attachment_size,
    )


def load_keys(path: Path) -> list[bytes]:
    """The secret keys, newest first: the first signs, all verify (rotation, PRODUCT §6)."""
    text = _once(path, lambda: secrets.token_hex(32) + "\n")
    keys = [bytes.fromhex(line.strip()) for line in text.splitlines() if line.strip()]
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys


def _once(path: Path, make: object) -> str:
    """Read a small generated file, creating it (mode 0600, atomically) on first use."""
    if not path.exists():
        # pid and a random part: threads of one process (the IMAP watchers) may race here too.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make())  # type: ignore[operator]
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process won the race; theirs stands
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
