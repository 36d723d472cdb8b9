"""The dashboard's routes at ``/``: the spurious-failure overview, job pages, search, sign-in and
the vendored static files. Handlers ask ``queries.Audit`` and render with ``pages``; who may see
a page is ``access.allowed`` (header or cookie), anyone else is sent to ``/login``."""

from __future__ import annotations

import importlib.resources
from typing import Final

from aiohttp import web

from .access import AUDIT, COOKIE, READ_SCOPE, allowed
from .pages import escape, job_href, page, render_clusters, render_dashboard, render_job, table
from .queries import QueryError

STATIC_FILES: Final = {
    "chart.umd.min.js": "application/javascript",
    "dashboard.js": "application/javascript",
    "chart.js.LICENSE.md": "text/plain",
}
_STATIC: Final = importlib.resources.files("ciretry.audit") / "static"


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def _sign_in_first(request: web.Request) -> None:
    if not allowed(request, cookie=True):
        raise web.HTTPSeeOther("/login")


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


async def job_page(request: web.Request) -> web.Response:
    _sign_in_first(request)
    m = request.match_info
    audit = request.app[AUDIT]
    timeline = await audit.job(m["source"], m["project"], m["job"])
    why = await audit.why(m["source"], m["project"], m["job"])
    if timeline is None or why is None:
        return _html(page("not found", "<p>No such job in the audit read model.</p>"), 404)
    return _html(render_job(timeline, why))


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
    form = await request.post()
    given = str(form.get("token", ""))
    if not request.app[READ_SCOPE].allows(given):
        return _html(page("sign in", "<p>Wrong token.</p>"), 401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, given, httponly=True, samesite="Strict", path="/")
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
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_get("/jobs/{source}/{project:.+}/{job:[^/]+}", job_page)
    app.router.add_get("/static/audit/{name}", asset)


__all__ = ["STATIC_FILES", "add_routes"]
