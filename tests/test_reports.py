"""Reports: the figures of a hand-computed fixture set, made through the real pipeline with a
settable clock, checked in all three formats, by the CLI, and drawn as a chart."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import reports
from gateway.app import App
from gateway.model import Status
from gateway.store import reports as report_facts
from gateway.store.scores import Scores
from tests.conftest import Clock, ingest, mail, run_cli

SINCE = datetime(2026, 11, 1, tzinfo=UTC)
UNTIL = datetime(2026, 11, 8, tzinfo=UTC)
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
H = 3600.0


def create(app: App, clock: Clock, at: datetime, kind: str, who: str, cc: str = "") -> int:
    clock.now = at
    body = f"Problem Type: {kind}\n\nSomething is wrong." if kind else "Something is wrong."
    result = ingest(app, mail(subject=f"{kind} {who}", body=body, sender=who, cc=cc))
    ecr_id = app.queries.ecr_id(str(result.ref))
    assert ecr_id is not None
    return ecr_id


def staff(app: App, clock: Clock, ecr_id: int, at: datetime, status: Status) -> None:
    clock.now = at
    app.staff.set_status(ecr_id, status, "note", "staff:cli")


def score(app: App, ecr_id: int, email: str, value: int, at: datetime) -> None:
    contact = app.db.value("SELECT id FROM contacts WHERE email = ?", [email])
    resolution = app.db.value("SELECT resolution_no FROM ecrs WHERE id = ?", [ecr_id])
    Scores(app.db).record(ecr_id, contact, resolution, value, "", email, at)


@pytest.fixture
def fixture_set(app: App, clock: Clock) -> App:
    """The set the expected figures below were worked out from by hand.

    LV-1  created T0,     pending +2h (first response), resolved +26h, score 4
    LV-2  created T0+1h,  resolved +5h, reactivated by mail +6h, resolved +10h, score 2
    PCS   created T0+2h,  never touched
    Gen   created T0+3h,  resolved +1h; scored 5 by the requester and 3 by the Cc'd manager
    and two ECRs outside the period (before and after), which must count nowhere.
    """
    create(app, clock, datetime(2026, 10, 30, tzinfo=UTC), "LV", "old@p.example")
    lv1 = create(app, clock, T0, "LV", "a@p.example")
    staff(app, clock, lv1, T0 + timedelta(hours=2), Status.PENDING)
    staff(app, clock, lv1, T0 + timedelta(hours=26), Status.RESOLVED)
    score(app, lv1, "a@p.example", 4, T0 + timedelta(hours=27))
    lv2 = create(app, clock, T0 + timedelta(hours=1), "LV", "b@p.example")
    staff(app, clock, lv2, T0 + timedelta(hours=6), Status.RESOLVED)
    clock.now = T0 + timedelta(hours=7)
    reply = mail(subject=f"Re: [ECR-{lv2:06d}]", body="Still broken.", sender="b@p.example")
    assert ingest(app, reply).outcome == "updated"
    assert app.db.value("SELECT status FROM ecrs WHERE id = ?", [lv2]) == "reactivated"
    staff(app, clock, lv2, T0 + timedelta(hours=11), Status.RESOLVED)
    score(app, lv2, "b@p.example", 2, T0 + timedelta(hours=12))
    create(app, clock, T0 + timedelta(hours=2), "PCS", "c@p.example")
    gen = create(app, clock, T0 + timedelta(hours=3), "", "d@p.example", cc="pm@p.example")
    staff(app, clock, gen, T0 + timedelta(hours=4), Status.RESOLVED)
    score(app, gen, "d@p.example", 5, T0 + timedelta(hours=5))
    score(app, gen, "pm@p.example", 3, T0 + timedelta(hours=5))
    create(app, clock, datetime(2026, 11, 8, tzinfo=UTC), "LV", "late@p.example")
    return app


def test_figures_match_the_hand_computed_ones(fixture_set: App) -> None:
    found = report_facts.facts(fixture_set.db, SINCE, UNTIL)
    got = reports.as_json(reports.compute(found, SINCE, UNTIL))
    lines = {x["problem_type"]: x for x in got["problem_types"]}
    assert list(lines) == ["General", "LV", "PCS"]
    assert lines["LV"] == {
        "problem_type": "LV",
        **{"active": 0, "pending": 0, "resolved": 2, "reactivated": 0},
        "total": 2,
        "median_first_response_seconds": (2 * H + 5 * H) / 2,
        "median_resolution_seconds": (26 * H + 5 * H) / 2,
        "ever_resolved": 2,
        "ever_reactivated": 1,
        "reactivation_rate": 0.5,
        "average_score": 3.0,
        "scores": 2,
    }
    assert lines["PCS"] == {
        "problem_type": "PCS",
        **{"active": 1, "pending": 0, "resolved": 0, "reactivated": 0},
        "total": 1,
        "median_first_response_seconds": None,
        "median_resolution_seconds": None,
        "ever_resolved": 0,
        "ever_reactivated": 0,
        "reactivation_rate": None,
        "average_score": None,
        "scores": 0,
    }
    assert lines["General"]["median_first_response_seconds"] == 1 * H
    assert lines["General"]["average_score"] == 4.0 and lines["General"]["scores"] == 2
    assert got["total"] == {
        "problem_type": "all",
        **{"active": 1, "pending": 0, "resolved": 3, "reactivated": 0},
        "total": 4,
        "median_first_response_seconds": 2 * H,  # of 2h, 5h, 1h
        "median_resolution_seconds": 5 * H,  # of 26h, 5h, 1h
        "ever_resolved": 3,
        "ever_reactivated": 1,
        "reactivation_rate": pytest.approx(1 / 3),
        "average_score": 3.5,  # (4 + 2 + 5 + 3) / 4
        "scores": 4,
    }
    assert got["since"] == "2026-11-01T00:00:00Z" and got["until"] == "2026-11-08T00:00:00Z"


def test_the_breakdown_over_time(fixture_set: App) -> None:
    found = report_facts.facts(fixture_set.db, SINCE, UNTIL)
    line = reports.timeline(found, SINCE, UNTIL)
    assert line.step == "day"
    assert line.labels == [f"2026-11-0{d}" for d in range(1, 8)]
    assert line.series == {
        "General": [0, 1, 0, 0, 0, 0, 0],
        "LV": [0, 2, 0, 0, 0, 0, 0],
        "PCS": [0, 1, 0, 0, 0, 0, 0],
    }
    assert reports.timeline(found, SINCE, SINCE + timedelta(days=90)).step == "week"
    months = reports.timeline(found, SINCE, SINCE + timedelta(days=400))
    assert months.step == "month" and months.labels[:2] == ["2026-11", "2026-12"]


def test_the_cli_prints_table_csv_and_json_and_draws_the_chart(
    fixture_set: App, data_dir: Path, tmp_path: Path
) -> None:
    period = ["--since", "2026-11-01", "--until", "2026-11-08"]
    as_json = run_cli(data_dir, "report", *period, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["total"]["average_score"] == 3.5
    as_csv = run_cli(data_dir, "report", *period, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout.decode())))
    assert [r["problem_type"] for r in rows] == ["General", "LV", "PCS", "all"]
    assert rows[1]["median_resolution_seconds"] == str(15.5 * H)
    assert rows[2]["average_score"] == "" and rows[3]["scores"] == "4"
    chart = tmp_path / "types.png"
    table = run_cli(data_dir, "report", *period, "--chart", str(chart))
    assert table.returncode == 0, table.stderr
    text = table.stdout.decode()
    assert "ECRs created 2026-11-01T00:00:00Z .. 2026-11-08T00:00:00Z" in text
    all_line = text.splitlines()[-1].split()
    assert all_line[:6] == ["all", "1", "0", "3", "0", "4"]
    assert all_line[6:10] == ["2.0", "h", "5.0", "h"] and all_line[10:] == ["33%", "3.50", "4"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


def test_bad_periods_are_one_line_errors(data_dir: Path) -> None:
    empty = run_cli(data_dir, "report", "--since", "2026-11-08", "--until", "2026-11-01")
    assert empty.returncode == 64 and b"period is empty" in empty.stderr
    wrong = run_cli(data_dir, "report", "--since", "last week")
    assert wrong.returncode == 64 and b"not a date" in wrong.stderr
    assert b"Traceback" not in empty.stderr + wrong.stderr


def test_pure_figures_from_facts() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    facts = [
        reports.EcrFacts(
            "A", "resolved", at, at + timedelta(minutes=m), at + timedelta(hours=m), m == 3, (m,)
        )
        for m in (1, 3, 5, 7)
    ]
    x = reports.compute(facts, at, at + timedelta(days=1)).total
    assert x.median_first_response_seconds == 4 * 60  # even count: the mean of the middle two
    assert x.median_resolution_seconds == 4 * H
    assert (x.ever_resolved, x.ever_reactivated, x.reactivation_rate) == (4, 1, 0.25)
    assert (x.average_score, x.scores) == (4.0, 4)
    empty = reports.compute([], at, at + timedelta(days=1))
    assert empty.lines == [] and empty.total.total == 0 and empty.total.average_score is None
    assert "all" in reports.as_table(empty)
