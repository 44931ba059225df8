"""The ASGI app: score pages, the staff API, health and metrics, behind security headers.

FastAPI for its OpenAPI document (served at /openapi.json) and its request validation. The
interactive docs pages are off: they load scripts from a CDN, and our pages load nothing from
third parties.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI

from gateway.config import Settings
from gateway.pipeline import Clock, utcnow
from gateway.web import api, monitor, pages
from gateway.web.context import Context
from gateway.web.headers import SecurityHeaders

DESCRIPTION = """The staff API of ecr-gateway (PRODUCT §5.2): the same JSON as the CLI's
`--json` output. Every `/api` route needs `Authorization: Bearer <token>` with a token from
`http.api_tokens`."""


def create_app(
    settings: Settings, environ: Mapping[str, str] | None = None, clock: Clock = utcnow
) -> FastAPI:
    context = Context(settings, environ, clock)
    context.check()
    app = FastAPI(
        title="ecr-gateway",
        version="1",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(monitor.router)
    app.add_middleware(SecurityHeaders)
    return app
