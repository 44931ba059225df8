"""GET /metrics: the Prometheus text exposition. The only module that imports prometheus-client.

Most figures are read from the database at scrape time by a custom collector, so they count
what every process did (the SMTP listener, the worker, a CLI `ingest`) and survive restarts.
Only what is never stored (score submissions turned away) is an in-process counter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.store.ops import Figures

PREFIX = "ecr_gateway"


class Metrics:
    def __init__(self, figures: Callable[[], Figures]) -> None:
        """`figures` reads the stored figures on the scraping thread's own connection."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoredFigures(figures))
        self.refused = Counter(
            f"{PREFIX}_score_posts_refused",
            "Score submissions turned away before anything was recorded, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def refuse(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StoredFigures:
    """A collector (prometheus-client's protocol): one read of the database per scrape."""

    def __init__(self, figures: Callable[[], Figures]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures()
        yield _accepted(f)
        yield _latency(f)
        outbox = GaugeMetricFamily(
            f"{PREFIX}_outbox_messages", "Notification mails by state.", labels=["state"]
        )
        for state in sorted({"queued", "sent", "failed", "bounced", *f.backlog.outbox}):
            outbox.add_metric([state], f.backlog.outbox.get(state, 0))
        yield outbox
        yield GaugeMetricFamily(
            f"{PREFIX}_quarantine_size", "Inbound mails in quarantine.", f.backlog.quarantined
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_inbound_waiting", "Accepted mails not yet processed.", f.backlog.waiting
        )
        reconnects = CounterMetricFamily(
            f"{PREFIX}_imap_reconnects",
            "Failed IMAP connections or passes, each followed by a reconnect.",
            labels=["mailbox"],
        )
        for mailbox, n in sorted(f.imap_reconnects.items()):
            reconnects.add_metric([mailbox], n)
        yield reconnects
        yield CounterMetricFamily(
            f"{PREFIX}_score_submissions", "Scores submitted (each POST counts).", f.scores
        )


def _accepted(f: Figures) -> Metric:
    family = CounterMetricFamily(
        f"{PREFIX}_mails_accepted",
        "Inbound mails accepted, by transport and by what became of them.",
        labels=["transport", "outcome"],
    )
    for (transport, outcome), n in sorted(f.accepted.items()):
        family.add_metric([transport, outcome], n)
    return family


def _latency(f: Figures) -> Metric:
    return HistogramMetricFamily(
        f"{PREFIX}_processing_latency_seconds",
        "From acceptance to the mail's outcome (stored to the second; duplicates excluded).",
        buckets=[(_le(b), n) for b, n in f.latency.buckets],
        sum_value=f.latency.total,
    )


def _le(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it: `1.0`, `+Inf`."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
