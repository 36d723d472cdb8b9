"""The dashboard's routes at ``/``: the spurious-failure overview, job pages, search, sign-in,
the feedback form and the vendored static files. Handlers ask ``queries.Audit`` and render with
``pages``; who may see a page is ``access.page_allowed`` (bearer header or session cookie),
anyone else is sent to ``/login`` (or told 401 when no read token is configured at all). The
feedback form needs the ``feedback`` scope and the session's CSRF token. Form bodies are capped
(``MAX_FORM``)."""

from __future__ import annotations

import importlib.resources
import urllib.parse
import uuid
from typing import Final

import msgspec
from aiohttp import web

from ciretry.common.auth import FEEDBACK, READ

from . import feedback as feedback_
from .access import (
    ACCESS,
    AUDIT,
    CSRF_FIELD,
    SESSION_COOKIE,
    csrf_ok,
    page_allowed,
    presented,
    session,
    set_session_cookie,
)
from .feedback import FeedbackRequest, NoSuchVerdict
from .pages import (
    escape,
    job_href,
    page,
    render_clusters,
    render_dashboard,
    render_job,
    render_storms,
    table,
)
from .queries import QueryError

#: The largest form the dashboard reads (sign-in, feedback): a few KiB at most.
MAX_FORM: Final = 16 * 1024

STATIC_FILES: Final = {
    "chart.umd.min.js": "application/javascript",
    "dashboard.js": "application/javascript",
    "chart.js.LICENSE.md": "text/plain",
}
_STATIC: Final = importlib.resources.files("ciretry.audit") / "static"


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def _sign_in_first(request: web.Request) -> None:
    if page_allowed(request, READ):
        return
    if request.app[ACCESS].scopes[READ].closed:
        raise web.HTTPUnauthorized(
            text=page(
                "closed",
                "<p>No read token is configured: the dashboard is closed. Set "
                "CIRETRY_READ_TOKENS (or CIRETRY_API_OPEN=true to open it to all).</p>",
            ),
            content_type="text/html",
        )
    raise web.HTTPSeeOther("/login")


def _csrf_for_feedback(request: web.Request) -> str | None:
    """The session's CSRF token when this viewer may give feedback (a form can be shown)."""
    s = session(request)
    if s is None or presented(request) is not None:
        return None
    access = request.app[ACCESS]
    if not access.scopes[FEEDBACK].allows_fingerprint(
        access.sessions.fingerprint_key, s.fingerprint
    ):
        return None
    return s.csrf


async def _form(request: web.Request) -> dict[str, str]:
    """The url-encoded form of a POST, at most ``MAX_FORM`` bytes (413 above)."""
    if (request.content_length or 0) > MAX_FORM:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_FORM, actual_size=request.content_length or 0
        )
    raw = bytearray()
    async for chunk in request.content.iter_chunked(8192):
        raw += chunk
        if len(raw) > MAX_FORM:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM, actual_size=len(raw))
    fields = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), max_num_fields=20)
    return {k: v[0] for k, v in fields.items() if v}


async def index(request: web.Request) -> web.Response:
    _sign_in_first(request)
    try:
        days = int(request.query.get("days", "30"))
        data = await request.app[AUDIT].dashboard(
            days=days, project=request.query.get("project") or None
        )
    except (ValueError, QueryError) as exc:
        return _html(page("bad request", f"<p>{escape(exc)}</p>"), 400)
    return _html(render_dashboard(data))


async def clusters_page(request: web.Request) -> web.Response:
    _sign_in_first(request)
    q = request.query
    try:
        data = await request.app[AUDIT].clusters(
            days=int(q.get("days") or "30"),
            project=q.get("project") or None,
            unexplained=q.get("all", "") not in ("1", "true", "yes"),
        )
    except (ValueError, QueryError) as exc:
        return _html(page("bad request", f"<p>{escape(exc)}</p>"), 400)
    return _html(render_clusters(data))


async def storms_page(request: web.Request) -> web.Response:
    _sign_in_first(request)
    try:
        data = await request.app[AUDIT].storms(days=int(request.query.get("days") or "30"))
    except (ValueError, QueryError) as exc:
        return _html(page("bad request", f"<p>{escape(exc)}</p>"), 400)
    return _html(render_storms(data))


async def job_page(request: web.Request) -> web.Response:
    _sign_in_first(request)
    m = request.match_info
    audit = request.app[AUDIT]
    timeline = await audit.job(m["source"], m["project"], m["job"])
    why = await audit.why(m["source"], m["project"], m["job"])
    if timeline is None or why is None:
        return _html(page("not found", "<p>No such job in the audit read model.</p>"), 404)
    message = "Thank you: your feedback is recorded." if request.query.get("sent") else ""
    return _html(render_job(timeline, why, csrf=_csrf_for_feedback(request), message=message))


async def give_feedback(request: web.Request) -> web.Response:
    """The job page's form: a dispute or confirmation, from a signed-in session that may give
    feedback and sends its CSRF token back (403 otherwise: a form posted by another site)."""
    form = await _form(request)
    if _csrf_for_feedback(request) is None:
        return _html(page("forbidden", "<p>Sign in with a feedback token first.</p>"), 403)
    if not csrf_ok(request, form.get(CSRF_FIELD)):
        return _html(page("forbidden", "<p>The form is out of date; reload the page.</p>"), 403)
    try:
        verdict_id = uuid.UUID(form.get("verdict_id", ""))
        body = msgspec.convert(
            {
                "verdict": form.get("verdict", ""),
                "who": form.get("who", ""),
                "why": form.get("why") or None,
                "correct_category": form.get("correct_category") or None,
            },
            FeedbackRequest,
        )
        await feedback_.record(request.app[AUDIT], verdict_id, body, None)
    except (ValueError, msgspec.ValidationError) as exc:  # QueryError is a ValueError
        return _html(page("bad request", f"<p>{escape(exc)}</p>"), 400)
    except NoSuchVerdict:
        return _html(page("not found", "<p>No such verdict.</p>"), 404)
    job = await request.app[AUDIT].store.verdict_job(verdict_id)
    target = job_href(*job) + "?sent=1" if job else "/"
    raise web.HTTPSeeOther(target)


async def search(request: web.Request) -> web.Response:
    _sign_in_first(request)
    q = request.query.get("q", "").strip().strip("/")
    if "/" in q:
        source, _, rest = q.partition("/")
        project, _, job_id = rest.rpartition("/")
        if source and project and job_id:
            raise web.HTTPSeeOther(job_href(source, project, job_id))
    rows = await request.app[AUDIT].find_jobs(q)
    if len(rows) == 1:
        r = rows[0]
        raise web.HTTPSeeOther(job_href(r["source"], r["project"], r["job_id"]))
    body = f"<h1>Jobs matching {escape(q)}</h1>" + table(
        ["job", "name", "source", "project"],
        ((f"<a href='{escape(job_href(r['source'], r['project'], r['job_id']))}'>"
          f"{escape(r['job_id'])}</a>", r["job_name"], r["source"], r["project"])
         for r in rows),
        raw=0,
    )  # fmt: skip
    return _html(page("search", body), 200 if rows else 404)


async def login_form(_: web.Request) -> web.Response:
    body = (
        "<h1>Sign in</h1><form method=post action='/login'>"
        "<label>API token <input type=password name=token id=token></label> "
        "<button type=submit id=login>Sign in</button></form>"
    )
    return _html(page("sign in", body))


async def login(request: web.Request) -> web.Response:
    form = await _form(request)
    given = form.get("token", "").strip()
    access = request.app[ACCESS]
    if not given or not access.scopes[READ].tokens.matches(given):
        return _html(page("sign in", "<p>Wrong token.</p>"), 401)
    value, _ = access.sessions.issue(given)
    response = web.HTTPSeeOther("/")
    set_session_cookie(request, response, value)
    raise response


async def logout(request: web.Request) -> web.Response:
    form = await _form(request)
    if not csrf_ok(request, form.get(CSRF_FIELD)):
        return _html(page("forbidden", "<p>The form is out of date; reload the page.</p>"), 403)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.Response(
        body=(_STATIC / name).read_bytes(),
        content_type=STATIC_FILES[name],
        headers={"Cache-Control": "public, max-age=3600"},
    )


def add_routes(app: web.Application) -> None:
    """The dashboard's routes; ``main.mount`` sets the ``access`` keys they read."""
    app.router.add_get("/", index)
    app.router.add_get("/search", search)
    app.router.add_get("/clusters", clusters_page)
    app.router.add_get("/storms", storms_page)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_post("/feedback", give_feedback)
    app.router.add_get("/jobs/{source}/{project:.+}/{job:[^/]+}", job_page)
    app.router.add_get("/static/audit/{name}", asset)


__all__ = ["STATIC_FILES", "add_routes"]
