"""The staff API (PRODUCT §5.2): the CLI's reads and status changes over HTTP, same JSON.

Every route needs `Authorization: Bearer <token>` with a token from `http.api_tokens`; without
one the answer is 401 and nothing else. Status changes go through the same Staff call as the
CLI, so they cause the same events and mails; the event names the token (`staff:api:NAME`).
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from gateway import reports
from gateway.model import Status
from gateway.staff import StaffError
from gateway.store import attachments
from gateway.store import reports as report_facts
from gateway.store.queries import Queries
from gateway.web import schemas
from gateway.web.context import Context
from gateway.web.deps import Ctx

log = logging.getLogger(__name__)

SEARCH_CAP = 1000  # full-text matches considered per search, best first (the CLI takes 200)
SHA256 = re.compile(r"[0-9a-f]{64}")
# Types a browser would run or render as a document: served as plain bytes instead.
ACTIVE_TYPES = re.compile(r"html|xml|javascript|ecmascript|svg|xhtml", re.I)
FALLBACK_CHARS = frozenset(string.ascii_letters + string.digits + " ._-()+,")
SIMPLE_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", re.I)

bearer = HTTPBearer(auto_error=False, description="A token from http.api_tokens")
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.Problem, "description": "No valid API token"}
}
router = APIRouter(prefix="/api", tags=["staff"], responses=UNAUTHORIZED)


async def staff_name(
    ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    # async: no I/O here, and a plain def would cost a thread-pool hop on every request.
    token = credentials.credentials if credentials else ""
    name = ctx.api_tokens.name(f"Bearer {token}") if token else None
    if name is None:
        raise HTTPException(
            401, "a valid API token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    return name


Who = Annotated[str, Depends(staff_name)]


@router.get("/ecrs", response_model=None, responses={200: {"model": list[schemas.EcrSummary]}})
async def list_ecrs(
    request: Request,
    ctx: Ctx,
    who: Who,
    status: Status | None = None,
    contact: Annotated[str | None, Query(description="Part of a contact's name or address")] = None,
    problem_type: str | None = None,
    q: Annotated[str | None, Query(description="Full-text search, as `ecr search`")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """`ecr list --json` / `ecr search --json`, one page at a time. A full page carries a
    `Link: <…>; rel="next"` header."""
    s = status.value if status else None
    if q or contact:
        # Full-text matching costs what the words cost: on the thread pool.
        page = await run_in_threadpool(_searched, ctx, q, s, contact, problem_type, limit, offset)
    else:
        # A page of an indexed listing is a bounded read, and WAL readers never wait for
        # writers: done right here, without a thread hop (and the GIL handover it costs).
        page = _listed(ctx, s, problem_type, limit, offset)
    response = Response(page.body, media_type="application/json")
    if page.count == limit:
        response.headers["Link"] = f'<{next_page(request, offset + limit)}>; rel="next"'
    return response


def next_page(request: Request, offset: int) -> str:
    """Relative (RFC 8288 allows it): right behind a proxy that rewrites the host."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
    return f"{request.url.path}?{urlencode([*query, ('offset', str(offset))])}"


@dataclass(frozen=True)
class Page:
    body: bytes
    count: int


def _listed(
    ctx: Context, status: str | None, problem_type: str | None, limit: int, offset: int
) -> Page:
    stores = ctx.stores()

    def page() -> Page:
        rows = stores.queries.listing(status, None, problem_type, limit=limit, offset=offset)
        return Page(dumps(rows), len(rows))

    return stores.fresh.get(("list", status, problem_type, limit, offset), page)


def _searched(
    ctx: Context,
    q: str | None,
    status: str | None,
    contact: str | None,
    problem_type: str | None,
    limit: int,
    offset: int,
) -> Page:
    queries = ctx.stores().queries
    if q:
        rows = _search(queries, q, status, contact, problem_type)[offset : offset + limit]
    else:
        rows = queries.listing(status, contact, problem_type, limit=limit, offset=offset)
    return Page(dumps(rows), len(rows))


@router.get("/ecrs/{ref}", response_model=None, responses={200: {"model": schemas.Ecr}})
def show_ecr(ref: str, ctx: Ctx, who: Who) -> Response:
    """`ecr show REF --json`."""
    queries = ctx.stores().queries
    return as_json(queries.ecr(_ecr_id(queries, ref)))


@router.post(
    "/ecrs/{ref}/status",
    response_model=None,
    responses={200: {"model": schemas.Ecr}, 400: {"model": schemas.Problem}},
)
def set_status(ref: str, change: schemas.StatusChange, ctx: Ctx, who: Who) -> Response:
    """`ecr set-status`: the same event and notifications; answers with the ECR as it is now
    and the number of notifications queued in `X-Notifications-Queued`."""
    stores = ctx.stores()
    ecr_id = _ecr_id(stores.queries, ref)
    try:
        by = f"staff:api:{who}"
        queued = stores.staff.set_status(ecr_id, Status(change.status), change.note, by)
    except StaffError as exc:
        raise HTTPException(400, str(exc)) from None
    log.info("%s set %s by staff:api:%s", stores.queries.ref(ecr_id), change.status, who)
    response = as_json(stores.queries.ecr(ecr_id))
    response.headers["X-Notifications-Queued"] = str(queued)
    return response


@router.get(
    "/ecrs/{ref}/attachments/{sha256}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {"model": schemas.Problem}},
)
def download(ref: str, sha256: str, ctx: Ctx, who: Who) -> FileResponse:
    """An attachment of this ECR, always as a download (`Content-Disposition: attachment`,
    `X-Content-Type-Options: nosniff`)."""
    stores = ctx.stores()
    ecr_id = _ecr_id(stores.queries, ref)
    found = attachments.find(stores.db, ecr_id, sha256) if SHA256.fullmatch(sha256) else None
    path = ctx.blobs.path(sha256) if found else None
    if found is None or path is None or not path.is_file():
        if found is not None:
            log.warning("%s: attachment %s is missing from the store", ref, sha256)
        raise HTTPException(404, "no such attachment on this ECR")
    return FileResponse(
        path,
        media_type=safe_type(found["content_type"]),
        headers={
            "Content-Disposition": disposition(found["filename"]),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


@router.get(
    "/report",
    response_model=None,
    responses={200: {"model": schemas.Report, "content": {"text/csv": {}}}},
)
def report(
    ctx: Ctx,
    who: Who,
    since: Annotated[str | None, Query(description="Start date, e.g. 2026-11-01")] = None,
    until: Annotated[str | None, Query(description="End date (exclusive); default now")] = None,
    format: Literal["json", "csv"] = "json",
) -> Response:
    """`ecr-gateway report` for the ECRs created in [since, until) (default the last 30 days)."""
    try:
        start, end = reports.period(since, until, ctx.clock())
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    result = reports.compute(report_facts.facts(ctx.stores().db, start, end), start, end)
    if format == "csv":
        return Response(reports.as_csv(result), media_type="text/csv; charset=utf-8")
    return as_json(reports.as_json(result))


def as_json(data: Any) -> Response:
    return Response(dumps(data), media_type="application/json")


def dumps(data: Any) -> bytes:
    """Serialised exactly as the CLI prints it (`json.dumps(…, ensure_ascii=False)`)."""
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


def _ecr_id(queries: Queries, ref: str) -> int:
    ecr_id = queries.ecr_id(ref)
    if ecr_id is None:
        raise HTTPException(404, f"no ECR {ref}")
    return ecr_id


def _search(
    queries: Queries, text: str, status: str | None, contact: str | None, problem_type: str | None
) -> list[dict[str, Any]]:
    """`ecr search`, then the list filters on its matches (best first)."""
    rows = queries.search(text, limit=SEARCH_CAP)
    if status:
        rows = [r for r in rows if r["status"] == status]
    if problem_type:
        rows = [r for r in rows if r["problem_type"].casefold() == problem_type.casefold()]
    if contact:
        rows = [r for r in rows if _involves(r, contact.casefold())]
    return rows


def _involves(row: dict[str, Any], needle: str) -> bool:
    people = [*row["participants"], *((row["requester"] or {}).values())]
    return any(needle in str(p).casefold() for p in people)


def safe_type(content_type: str) -> str:
    """The stored type when it is a plain type/subtype a browser will not run, else bytes."""
    t = content_type.split(";", 1)[0].strip()
    if not SIMPLE_TYPE.fullmatch(t) or ACTIVE_TYPES.search(t):
        return "application/octet-stream"
    return t.lower()


def disposition(filename: str) -> str:
    """`attachment` with a plain-ASCII fallback name and the exact name in RFC 6266/8187 form
    (every client that knows `filename*` prefers it)."""
    fallback = "".join(c if c in FALLBACK_CHARS else "_" for c in filename) or "attachment"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
