"""The web side over real HTTP: the app under a real uvicorn on a loopback port, httpx as client.

The test's own App (its own SQLite connection) makes ECRs and reads what the server stored;
the server shares the data directory and the test's clock.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import App
from gateway.mail import tokens
from gateway.model import Status
from gateway.notify import compose
from gateway.store import db as store
from gateway.store.ops import Ops
from gateway.store.scores import Scores
from gateway.web.fresh import Fresh
from gateway.web.server import Running, serve_alone
from tests.conftest import Clock, ingest, mail, make_settings, run_cli

TOKEN = "ci-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"
GP = "Dr A <gp@practice.example>"
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


def web_settings(data_dir: Path, extra: dict[str, str] | None = None) -> Any:
    return make_settings(
        data_dir,
        {
            "ECR_GATEWAY_HTTP__PORT": "0",
            "ECR_GATEWAY_HTTP__API_TOKENS": json.dumps({"ci": TOKEN, "other": OTHER}),
            **(extra or {}),
        },
    )


@pytest.fixture
def server(data_dir: Path, clock: Clock, request: pytest.FixtureRequest) -> Iterator[Running]:
    extra = getattr(request, "param", None)
    running = serve_alone(web_settings(data_dir, extra), clock=clock)
    yield running
    running.stop()


@pytest.fixture
def http(server: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
def api(server: Running) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as client:
        yield client


# --- helpers --------------------------------------------------------------------------------


def new_ecr(app: App, **kw: Any) -> tuple[str, int]:
    result = ingest(app, mail(sender=kw.pop("sender", GP), **kw))
    ecr_id = app.queries.ecr_id(str(result.ref))
    assert ecr_id is not None
    return str(result.ref), ecr_id


def resolve(app: App, ecr_id: int) -> str:
    """Resolve; returns the path of the score link the resolution mail carries (score 4)."""
    app.staff.set_status(ecr_id, Status.RESOLVED, "Replaced the toner", "staff:cli")
    spec = app.db.value(
        "SELECT spec FROM outbox WHERE ecr_id = ? AND template = 'resolved' ORDER BY id DESC",
        [ecr_id],
    )
    _, context, _ = compose.read_spec(spec)
    url = context["score_links"][3]["url"]
    return "/" + url.split("/", 3)[3]


def resolved_ecr(app: App) -> tuple[str, int, str]:
    ref, ecr_id = new_ecr(app)
    return ref, ecr_id, resolve(app, ecr_id)


def token_of(path: str) -> str:
    return path.split("/")[2].split("?")[0]


def recorded(app: App, ecr_id: int) -> dict[str, Any]:
    return {
        "scores": app.db.rows("SELECT score, comment FROM scores WHERE ecr_id = ?", [ecr_id]),
        "events": app.db.value(
            "SELECT COUNT(*) FROM events WHERE ecr_id = ? AND kind = 'score'", [ecr_id]
        ),
        "ecr": app.db.row("SELECT score, score_comment FROM ecrs WHERE id = ?", [ecr_id]),
    }


NOTHING = {"scores": [], "events": 0, "ecr": {"score": None, "score_comment": None}}


def post(http: httpx.Client, path: str, score: str = "4", comment: str = "", **kw: Any) -> Any:
    return http.post(path, data={"score": score, "comment": comment}, **kw)


def assert_secure(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, response.url


# --- score pages: GET shows, records nothing ----------------------------------------------


def test_get_shows_the_reference_and_the_preselected_score_and_records_nothing(
    app: App, http: httpx.Client
) -> None:
    ref, ecr_id, path = resolved_ecr(app)
    page = http.get(path)
    assert page.status_code == 200
    assert ref in page.text
    assert re.search(r'value="4" checked', page.text)
    assert len(re.findall(r"checked", page.text)) == 1
    assert "<textarea" in page.text and page.text.count("<button") == 1
    assert "<script" not in page.text.lower()
    # Nothing of the ECR beyond its reference: not the subject, not who wrote it.
    assert "Printer broken" not in page.text and "gp@practice.example" not in page.text
    head = http.head(path)
    assert head.status_code == 200 and head.content == b""
    other = http.get(path.replace("score=4", "score=9"))
    assert other.status_code == 200 and "checked" not in other.text
    assert recorded(app, ecr_id) == NOTHING


def test_post_records_and_a_second_post_replaces_keeping_both_events(
    app: App, http: httpx.Client, api: httpx.Client
) -> None:
    ref, ecr_id, path = resolved_ecr(app)
    first = post(http, path, "2", "slow")
    assert first.status_code == 200 and "Thank you" in first.text
    second = post(http, path, "5", "fixed in the end")
    assert second.status_code == 200
    got = recorded(app, ecr_id)
    assert got["scores"] == [{"score": 5, "comment": "fixed in the end"}]
    assert got["events"] == 2
    shown = api.get(f"/api/ecrs/{ref}").json()
    assert (shown["score"], shown["score_comment"]) == (5, "fixed in the end")
    notes = [e["note"] for e in shown["events"] if e["kind"] == "score"]
    assert notes == ["score 2: slow", "score 5: fixed in the end"]
    assert {e["by"] for e in shown["events"] if e["kind"] == "score"} == {"gp@practice.example"}


def test_a_comment_is_stored_as_text_and_rendered_escaped(app: App, http: httpx.Client) -> None:
    _, ecr_id, path = resolved_ecr(app)
    evil = "<script>alert(1)</script>"
    page = post(http, path, "3", evil)
    assert page.status_code == 200
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert recorded(app, ecr_id)["ecr"]["score_comment"] == evil
    again = post(http, path, "", evil)  # no score: the form comes back with the comment
    assert again.status_code == 400 and "<script>" not in again.text
    assert "&lt;script&gt;" in again.text


# --- tokens that admit nothing --------------------------------------------------------------


def _tampered(token: str) -> str:
    last = "a" if token[-3] != "a" else "b"
    return token[:-3] + last + token[-2:]


@pytest.mark.parametrize("case", ["malformed", "tampered", "reply purpose", "unknown ECR"])
def test_bad_tokens_get_a_plain_400_and_record_nothing(
    app: App, http: httpx.Client, clock: Clock, case: str
) -> None:
    _, ecr_id, path = resolved_ecr(app)
    token = token_of(path)
    bad = {
        "malformed": "not-a-token",
        "tampered": _tampered(token),
        "reply purpose": tokens.issue(
            app.keys[0], tokens.Purpose.REPLY, ecr_id, 1, 1, clock(), timedelta(days=28)
        ),
        "unknown ECR": tokens.issue(
            app.keys[0], tokens.Purpose.SCORE, 999, 1, 1, clock(), timedelta(days=28)
        ),
    }[case]
    for response in (
        http.get(f"/score/{bad}?score=4"),
        http.head(f"/score/{bad}?score=4"),
        post(http, f"/score/{bad}?score=4"),
    ):
        assert response.status_code == 400, case
        assert_secure(response)
    page = http.get(f"/score/{bad}?score=4").text
    assert "not valid" in page and "<form" not in page
    assert recorded(app, ecr_id) == NOTHING


def test_an_expired_token_gets_410(app: App, http: httpx.Client, clock: Clock) -> None:
    _, ecr_id, path = resolved_ecr(app)
    clock.advance(days=27)
    assert http.get(path).status_code == 200
    clock.advance(days=2)
    assert http.get(path).status_code == 410
    assert post(http, path).status_code == 410
    assert "expired" in http.get(path).text
    assert recorded(app, ecr_id) == NOTHING


def test_a_reactivation_supersedes_the_earlier_resolutions_links(
    app: App, http: httpx.Client, clock: Clock
) -> None:
    ref, ecr_id, old = resolved_ecr(app)
    clock.advance(hours=1)
    reply = mail(subject=f"Re: [{ref}] Printer broken", body="Still broken after all.", sender=GP)
    assert ingest(app, reply).outcome == "updated"
    assert app.queries.ecr(ecr_id)["status"] == "reactivated"  # type: ignore[index]
    assert http.get(old).status_code == 410
    assert post(http, old).status_code == 410
    clock.advance(hours=1)
    new = resolve(app, ecr_id)
    assert http.get(old).status_code == 410, "resolved again: the old link stays dead"
    assert post(http, old).status_code == 410
    assert recorded(app, ecr_id) == NOTHING
    assert post(http, new, "5").status_code == 200
    assert app.db.rows("SELECT resolution_no, score FROM scores WHERE ecr_id = ?", [ecr_id]) == [
        {"resolution_no": 2, "score": 5}
    ]


# --- CSRF, rate limit, headers --------------------------------------------------------------


def test_cross_site_form_posts_are_refused(app: App, http: httpx.Client, server: Running) -> None:
    _, ecr_id, path = resolved_ecr(app)
    evil = post(http, path, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403
    fetched = post(http, path, headers={"Sec-Fetch-Site": "cross-site", "Origin": "null"})
    assert fetched.status_code == 403
    assert recorded(app, ecr_id) == NOTHING
    # Our own page: its no-referrer policy makes browsers send Origin: null.
    own = post(http, path, headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200
    assert post(http, path, headers={"Origin": server.url}).status_code == 200
    assert post(http, path, headers={"Origin": "http://127.0.0.1:8080"}).status_code == 200


@pytest.mark.parametrize(
    "server", [{"ECR_GATEWAY_HTTP__SCORE_POSTS_PER_MINUTE": "3"}], indirect=True
)
def test_posts_are_rate_limited_per_address(app: App, http: httpx.Client, clock: Clock) -> None:
    _, ecr_id, path = resolved_ecr(app)
    assert [post(http, path, str(n)).status_code for n in (1, 2, 3)] == [200, 200, 200]
    limited = post(http, path, "5")
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert_secure(limited)
    assert recorded(app, ecr_id)["scores"] == [{"score": 3, "comment": ""}]
    assert http.get(path).status_code == 200, "GET is not limited"


def test_security_headers_on_every_page(app: App, http: httpx.Client, clock: Clock) -> None:
    _, _, path = resolved_ecr(app)
    responses = [
        http.get(path),
        http.head(path),
        post(http, path, "4", "fine"),
        post(http, path, "x"),
        post(http, path, headers={"Origin": "https://evil.example"}),
        http.get("/score/garbage"),
        http.get("/static/page.css"),
        http.get("/api/ecrs"),
        http.get("/healthz"),
        http.get("/metrics"),
        http.get("/openapi.json"),
        http.get("/nowhere"),
    ]
    clock.advance(days=30)
    responses.append(http.get(path))
    for response in responses:
        assert_secure(response)
    page = responses[0].text
    # Nothing from anywhere else: the one stylesheet is ours, relative; no script at all.
    assert re.findall(r'(?:href|src)="([^"]+)"', page) == ["../static/page.css"]
    assert "style-src 'self'" in responses[0].headers["content-security-policy"]


# --- the staff API --------------------------------------------------------------------------


def test_api_without_or_with_a_wrong_token_is_401_and_no_data(app: App, http: httpx.Client) -> None:
    ref, _ = new_ecr(app)
    sha = _attach(app)[1]
    for path in (
        "/api/ecrs",
        f"/api/ecrs/{ref}",
        f"/api/ecrs/{ref}/attachments/{sha}",
        "/api/report",
    ):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
        ):
            response = http.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json() == {"detail": "a valid API token is required"}
            assert response.headers["www-authenticate"] == "Bearer"
    denied = http.post(f"/api/ecrs/{ref}/status", json={"status": "active"})
    assert denied.status_code == 401
    assert app.db.value("SELECT COUNT(*) FROM events WHERE by LIKE 'staff:api%'") == 0
    for token in (TOKEN, OTHER):
        ok = http.get(f"/api/ecrs/{ref}", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200


def test_api_json_is_exactly_the_clis(app: App, api: httpx.Client, data_dir: Path) -> None:
    ref, _ = new_ecr(app, attachments=[("screen.png", "image/png", b"\x89PNG fake")])
    new_ecr(app, subject="Zürich scanner", sender="Dr B <b@practice.example>")
    shown = api.get(f"/api/ecrs/{ref}")
    assert shown.headers["content-type"] == "application/json"
    cli = run_cli(data_dir, "ecr", "show", ref, "--json")
    assert shown.text == cli.stdout.decode().rstrip("\n")
    listed = api.get("/api/ecrs")
    cli = run_cli(data_dir, "ecr", "list", "--json")
    assert listed.text == cli.stdout.decode().rstrip("\n")
    assert api.get("/api/ecrs/ECR-999999").status_code == 404


def test_api_list_filters_search_and_pages(app: App, api: httpx.Client) -> None:
    refs = [
        new_ecr(app, subject=f"Problem {n}", sender=f"Dr {n} <d{n}@p.example>")[0] for n in range(5)
    ]
    for ref in refs[:3]:
        api.post(f"/api/ecrs/{ref}/status", json={"status": "pending", "note": "log please"})
    pending = api.get("/api/ecrs", params={"status": "pending"}).json()
    assert [e["ref"] for e in pending] == refs[:3]
    page = api.get("/api/ecrs", params={"status": "pending", "limit": 2})
    assert [e["ref"] for e in page.json()] == refs[:2]
    nxt = re.fullmatch(r'<([^>]+)>; rel="next"', page.headers["link"])
    assert nxt
    rest = api.get(nxt.group(1))
    assert [e["ref"] for e in rest.json()] == refs[2:3] and "link" not in rest.headers
    assert [e["ref"] for e in api.get("/api/ecrs", params={"contact": "d4@p.example"}).json()] == [
        refs[4]
    ]
    assert [e["ref"] for e in api.get("/api/ecrs", params={"q": "Dr 1"}).json()][:1] == [refs[1]]
    searched = api.get("/api/ecrs", params={"q": "Problem", "status": "active"}).json()
    assert sorted(e["ref"] for e in searched) == refs[3:]
    assert api.get("/api/ecrs", params={"status": "nonsense"}).status_code == 422
    assert api.get("/api/ecrs", params={"limit": 0}).status_code == 422


def test_api_status_change_causes_what_the_cli_causes(
    app: App, api: httpx.Client, data_dir: Path
) -> None:
    by_cli, cli_id = new_ecr(app, sender="Dr C <c@p.example>")
    by_api, api_id = new_ecr(app, sender="Dr D <d@p.example>")
    note = "Please send the error log"
    assert run_cli(data_dir, "ecr", "set-status", by_cli, "pending", "--note", note).returncode == 0
    changed = api.post(f"/api/ecrs/{by_api}/status", json={"status": "pending", "note": note})
    assert changed.status_code == 200 and changed.headers["x-notifications-queued"] == "1"
    assert changed.json()["status"] == "pending"

    def last_event(ecr_id: int) -> dict[str, Any]:
        return app.queries.ecr(ecr_id)["events"][-1]  # type: ignore[index]

    cli_event, api_event = last_event(cli_id), last_event(api_id)
    assert (cli_event["by"], api_event["by"]) == ("staff:cli", "staff:api:ci")
    for e in (cli_event, api_event):
        e.pop("by")
        e.pop("at")
    assert cli_event == api_event
    mails = app.db.rows("SELECT ecr_id, template FROM outbox WHERE template = 'pending'")
    assert sorted((m["ecr_id"], m["template"]) for m in mails) == [
        (cli_id, "pending"),
        (api_id, "pending"),
    ]
    refused = api.post(f"/api/ecrs/{by_api}/status", json={"status": "resolved"})
    assert refused.status_code == 400 and "note is required" in refused.json()["detail"]
    wrong = api.post(f"/api/ecrs/{by_api}/status", json={"status": "reactivated"})
    assert wrong.status_code == 422


def _attach(app: App, name: str = "ev<il>.html", ctype: str = "text/html") -> tuple[str, str]:
    data = b"<html><script>alert(1)</script></html>" + name.encode()
    ref, _ = new_ecr(app, attachments=[(name, ctype, data)], sender=f"x{len(name)}@p.example")
    return ref, hashlib.sha256(data).hexdigest()


def test_attachment_downloads_are_downloads(app: App, api: httpx.Client) -> None:
    ref, sha = _attach(app)
    got = api.get(f"/api/ecrs/{ref}/attachments/{sha}")
    assert got.status_code == 200
    assert got.headers["content-disposition"].startswith("attachment;")
    assert 'filename="ev_il_.html"' in got.headers["content-disposition"]
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-type"] == "application/octet-stream", "html is never served"
    assert "sandbox" in got.headers["content-security-policy"]
    assert hashlib.sha256(got.content).hexdigest() == sha
    png_ref, png_sha = _attach(app, "Bildschirm ä.png", "image/png")
    png = api.get(f"/api/ecrs/{png_ref}/attachments/{png_sha}")
    assert png.headers["content-type"] == "image/png"
    assert "filename*=UTF-8''Bildschirm%20%C3%A4.png" in png.headers["content-disposition"]
    assert api.get(f"/api/ecrs/{ref}/attachments/{png_sha}").status_code == 404, "other ECR's"
    assert api.get(f"/api/ecrs/{ref}/attachments/{'0' * 64}").status_code == 404
    assert api.get(f"/api/ecrs/{ref}/attachments/..%2Fsecret.key").status_code == 404


def test_the_openapi_document_is_served(http: httpx.Client) -> None:
    doc = http.get("/openapi.json")
    assert doc.status_code == 200
    spec = doc.json()
    assert spec["openapi"].startswith("3.")
    for path in (
        "/api/ecrs",
        "/api/ecrs/{ref}",
        "/api/ecrs/{ref}/status",
        "/api/ecrs/{ref}/attachments/{sha256}",
        "/api/report",
        "/healthz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert "EcrSummary" in spec["components"]["schemas"]
    assert http.get("/docs").status_code == 404, "the docs page would load a CDN's scripts"


# --- operations -----------------------------------------------------------------------------


def test_healthz_turns_503_when_the_spool_is_unwritable_and_back(
    http: httpx.Client, data_dir: Path
) -> None:
    ok = http.get("/healthz")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert ok.json()["spool"] == {"writable": True} and ok.json()["store"] == {"writable": True}
    # Root passes every permission check, so the spool's directory is swapped for a file
    # (as when its file system is gone); the probe must really try to write.
    spool, aside = data_dir / "spool", data_dir / "spool.aside"
    spool.rename(aside)
    spool.write_text("not a directory")
    try:
        bad = http.get("/healthz")
        assert bad.status_code == 503
        assert bad.json()["spool"]["writable"] is False
        assert any(p.startswith("spool not writable") for p in bad.json()["problems"])
    finally:
        spool.unlink()
        aside.rename(spool)
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "server",
    [{"ECR_GATEWAY_IMAP__MAILBOXES": json.dumps([{"name": "main", "poll_interval": 60}])}],
    indirect=True,
)
def test_healthz_reports_backlogs_and_stale_parts(
    app: App, http: httpx.Client, clock: Clock
) -> None:
    new_ecr(app)  # its acknowledgement waits in the outbox: nothing sends it here
    body = http.get("/healthz").json()
    assert body["outbox"] == {"queued": 1, "failed": 0, "oldest_unsent_age_seconds": 0.0}
    assert body["quarantine"] == {"size": 0}
    assert body["imap"] == [
        {"mailbox": "main", "last_success": None, "last_error": None, "reconnects": 0, "ok": True}
    ]
    app.db.execute(
        "INSERT INTO imap_state (mailbox, last_success, reconnects) VALUES ('main', ?, 2)",
        [clock().strftime("%Y-%m-%dT%H:%M:%SZ")],
    )
    assert http.get("/healthz").status_code == 200
    clock.advance(minutes=10)
    stale = http.get("/healthz")
    assert stale.status_code == 503
    assert any(p.startswith("imap main: last read") for p in stale.json()["problems"])
    clock.advance(hours=1)
    late = http.get("/healthz").json()
    assert any("notification has waited" in p for p in late["problems"])
    assert late["outbox"]["oldest_unsent_age_seconds"] == 4200.0


def test_metrics_count_what_is_stored(app: App, http: httpx.Client) -> None:
    raw = mail(message_id="<m1@p.example>")
    ingest(app, raw)
    ingest(app, raw, source="smtp")  # the same mail again: a duplicate
    _, _, path = resolved_ecr(app)
    post(http, path, "4")
    post(http, path, "5", headers={"Origin": "https://evil.example"})
    text = http.get("/metrics").text
    expected = [
        'ecr_gateway_mails_accepted_total{outcome="created",transport="ingest"} 2.0',
        'ecr_gateway_mails_accepted_total{outcome="duplicate",transport="smtp"} 1.0',
        'ecr_gateway_processing_latency_seconds_bucket{le="1.0"} 2.0',
        "ecr_gateway_processing_latency_seconds_count 2.0",
        'ecr_gateway_outbox_messages{state="queued"} 3.0',
        "ecr_gateway_quarantine_size 0.0",
        "ecr_gateway_score_submissions_total 1.0",
        'ecr_gateway_score_posts_refused_total{reason="cross_site"} 1.0',
    ]
    for line in expected:
        assert line in text.splitlines(), line
    assert "# TYPE ecr_gateway_imap_reconnects_total counter" in text


def test_api_report_json_and_csv(app: App, api: httpx.Client) -> None:
    new_ecr(app)
    got = api.get("/api/report", params={"since": "2026-11-01", "until": "2026-11-03"})
    assert got.status_code == 200
    assert got.json()["total"]["total"] == 1 and got.json()["since"] == "2026-11-01T00:00:00Z"
    csv = api.get("/api/report", params={"since": "2026-11-01", "format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[-1].startswith("all,1,0,0,0,1,")
    bad = api.get("/api/report", params={"since": "yesterday"})
    assert bad.status_code == 400 and "not a date" in bad.json()["detail"]


def test_a_kept_list_answer_never_outlives_a_commit(app: App, api: httpx.Client) -> None:
    ref, ecr_id = new_ecr(app)
    first = api.get("/api/ecrs", params={"status": "active"}).json()
    assert [e["ref"] for e in first] == [ref]
    assert api.get("/api/ecrs", params={"status": "active"}).json() == first
    # A commit by another connection (here the test's, as the worker process's would be).
    app.staff.set_status(ecr_id, Status.PENDING, "log please", "staff:cli")
    assert api.get("/api/ecrs", params={"status": "active"}).json() == []
    # A commit by the server itself, on one of its thread-pool connections.
    assert api.post(f"/api/ecrs/{ref}/status", json={"status": "active"}).status_code == 200
    assert [e["ref"] for e in api.get("/api/ecrs", params={"status": "active"}).json()] == [ref]


def test_a_kept_answer_is_dropped_by_its_own_connections_write(data_dir: Path) -> None:
    db = store.Database(data_dir / "gateway.db")
    fresh = Fresh(db)
    count = lambda: db.value("SELECT COUNT(*) FROM contacts")  # noqa: E731
    assert fresh.get("n", count) == 0
    db.execute("INSERT INTO contacts (email) VALUES ('a@p.example')")
    assert fresh.get("n", count) == 1
    db.close()


def test_responses_are_not_held_back_by_delayed_acks(http: httpx.Client) -> None:
    """A listening socket made without IPPROTO_TCP gets no TCP_NODELAY from asyncio, and
    every response written in two parts then waits ~40 ms for the client's delayed ACK."""
    times = []
    for _ in range(10):
        began = time.perf_counter()
        assert http.get("/static/page.css").status_code == 200
        times.append(time.perf_counter() - began)
    assert statistics.median(times) < 0.035, times


def test_the_metric_counters_are_backfilled_for_mails_before_the_migration(
    tmp_path: Path,
) -> None:
    old = store.Database(tmp_path / "old.db", migrate=False)
    old.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
    for version, step in enumerate(store.MIGRATIONS[:4], start=1):
        step(old)
        old.execute("INSERT INTO migrations VALUES (?, datetime('now'))", [version])
    for n, (source, outcome, took) in enumerate(
        [("smtp", "created", 0), ("imap:main", "created", 3), ("smtp", "quarantined", 7200)]
    ):
        old.execute(
            "INSERT INTO inbound (dedupe_key, source, received_at, size, spool_path, state, "
            "outcome, processed_at) VALUES (?, ?, '2026-11-02T09:00:00Z', 1, 'x', 'done', ?, "
            "strftime('%Y-%m-%dT%H:%M:%SZ', '2026-11-02T09:00:00Z', ?))",
            [f"k{n}", source, outcome, f"+{took} seconds"],
        )
    store.migrate(old)
    figures = Ops(old).figures()
    assert figures.accepted == {
        ("smtp", "created"): 1,
        ("imap", "created"): 1,
        ("smtp", "quarantined"): 1,
    }
    assert figures.latency.count == 3 and figures.latency.total == 7203
    assert dict(figures.latency.buckets)[1.0] == 1 and dict(figures.latency.buckets)[5.0] == 2
    assert dict(figures.latency.buckets)[3600.0] == 2 and figures.latency.buckets[-1][1] == 3
    old.close()


def test_a_score_is_not_written_once_its_resolution_is_gone(app: App, clock: Clock) -> None:
    """The token is checked, then the write re-checks inside its transaction: a reactivation
    committed in between leaves nothing recorded."""
    _, ecr_id, _ = resolved_ecr(app)
    contact = app.db.value("SELECT requester_id FROM ecrs WHERE id = ?", [ecr_id])
    app.staff.set_status(ecr_id, Status.ACTIVE, "", "staff:cli")
    assert not Scores(app.db).record(ecr_id, contact, 1, 5, "", "gp@practice.example", clock())
    assert recorded(app, ecr_id) == NOTHING
