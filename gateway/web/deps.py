"""The request's share of the process: the Context the routes depend on."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.web.context import Context


async def context(request: Request) -> Context:
    # async: FastAPI runs a plain-def dependency on the thread pool, a hop for one lookup.
    ctx: Context = request.app.state.context
    return ctx


Ctx = Annotated[Context, Depends(context)]
