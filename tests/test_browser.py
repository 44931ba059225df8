"""End to end in a real browser: a resolution mail captured by the test relay, its score link
opened in headless Chromium (Debian's, driven by Playwright), a comment typed, the button
pressed, and the score read back from the store."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway.app import App, build_app
from gateway.model import Status
from gateway.web.server import Running, bind, serve_alone
from tests.conftest import ingest, mail, make_settings
from tests.relay import Relay

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does where it can)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

# Playwright's own browser download does not work here: launch the system's Chromium.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def site(data_dir: Path) -> Iterator[tuple[App, Relay, Running]]:
    relay = Relay().start()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    settings = make_settings(
        data_dir,
        {
            "ECR_GATEWAY_GATEWAY__BASE_URL": f"http://127.0.0.1:{port}",
            "ECR_GATEWAY_OUTBOUND__RELAY_HOST": "127.0.0.1",
            "ECR_GATEWAY_OUTBOUND__RELAY_PORT": str(relay.port),
            "ECR_GATEWAY_OUTBOUND__SECURITY": "none",
        },
    )
    app = build_app(settings)
    web = serve_alone(settings, sock=sock)
    yield app, relay, web
    web.stop()
    app.close()
    relay.stop()


def html_part(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]


def test_score_from_the_mail_in_a_real_browser(site: tuple[App, Relay, Running]) -> None:
    app, relay, web = site
    ref = str(ingest(app, mail(sender="Dr A <gp@practice.example>")).ref)
    ecr_id = app.queries.ecr_id(ref) or 0
    app.staff.set_status(ecr_id, Status.RESOLVED, "Replaced the toner", "staff:cli")
    app.sender().run_once()
    [resolved] = [c.message for c in relay.captured if "resolved" in html_part(c.message)]
    links = re.findall(r'href="([^"]+/score/[^"]+)"', html_part(resolved))
    assert len(links) == 5
    link = links[1].replace("&amp;", "&")  # the "2 = poor" link
    assert link.startswith(web.url) and link.endswith("score=2")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            hosts: set[str] = set()
            page.on("request", lambda r: hosts.add(urlsplit(r.url).netloc))
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(link)
            assert page.title() == f"Score {ref}"
            assert page.is_checked('input[name="score"][value="2"]')
            # Our stylesheet loaded under the strict CSP.
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(246, 247, 249)"
            page.fill("#comment", "Took a while, but <b>fixed</b>.")
            page.click("button[type=submit]")
            page.wait_for_selector("text=Thank you")
            assert "Took a while, but <b>fixed</b>." in page.inner_text(".comment")
        finally:
            browser.close()

    assert hosts == {urlsplit(web.url).netloc}, "nothing loaded from anywhere else"
    assert problems == [], problems
    shown = app.queries.ecr(ecr_id)
    assert shown is not None
    assert (shown["score"], shown["score_comment"]) == (2, "Took a while, but <b>fixed</b>.")
