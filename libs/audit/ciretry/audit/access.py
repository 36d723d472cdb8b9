"""Who may read the audit, and what its routes share: the ``read`` scope of
``ciretry.common.auth`` applied to a request, and the application keys ``main.mount`` sets.

A request presents its token as ``Authorization: Bearer <token>``; dashboard pages may present
it instead in the HttpOnly cookie the ``/login`` form sets (a browser cannot add the header by
itself). When the header carries a bearer token, that is the token checked, cookie or not.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from ciretry.common.auth import Scope, bearer

from .queries import Audit

COOKIE: Final = "ciretry_audit_token"
AUDIT: Final = web.AppKey("ciretry_audit", Audit)
READ_SCOPE: Final = web.AppKey("ciretry_audit_read", Scope)


def presented(request: web.Request, *, cookie: bool = False) -> str | None:
    """The token the request presents (``cookie``: dashboard pages also read the cookie)."""
    token = bearer(request.headers.get("Authorization"))
    if token is None and cookie:
        token = request.cookies.get(COOKIE)
    return token


def allowed(request: web.Request, *, cookie: bool = False) -> bool:
    return request.app[READ_SCOPE].allows(presented(request, cookie=cookie))


__all__ = ["AUDIT", "COOKIE", "READ_SCOPE", "allowed", "presented"]
