"""The report staff pull for a period: pure computation over per-ECR facts, and its formats.

The period is a cohort: the ECRs *created* in [since, until). For them: counts by problem
type and current status; the median time from creation to the first staff action (first
response) and to the first resolution; the reactivation rate (reactivated ÷ resolved at least
once); the average score and how many scores were given. Each figure is given per problem
type and for all of them. No I/O here: `gateway/store/reports.py` reads the facts.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.model import Status

STATUSES = tuple(s.value for s in Status)
ALL = "all"
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class EcrFacts:
    """What the report needs to know of one ECR."""

    problem_type: str
    status: str
    created_at: datetime
    first_response_at: datetime | None  # first event by staff
    first_resolved_at: datetime | None
    reactivated: bool  # ever reactivated
    scores: tuple[int, ...] = ()  # one per (contact, resolution)


@dataclass(frozen=True)
class Line:
    """One line of the report: a problem type, or all of them."""

    problem_type: str
    by_status: dict[str, int]
    total: int
    median_first_response_seconds: float | None
    median_resolution_seconds: float | None
    ever_resolved: int  # resolved at least once (the status may have moved on since)
    ever_reactivated: int
    reactivation_rate: float | None
    average_score: float | None
    scores: int


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    lines: list[Line]  # one per problem type, by name
    total: Line


@dataclass(frozen=True)
class Timeline:
    """ECRs created per period step and problem type: what the chart draws."""

    step: str  # "day", "week" or "month"
    labels: list[str]
    series: dict[str, list[int]]  # problem type -> count per label


def period(since: str | None, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """[since, until) from two optional dates; by default the 30 days up to now, and what
    was created in the current second (timestamps are stored to the second) included."""
    end = when(until) if until else now.replace(microsecond=0) + timedelta(seconds=1)
    start = when(since) if since else end - timedelta(days=DEFAULT_DAYS)
    if start >= end:
        raise ValueError(f"the period is empty: {_iso(start)} is not before {_iso(end)}")
    return start, end


def when(text: str) -> datetime:
    """`2026-11-01` (midnight UTC) or an ISO date and time; without a zone it is UTC."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a date: {text!r} (expected e.g. 2026-11-01)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def compute(facts: Sequence[EcrFacts], since: datetime, until: datetime) -> Report:
    kinds = sorted({f.problem_type for f in facts}, key=str.casefold)
    lines = [line(k, [f for f in facts if f.problem_type == k]) for k in kinds]
    return Report(since, until, lines, line(ALL, facts))


def line(problem_type: str, facts: Sequence[EcrFacts]) -> Line:
    resolved = [f for f in facts if f.first_resolved_at is not None]
    reactivated = sum(1 for f in resolved if f.reactivated)
    scores = [s for f in facts for s in f.scores]
    return Line(
        problem_type=problem_type,
        by_status={s: sum(1 for f in facts if f.status == s) for s in STATUSES},
        total=len(facts),
        median_first_response_seconds=_median_wait(facts, "first_response_at"),
        median_resolution_seconds=_median_wait(facts, "first_resolved_at"),
        ever_resolved=len(resolved),
        ever_reactivated=reactivated,
        reactivation_rate=reactivated / len(resolved) if resolved else None,
        average_score=statistics.fmean(scores) if scores else None,
        scores=len(scores),
    )


def _median_wait(facts: Sequence[EcrFacts], field: str) -> float | None:
    """Median seconds from creation to `field`, over the ECRs that reached it."""
    waits = [
        (at - f.created_at).total_seconds() for f in facts if (at := getattr(f, field)) is not None
    ]
    return float(statistics.median(waits)) if waits else None


# --- the three formats ----------------------------------------------------------------------

COLUMNS = (
    "problem_type",
    *STATUSES,
    "total",
    "median_first_response_seconds",
    "median_resolution_seconds",
    "ever_resolved",
    "ever_reactivated",
    "reactivation_rate",
    "average_score",
    "scores",
)


def as_json(report: Report) -> dict[str, Any]:
    return {
        "since": _iso(report.since),
        "until": _iso(report.until),
        "problem_types": [_flat(x) for x in report.lines],
        "total": _flat(report.total),
    }


def as_csv(report: Report) -> str:
    """One row per problem type and a last row `all`; empty cells where a figure has no data."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for x in [*report.lines, report.total]:
        flat = _flat(x)
        writer.writerow(["" if flat[c] is None else flat[c] for c in COLUMNS])
    return out.getvalue()


def as_table(report: Report) -> str:
    head = [
        "problem type",
        *STATUSES,
        "total",
        "1st response",
        "resolution",
        "reopen rate",
        "avg score",
        "scores",
    ]
    body = [_cells(x) for x in [*report.lines, report.total]]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    rows = [_row(head, widths), _row(["-" * w for w in widths], widths)]
    rows += [_row(r, widths) for r in body[:-1]]
    if report.lines:
        rows.append(_row(["-" * w for w in widths], widths))
    rows.append(_row(body[-1], widths))
    period = f"ECRs created {_iso(report.since)} .. {_iso(report.until)}"
    return "\n".join([period, "", *rows]) + "\n"


def _flat(x: Line) -> dict[str, Any]:
    return {
        "problem_type": x.problem_type,
        **x.by_status,
        "total": x.total,
        "median_first_response_seconds": x.median_first_response_seconds,
        "median_resolution_seconds": x.median_resolution_seconds,
        "ever_resolved": x.ever_resolved,
        "ever_reactivated": x.ever_reactivated,
        "reactivation_rate": x.reactivation_rate,
        "average_score": x.average_score,
        "scores": x.scores,
    }


def _cells(x: Line) -> list[str]:
    rate = "-" if x.reactivation_rate is None else f"{x.reactivation_rate:.0%}"
    score = "-" if x.average_score is None else f"{x.average_score:.2f}"
    return [
        x.problem_type,
        *(str(x.by_status[s]) for s in STATUSES),
        str(x.total),
        _duration(x.median_first_response_seconds),
        _duration(x.median_resolution_seconds),
        rate,
        score,
        str(x.scores),
    ]


def _row(cells: list[str], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
    return "  ".join([first, *rest]).rstrip()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the problem-type breakdown over time ------------------------------------------------------


def timeline(facts: Sequence[EcrFacts], since: datetime, until: datetime) -> Timeline:
    """Counts per step: days for a month or less, weeks up to half a year, else months."""
    span = until - since
    step = "day" if span <= timedelta(days=31) else "week"
    step = step if span <= timedelta(days=183) else "month"
    labels = _labels(since, until, step)
    kinds = sorted({f.problem_type for f in facts}, key=str.casefold)
    series = {k: [0] * len(labels) for k in kinds}
    index = {label: i for i, label in enumerate(labels)}
    for f in facts:
        at = index.get(_label(f.created_at, step))
        if at is not None:
            series[f.problem_type][at] += 1
    return Timeline(step, labels, series)


def _labels(since: datetime, until: datetime, step: str) -> list[str]:
    labels: list[str] = []
    day = since.astimezone(UTC).date()
    last = (until.astimezone(UTC) - timedelta(seconds=1)).date()
    while day <= last:
        label = _label(datetime(day.year, day.month, day.day, tzinfo=UTC), step)
        if not labels or labels[-1] != label:
            labels.append(label)
        day += timedelta(days=1)
    return labels


def _label(at: datetime, step: str) -> str:
    d = at.astimezone(UTC).date()
    if step == "day":
        return d.isoformat()
    if step == "week":
        year, week, _ = d.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{d.year}-{d.month:02d}"
