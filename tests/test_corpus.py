"""The golden corpus: each fixtures/corpus/NAME.eml is ingested into the same seeded world and
its outcome compared with NAME.json (see fixtures/corpus/README.md for the keys)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.mail import tokens
from gateway.model import Envelope, Status
from tests.conftest import FIXTURES, Clock, ingest, mail

CORPUS = FIXTURES / "corpus"
CASES = sorted(CORPUS.glob("*.eml"))


def seed(app: App, clock: Clock) -> None:
    """ECR-000001 active (gp@, pm@ on Cc), -000002 resolved 2 days ago, -000003 resolved 31
    days ago, -000004 pending; the test itself runs on 2026-11-02 09:00 UTC."""
    now = clock.now
    clock.now = now - timedelta(days=32)
    ingest(app, mail("Printer broken", "The printer is broken.", "Dr A <gp@practice.example>",
                     cc="Practice Manager <pm@practice.example>",
                     message_id="<seed-1@practice.example>"))
    ingest(app, mail("Login fails", "I cannot log in.", "D M <dm@surgery.example>",
                     message_id="<seed-2@surgery.example>"))
    ingest(app, mail("Scanner", "The scanner jams.", "Nurse N <nurse@clinic.example>",
                     message_id="<seed-3@clinic.example>"))
    ingest(app, mail("Lab results missing", "No lab results since Monday.",
                     "Dr A <gp@practice.example>", message_id="<seed-4@practice.example>"))
    clock.advance(days=1)
    app.staff.set_status(3, Status.RESOLVED, "Cleaned the rollers", "staff:cli")
    clock.now = now - timedelta(days=2)
    app.staff.set_status(2, Status.RESOLVED, "Password reset", "staff:cli")
    app.staff.set_status(4, Status.PENDING, "Which patient?", "staff:cli")
    clock.now = now


def load_case(path: Path, app: App, clock: Clock) -> tuple[bytes, dict[str, Any]]:
    expected = json.loads(path.with_suffix(".json").read_text())
    raw = path.read_bytes()
    if "token" in expected:
        t = expected["token"]
        contact = app.db.value("SELECT id FROM contacts WHERE email = ?", [t["contact"]])
        key = app.keys[0] if not t.get("wrong_key") else b"x" * 32
        text = tokens.issue(key, tokens.Purpose[t.get("purpose", "REPLY")], t["ecr"], contact or 0,
                            0, clock.now, timedelta(days=t.get("days", 30)))
        raw = raw.replace(b"{{TOKEN}}", text.encode())
    return raw, expected


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_corpus(path: Path, app: App, clock: Clock) -> None:
    seed(app, clock)
    raw, exp = load_case(path, app, clock)
    env = Envelope(raw, exp.get("source", "ingest"), exp.get("mail_from", ""),
                   tuple(exp.get("rcpt_tos", ["support@localhost"])))
    result = app.pipeline.ingest(env)
    assert str(result.outcome) == exp["outcome"], result
    if "ref" in exp:
        assert result.ref == exp["ref"], result
    if "rung" in exp:
        assert (str(result.rung) if result.rung else None) == exp["rung"], result
    if "reason_contains" in exp:
        assert exp["reason_contains"] in result.reason, result
    if result.ref:
        check_ecr(app, result.ref, result.inbound_id, exp)
    else:
        assert not any(k in exp for k in ("new_text", "attachments", "status")), "no ECR to check"


def check_ecr(app: App, ref: str, inbound_id: int, exp: dict[str, Any]) -> None:
    ecr = app.queries.ecr(app.queries.ecr_id(ref) or 0)
    assert ecr is not None
    for key in ("status", "related_to", "problem_type", "subject"):
        if key in exp:
            assert ecr[key] == exp[key], (key, ecr[key])
    if "requester" in exp:
        assert (ecr["requester"] or {}).get("email") == exp["requester"]
    if "participants" in exp:
        assert sorted(ecr["participants"]) == sorted(exp["participants"])
    mine = [u for u in ecr["updates"] if u["id"] == _update_id(app, inbound_id)]
    if not any(k in exp for k in ("new_text", "new_text_contains", "new_text_excludes",
                                   "attachments", "automatic")):
        return
    assert len(mine) == 1, "the mail left no update"
    update = mine[0]
    if "new_text" in exp:
        assert update["text"] == exp["new_text"]
    for part in exp.get("new_text_contains", []):
        assert part in update["text"]
    for part in exp.get("new_text_excludes", []):
        assert part not in update["text"]
    if "automatic" in exp:
        assert update["automatic"] is exp["automatic"]
    if "attachments" in exp:
        got = [{k: a[k] for k in ("filename", "sha256")} for a in update["attachments"]]
        want = [{k: a[k] for k in ("filename", "sha256") if k in a} for a in exp["attachments"]]
        assert [{k: g[k] for k in w} for g, w in zip(got, want, strict=False)] == want
        assert len(got) == len(want)


def _update_id(app: App, inbound_id: int) -> int:
    return int(app.db.value("SELECT id FROM updates WHERE inbound_id = ?", [inbound_id]) or 0)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40, f"only {len(CASES)} corpus mails"
    for path in CASES:
        assert path.with_suffix(".json").exists(), f"{path.name} has no expected-values file"
