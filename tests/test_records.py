"""What applying a mail writes: an ECR's searchable people and its timestamps, whichever way
its participants arrive."""

from __future__ import annotations

from gateway.app import App
from tests.conftest import Clock, ingest, mail


def people(app: App, ecr_id: int) -> str:
    return str(app.db.value("SELECT people FROM ecrs WHERE id = ?", [ecr_id]))


def recomputed(app: App, ecr_id: int) -> str:
    rows = app.db.rows(
        "SELECT c.name, c.email FROM participants p JOIN contacts c ON c.id = p.contact_id "
        "WHERE p.ecr_id = ?", [ecr_id])
    return " ".join(f"{r['name']} {r['email']}".strip() for r in rows)


def found(app: App, text: str) -> set[int]:
    """The ECRs whose search index (not their stored row) holds `text`."""
    rows = app.db.rows("SELECT rowid FROM ecrs_fts WHERE ecrs_fts MATCH ?", [text])
    return {int(r["rowid"]) for r in rows}


def test_a_new_ecr_is_found_by_its_requesters_and_ccs_names(app: App) -> None:
    result = ingest(app, mail("Printer", "Broken.", "Dr Alice Abbot <alice@practice.example>",
                              cc="Bob Builder <bob@practice.example>, carol@practice.example"))
    ecr_id = app.queries.ecr_id(result.ref)
    assert ecr_id is not None
    assert people(app, ecr_id) == recomputed(app, ecr_id)
    assert {"Abbot", "alice", "Builder"} <= set(people(app, ecr_id).replace("@", " ").split())
    for name in ("Abbot", "Builder", "carol"):
        assert found(app, name) == {ecr_id}
    row = app.db.row("SELECT created_at, updated_at FROM ecrs WHERE id = ?", [ecr_id])
    assert row is not None and row["created_at"] == row["updated_at"]


def test_a_reply_adding_people_makes_them_searchable(app: App, clock: Clock) -> None:
    first = ingest(app, mail("Scanner", "Jams.", "Dr Alice Abbot <alice@practice.example>",
                             message_id="<first@practice.example>"))
    ecr_id = app.queries.ecr_id(first.ref)
    assert ecr_id is not None
    clock.advance(hours=1)
    ingest(app, mail("Re: Scanner", "Still jams.", "Dr Alice Abbot <alice@practice.example>",
                     cc="Dana Dunn <dana@practice.example>",
                     in_reply_to="<first@practice.example>"))
    assert people(app, ecr_id) == recomputed(app, ecr_id)
    assert found(app, "Dunn") == {ecr_id}
    row = app.db.row("SELECT created_at, updated_at FROM ecrs WHERE id = ?", [ecr_id])
    assert row is not None and row["updated_at"] > row["created_at"]


def test_a_known_contact_keeps_its_name_when_a_mail_gives_none(app: App) -> None:
    ingest(app, mail("One", "x", "Erin Eve <erin@practice.example>"))
    second = ingest(app, mail("Two", "y", "erin@practice.example"))
    ecr_id = app.queries.ecr_id(second.ref)
    assert ecr_id is not None
    assert people(app, ecr_id) == "Erin Eve erin@practice.example" == recomputed(app, ecr_id)
