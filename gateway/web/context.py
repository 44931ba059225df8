"""What the web side needs, built once per process, and each worker thread's own store objects.

Requests run on a thread pool; an SQLite connection must stay in the thread that opened it
(STYLE: traps), so every thread gets its own Database and the objects built on it, on first
use. The first connection, made here at start-up, is the one that runs the migrations.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.app import build_app, identity, recipients
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.notify.notifier import Notifier
from gateway.notify.render import PageRenderer
from gateway.pipeline import Clock, utcnow
from gateway.staff import Staff
from gateway.store.db import Database
from gateway.store.files import Blobs
from gateway.store.ops import Ops
from gateway.store.outbox import Outbox
from gateway.store.queries import Queries
from gateway.store.records import Records
from gateway.store.scores import Scores
from gateway.web.auth import ApiTokens, load_tokens
from gateway.web.fresh import Fresh
from gateway.web.ratelimit import RateLimit


@dataclass
class Stores:
    """One thread's connection and what is built on it."""

    db: Database
    queries: Queries
    staff: Staff
    scores: Scores
    ops: Ops
    fresh: Fresh


class Context:
    def __init__(
        self, settings: Settings, environ: Mapping[str, str] | None = None, clock: Clock = utcnow
    ) -> None:
        app = build_app(settings, clock=clock, environ=environ)  # migrations, keys, instance id
        app.close()
        self.settings = settings
        self.clock = clock
        self.keys = app.keys
        self.instance_id = app.instance_id
        self.blobs = Blobs(settings.data_dir / "attachments")
        self.spool = settings.data_dir / "spool"
        override = Path(settings.templates.folder) if settings.templates.folder else None
        self.renderer = app.renderer  # notifications are rendered by the sender, not here
        self.pages = PageRenderer(override)
        self.api_tokens: ApiTokens = load_tokens(settings.http)
        self.score_limit = RateLimit(settings.http.score_posts_per_minute)
        self.metrics = Metrics(lambda: self.stores().ops.figures())
        self._local = threading.local()

    def check(self) -> None:
        """Render every page once: a broken template override stops start-up, not a request."""
        self.pages.check()

    def stores(self) -> Stores:
        found: Stores | None = getattr(self._local, "stores", None)
        if found is None:
            found = self._local.stores = self._open()
        return found

    def _open(self) -> Stores:
        s, g = self.settings, self.settings.gateway
        db = Database(s.data_dir / "gateway.db", migrate=False)
        notifier = Notifier(
            Outbox(db),
            self.renderer,
            identity(s, self.instance_id),
            recipients(s),
            self.keys,
            g.ref_prefix,
            g.ref_width,
        )
        return Stores(
            db=db,
            queries=Queries(db, g.ref_prefix, g.ref_width),
            staff=Staff(Records(db, g.ref_prefix, g.ref_width), notifier, self.clock),
            scores=Scores(db),
            ops=Ops(db),
            fresh=Fresh(db),
        )
