"""The score pages (PRODUCT §4): GET and HEAD show, only POST records.

Mail security gateways open every link in a mail, so a GET must never change anything: it
shows the reference, the score from the link preselected, a comment box and one button. The
token in the path is the capability; a cross-site form post is still refused by its Origin /
Sec-Fetch-Site, and POSTs are rate-limited per client address.
"""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from gateway.web import scoring
from gateway.web.context import Context
from gateway.web.deps import Ctx
from gateway.web.scoring import Refused

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


@router.api_route("/score/{token}", methods=["GET", "HEAD"], response_class=HTMLResponse)
def show(token: str, ctx: Ctx, score: str | None = None) -> Response:
    """The form; records nothing."""
    stores = ctx.stores()
    try:
        ticket = scoring.admit(ctx.keys, token, stores.scores, ctx.clock())
    except Refused as refused:
        return refusal(ctx, refused)
    return _form(ctx, stores.queries.ref(ticket.ecr_id), scoring.score_value(score), "", "")


@router.post("/score/{token}", response_class=HTMLResponse)
def submit(
    token: str,
    request: Request,
    ctx: Ctx,
    score: Annotated[str, Form()] = "",
    comment: Annotated[str, Form(max_length=20_000)] = "",
) -> Response:
    """Records or replaces this contact's score for this resolution, then thanks."""
    turned_away = _gatekeep(request, ctx)
    if turned_away is not None:
        return turned_away
    stores = ctx.stores()
    try:
        ticket = scoring.admit(ctx.keys, token, stores.scores, ctx.clock())
    except Refused as refused:
        ctx.metrics.refuse("token")
        return refusal(ctx, refused)
    ref = stores.queries.ref(ticket.ecr_id)
    value, text = scoring.score_value(score), scoring.clean_comment(comment)
    if value is None:
        return _form(ctx, ref, None, text, "Please choose a score from 1 to 5.", status=400)
    if not stores.scores.record(
        ticket.ecr_id, ticket.contact_id, ticket.resolution_no, value, text, ticket.by, ctx.clock()
    ):
        return refusal(ctx, scoring.superseded())
    log.info("%s: score %d recorded", ref, value)
    return _page(ctx, "thanks.html", {"ref": ref, "score": value, "comment": text})


@router.get("/static/page.css")
def stylesheet(ctx: Ctx) -> Response:
    return Response(ctx.pages.render("page.css", {}), media_type="text/css")


@router.get("/favicon.ico")
def favicon() -> Response:
    """Browsers ask for it on every page; nothing, rather than a 404 in their console."""
    return Response(status_code=204)


def _gatekeep(request: Request, ctx: Context) -> Response | None:
    """A refusal for a cross-site post or a client over its rate, else None."""
    if cross_site(request, ctx.settings.gateway.base_url):
        ctx.metrics.refuse("cross_site")
        return refusal(ctx, Refused(403, "Not allowed", "This form must be sent from its page."))
    client = request.client.host if request.client else "?"
    wait = ctx.score_limit.check(client)
    if wait:
        ctx.metrics.refuse("rate_limit")
        page = refusal(ctx, Refused(429, "Too many requests", "Please try again in a minute."))
        page.headers["Retry-After"] = str(int(wait) + 1)
        return page
    return None


def cross_site(request: Request, base_url: str) -> bool:
    """Browsers say where a form post comes from: Sec-Fetch-Site where they send it, and
    Origin. Our own page sends `Origin: null` (its Referrer-Policy is no-referrer), so only a
    real origin other than ours, or a fetch site other than our own, counts as cross-site."""
    site = request.headers.get("sec-fetch-site", "")
    if site in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("origin", "")
    if not origin or origin == "null":
        return False
    here = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    ours = {_origin(base_url), here}
    return origin.lower().rstrip("/") not in ours


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _form(
    ctx: Context, ref: str, score: int | None, comment: str, error: str, status: int = 200
) -> Response:
    context = {
        "ref": ref,
        "choices": scoring.choices(score),
        "comment": comment,
        "max_comment": scoring.MAX_COMMENT,
        "error": error,
    }
    return _page(ctx, "score.html", context, status)


def refusal(ctx: Context, refused: Refused) -> Response:
    return _page(
        ctx, "refused.html", {"title": refused.title, "message": refused.message}, refused.status
    )


def _page(ctx: Context, name: str, context: dict[str, object], status: int = 200) -> Response:
    return HTMLResponse(ctx.pages.render(name, context), status_code=status)
