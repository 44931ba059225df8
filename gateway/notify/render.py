"""Notification text and HTML, and the web pages, from Jinja2 templates; the only module that
imports jinja2.

Our templates live in `templates/mail/` and `templates/pages/`; `templates.folder` may override
any of them file by file. Every template is rendered once against sample data at start-up
(`check()`), so a broken override stops `serve` with one clear line instead of failing when a
practice waits for a mail or opens a score link.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

BUILTIN = Path(__file__).resolve().parents[2] / "templates"
TEMPLATES = ("created", "staff_update", "pending", "reactivated", "resolved", "oversize")

SAMPLE: dict[str, Any] = {
    "ref": "ECR-000001",
    "subject": "Sample subject",
    "name": "Dr Sample",
    "note": "A note",
    "text": "Sample update text",
    "author": "gp@practice.example",
    "status": "active",
    "named_missing": "ECR-000999",
    "team_name": "Support",
    "reopen_days": 14,
    "score_links": [
        {"score": n, "label": "label", "url": f"http://127.0.0.1/score/t?score={n}"}
        for n in range(1, 6)
    ],
    "size_mb": 60,
    "limit_mb": 50,
}


class TemplateProblem(Exception):
    """A template that does not load or render; the message names the file."""


@dataclass(frozen=True)
class Rendered:
    text: str
    html: str


class Renderer:
    def __init__(self, override: Path | None = None) -> None:
        loaders: list[jinja2.BaseLoader] = [jinja2.FileSystemLoader(str(BUILTIN))]
        if override:
            loaders.insert(0, jinja2.FileSystemLoader(str(override)))
        # No auto_reload: the templates `check()` rendered are the ones mails use until the next
        # start, and no mail pays for a stat of its template files.
        self.text_env = _env(loaders, autoescape=False, auto_reload=False)
        self.html_env = _env(loaders, autoescape=True, auto_reload=False)

    def render(self, name: str, context: dict[str, Any]) -> Rendered:
        text = self.text_env.get_template(f"mail/{name}.txt").render(context)
        html = self.html_env.get_template(f"mail/{name}.html").render(context)
        return Rendered(text.strip() + "\n", html)

    def check(self) -> None:
        for name in TEMPLATES:
            try:
                self.render(name, SAMPLE)
            except jinja2.TemplateError as exc:
                where = getattr(exc, "filename", None) or getattr(exc, "name", None) or name
                line = getattr(exc, "lineno", None)
                at = f"{where}:{line}" if line else str(where)
                raise TemplateProblem(f"template {at}: {exc.message or exc}") from None


PAGES: dict[str, dict[str, Any]] = {
    "score.html": {
        "ref": "ECR-000001",
        "choices": [{"score": n, "label": "label", "checked": n == 3} for n in range(1, 6)],
        "comment": "",
        "max_comment": 2000,
        "error": "",
    },
    "thanks.html": {"ref": "ECR-000001", "score": 4, "comment": "A comment"},
    "refused.html": {"title": "Link not valid", "message": "This link is not valid."},
    "page.css": {},
}


class PageRenderer:
    """Server-rendered pages (`templates/pages/`), always autoescaped: a comment or any other
    text from a practice can never become markup."""

    def __init__(self, override: Path | None = None) -> None:
        loaders: list[jinja2.BaseLoader] = [jinja2.FileSystemLoader(str(BUILTIN))]
        if override:
            loaders.insert(0, jinja2.FileSystemLoader(str(override)))
        self.env = _env(loaders, autoescape=True)

    def render(self, name: str, context: dict[str, Any]) -> str:
        return self.env.get_template(f"pages/{name}").render(context)

    def check(self) -> None:
        for name, sample in PAGES.items():
            try:
                self.render(name, sample)
            except jinja2.TemplateError as exc:
                raise TemplateProblem(f"template pages/{name}: {exc.message or exc}") from None


def _env(
    loaders: list[jinja2.BaseLoader], autoescape: bool, auto_reload: bool = True
) -> jinja2.Environment:
    # StrictUndefined: a misspelt variable is an error at the start-up check, not a blank.
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        auto_reload=auto_reload,
    )
