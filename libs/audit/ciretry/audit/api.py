"""The audit HTTP API under ``/api/v1/`` (``main.mount`` adds it, with the dashboard).

Read-only: every write answers 405, except ``POST /api/v1/verdicts/{id}/feedback``, which
appends a ``VerdictDisputed`` or ``VerdictConfirmed`` to the verdict's job stream (the outbox
sweeper publishes it).

Auth (``access``): every GET needs ``Authorization: Bearer <token>`` of the ``read`` scope, the
feedback POST one of the ``feedback`` scope (401 otherwise; with no token configured every
request is refused unless ``CIRETRY_API_OPEN=true`` opens reading). The OpenAPI document is
public. Bodies are capped (``MAX_BODY``): 413 above.

Projects with slashes (``owner/repo``): the ``{project}`` path segment may keep its slashes
(``/api/v1/jobs/github/owner/repo/123``) or percent-encode them (``owner%2Frepo``); the job id
is always the last segment (``/why`` after it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from ciretry.common.auth import FEEDBACK, READ
from ciretry.common.errors import MALFORMED_JSON

from . import feedback as feedback_
from .access import AUDIT, allowed
from .feedback import FeedbackRequest, NoSuchVerdict
from .openapi import DOCUMENT
from .queries import MAX_PAGE, QueryError, parse_time

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_encode = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status)


_REPEATABLE: Final = frozenset({"type"})
#: The largest request body any route of the API reads (feedback is a few KiB at most).
MAX_BODY: Final = 16 * 1024


def _authed(handler: Handler, scope: str = READ) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not allowed(request, scope):
            return web.Response(
                body=_encode({"error": "unauthorized", "message": "bearer token required"}),
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": f'Bearer realm="ciretry", scope="{scope}"'},
            )
        if (request.content_length or 0) > MAX_BODY:
            return error(413, "too_large", f"request bodies are limited to {MAX_BODY} bytes")
        # PostgreSQL text cannot hold NUL: refuse it here rather than fail in the query.
        if any("\x00" in v for v in (*request.query.values(), *request.match_info.values())):
            return error(400, "bad_request", "parameters must not contain NUL characters")
        # Which of two values was meant? Only ``type`` may be repeated (several types).
        for name in request.query:
            if name not in _REPEATABLE and len(request.query.getall(name)) > 1:
                return error(400, "bad_request", f"{name} given more than once")
        try:
            return await handler(request)
        except QueryError as exc:
            return error(400, "bad_request", str(exc))

    return wrapped


def _project(request: web.Request) -> str:
    # aiohttp decodes %2F in match_info, so both spellings arrive as owner/repo.
    return request.match_info["project"]


#: Positions are PostgreSQL bigints.
MAX_POSITION: Final = 2**63 - 1


def _int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer") from None
    if not -MAX_POSITION <= value <= MAX_POSITION:
        raise QueryError(f"{name} is out of range")
    return value


# --- handlers -----------------------------------------------------------------------------


async def openapi(_: web.Request) -> web.Response:
    return json_response(DOCUMENT)


async def job(request: web.Request) -> web.Response:
    m = request.match_info
    out = await request.app[AUDIT].job(m["source"], _project(request), m["job"])
    if out is None:
        return error(404, "not_found", "no such job in the read model")
    return json_response(out)


async def why(request: web.Request) -> web.Response:
    m = request.match_info
    out = await request.app[AUDIT].why(m["source"], _project(request), m["job"])
    if out is None:
        return error(404, "not_found", "no events recorded for this job")
    return json_response(out)


async def pipeline(request: web.Request) -> web.Response:
    m = request.match_info
    out = await request.app[AUDIT].pipeline(
        m["source"],
        _project(request),
        m["pipeline"],
        limit=_int(request, "limit", MAX_PAGE),
        cursor=request.query.get("cursor") or None,
    )
    if out is None:
        return error(404, "not_found", "no such pipeline in the read model")
    return json_response(out)


async def stats(request: web.Request) -> web.Response:
    q = request.query
    metric = q.get("metric")
    if not metric:
        raise QueryError("metric is required")
    out = await request.app[AUDIT].stats(
        metric,
        bucket=q.get("bucket", "day"),
        start=parse_time(q.get("from"), "from"),
        end=parse_time(q.get("to"), "to"),
        project=q.get("project") or None,
        source=q.get("source") or None,
        top=_int(request, "top", 10),
    )
    return json_response(out)


async def events(request: web.Request) -> web.Response:
    q = request.query
    types = [t for raw in q.getall("type", []) for t in raw.split(",") if t]
    after = _int(request, "after", 0)
    if after < 0:
        raise QueryError("after must be a position (0 or more)")
    cursor = q.get("cursor")
    if cursor:
        if not cursor.isdigit() or int(cursor) > MAX_POSITION:
            raise QueryError("cursor is not one this API returned")
        after = max(after, int(cursor))
    out = await request.app[AUDIT].events(
        stream=q.get("stream") or None,
        types=types,
        start=parse_time(q.get("from"), "from"),
        end=parse_time(q.get("to"), "to"),
        after=after,
        limit=_int(request, "limit", 100),
    )
    return json_response(out)


async def allocation(request: web.Request) -> web.Response:
    q = request.query
    project, job_name = q.get("project"), q.get("job_name")
    if not project or not job_name:
        raise QueryError("project and job_name are required")
    return json_response(await request.app[AUDIT].allocation(project, job_name, q.get("ref")))


async def disputed(request: web.Request) -> web.Response:
    out = await request.app[AUDIT].disputed(
        request.query.get("rule") or None,
        _int(request, "limit", 50),
        request.query.get("cursor") or None,
    )
    return json_response(out)


async def clusters(request: web.Request) -> web.Response:
    q = request.query
    flag = q.get("all", "")
    if flag not in ("", "0", "1", "true", "false"):
        raise QueryError("all must be 1, 0, true or false")
    everything = flag in ("1", "true")
    out = await request.app[AUDIT].clusters(
        days=_int(request, "days", 30),
        project=q.get("project") or None,
        unexplained=not everything,
        limit=_int(request, "limit", 50),
    )
    return json_response(out)


async def storms(request: web.Request) -> web.Response:
    out = await request.app[AUDIT].storms(
        days=_int(request, "days", 30), limit=_int(request, "limit", 50)
    )
    return json_response(out)


async def outcomes(request: web.Request) -> web.Response:
    q = request.query
    out = await request.app[AUDIT].outcomes(
        days=_int(request, "days", 7),
        by=q.get("by") or "none",
        project=q.get("project") or None,
        limit=_int(request, "limit", 100),
    )
    return json_response(out)


async def _body(request: web.Request) -> bytes:
    """The body, read no further than ``MAX_BODY`` (chunked bodies have no Content-Length)."""
    out = bytearray()
    async for chunk in request.content.iter_chunked(8192):
        out += chunk
        if len(out) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(out))
    return bytes(out)


async def feedback(request: web.Request) -> web.Response:
    try:
        verdict_id = uuid.UUID(request.match_info["event_id"])
    except ValueError:
        return error(400, "bad_request", "event_id is not a UUID")
    try:
        raw = await _body(request)
    except web.HTTPRequestEntityTooLarge:
        return error(413, "too_large", f"request bodies are limited to {MAX_BODY} bytes")
    try:
        body = msgspec.json.decode(raw, type=FeedbackRequest)
    except MALFORMED_JSON + (msgspec.ValidationError,) as exc:
        return error(400, "bad_request", str(exc))
    try:
        out = await feedback_.record(
            request.app[AUDIT], verdict_id, body, request.headers.get("Idempotency-Key")
        )
    except NoSuchVerdict:
        return error(404, "not_found", "no verdict with this event id")
    return json_response(out, 201)


async def fallback(request: web.Request) -> web.Response:
    """Anything else under /api/v1: 405 for writes (read-only API), 404 for reads."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        return error(405, "method_not_allowed", "the audit API is read-only")
    return error(404, "not_found", "no such endpoint")


def add_routes(app: web.Application) -> None:
    """The API's routes; ``main.mount`` sets the ``access`` keys they read."""
    # [\s\S], not ".": a segment may hold a (percent-encoded) newline, and a route that
    # does not match would answer with aiohttp's plain-text 404, not the API's JSON.
    job_path = "/api/v1/jobs/{source}/{project:[\\s\\S]+}/{job:[^/]+}"
    app.router.add_get("/api/v1/openapi.json", openapi)
    # /why first: otherwise ".../123/why" would read as project ".../123", job "why".
    app.router.add_get(job_path + "/why", _authed(why))
    app.router.add_get(job_path, _authed(job))
    app.router.add_get(
        "/api/v1/pipelines/{source}/{project:[\\s\\S]+}/{pipeline:[^/]+}", _authed(pipeline)
    )
    app.router.add_get("/api/v1/stats", _authed(stats))
    app.router.add_get("/api/v1/events", _authed(events))
    app.router.add_get("/api/v1/allocation", _authed(allocation))
    app.router.add_get("/api/v1/verdicts/disputed", _authed(disputed))
    app.router.add_get("/api/v1/clusters", _authed(clusters))
    app.router.add_get("/api/v1/outcomes", _authed(outcomes))
    app.router.add_get("/api/v1/storms", _authed(storms))
    app.router.add_post("/api/v1/verdicts/{event_id}/feedback", _authed(feedback, FEEDBACK))
    app.router.add_route("*", "/api/v1/{tail:[\\s\\S]*}", _authed(fallback))


__all__ = ["add_routes"]
