"""GET /healthz and GET /metrics: for load balancers, monitors and Prometheus; no data about
any ECR or person, so no token."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gateway.web import health
from gateway.web.deps import Ctx

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz(ctx: Ctx) -> JSONResponse:
    """200 when the store and spool take writes and nothing is stuck; 503 and the problems
    otherwise. Always the backlogs: outbox, quarantine, each IMAP mailbox."""
    found = health.assess(ctx.stores().ops, ctx.settings, ctx.clock())
    return JSONResponse(found.report(), status_code=200 if found.ok else 503)


@router.get("/metrics", response_class=Response)
def metrics(ctx: Ctx) -> Response:
    """Prometheus text exposition, read from the database at scrape time."""
    body, content_type = ctx.metrics.exposition()
    return Response(body, media_type=content_type)
