"""Who may do what in the audit, and what its routes share: the scopes of
``ciretry.common.auth`` applied to a request, the dashboard's sessions, and the application keys
``main.mount`` sets.

The API takes ``Authorization: Bearer <token>``: ``read`` for every GET, ``feedback`` for the
feedback POST. A browser cannot add that header by itself, so the dashboard signs in once
(``/login``, any read, feedback or admin token) and gets a session cookie: signed and dated by
``itsdangerous`` (a maintained library, no crypto of ours), ``HttpOnly``, ``SameSite=Strict``,
``Secure`` when the request came over HTTPS (or a proxy says so with ``X-Forwarded-Proto``),
expiring after ``CIRETRY_SESSION_MAX_AGE``. It holds no token: the token's ``fingerprint``
(keyed, so the cookie tells nothing about the token) and a random CSRF token that every
state-changing form must send back. The scopes a session has are worked out again on every
request from the fingerprint, so a token removed from the configuration ends its sessions.
When a request carries a bearer header, that is what is checked, cookie or not.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ciretry.common.auth import READ, Scope, TokenSet, bearer, derive_key, fingerprint

from .queries import Audit

SESSION_COOKIE: Final = "ciretry_session"
#: The cookie before sessions (it held the raw token): cleared at sign-in, never read.
OLD_COOKIE: Final = "ciretry_audit_token"
CSRF_FIELD: Final = "csrf"
_SALT: Final = "ciretry-audit-session"


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: which token (by fingerprint) and the CSRF token of its forms."""

    fingerprint: str
    csrf: str


class Sessions:
    """Issues and reads session cookies. ``keys``: the first signs, every one verifies (so the
    key can be rotated); none: a random key for this process."""

    def __init__(self, keys: Sequence[str], max_age: float) -> None:
        raw = [k.encode() for k in keys if k] or [secrets.token_bytes(32)]
        # itsdangerous signs with the last key of the list and verifies with each.
        self._serializer = URLSafeTimedSerializer(list(reversed(raw)), salt=_SALT)
        # Fingerprints use a key of their own derived from the signing key.
        self.fingerprint_key = derive_key(raw[0], "ciretry session fingerprint")
        self.max_age = max(1, int(max_age))

    def issue(self, token: str) -> tuple[str, Session]:
        """The cookie value, and the session it stands for, of a browser signed in with
        ``token`` (already checked by the caller)."""
        session = Session(fingerprint(self.fingerprint_key, token), secrets.token_urlsafe(24))
        value = self._serializer.dumps({"f": session.fingerprint, "c": session.csrf})
        return value, session

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie this server signed less than ``max_age`` ago, else None."""
        if not cookie or len(cookie) > 1024:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=self.max_age)
        except (BadSignature, ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        f, c = data.get("f"), data.get("c")
        if not isinstance(f, str) or not isinstance(c, str) or not f or not c:
            return None
        return Session(f, c)


@dataclass(frozen=True, slots=True)
class Access:
    scopes: Mapping[str, Scope]
    sessions: Sessions


AUDIT: Final = web.AppKey("ciretry_audit", Audit)
ACCESS: Final = web.AppKey("ciretry_audit_access", Access)


def presented(request: web.Request) -> str | None:
    """The bearer token of the request, if any."""
    return bearer(request.headers.get("Authorization"))


def allowed(request: web.Request, scope: str = READ) -> bool:
    """API routes: does the bearer token (or an open scope) allow ``scope``?"""
    return request.app[ACCESS].scopes[scope].allows(presented(request))


def session(request: web.Request) -> Session | None:
    return request.app[ACCESS].sessions.read(request.cookies.get(SESSION_COOKIE))


def page_allowed(request: web.Request, scope: str = READ) -> bool:
    """Dashboard routes: a bearer header when there is one, else the session cookie."""
    access = request.app[ACCESS]
    if access.scopes[scope].is_open:
        return True
    token = presented(request)
    if token is not None:
        return access.scopes[scope].allows(token)
    s = session(request)
    return s is not None and access.scopes[scope].allows_fingerprint(
        access.sessions.fingerprint_key, s.fingerprint
    )


def csrf_ok(request: web.Request, given: str | None) -> bool:
    """Does a form's CSRF field match the session's (constant time)? No session: no."""
    s = session(request)
    return s is not None and TokenSet.of(s.csrf).matches(given)


def secure(request: web.Request) -> bool:
    """Did the browser reach us over HTTPS (directly, or through a proxy that says so)?"""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def set_session_cookie(request: web.Request, response: web.StreamResponse, value: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        value,
        httponly=True,
        samesite="Strict",
        secure=secure(request),
        path="/",
        max_age=request.app[ACCESS].sessions.max_age,
    )
    response.del_cookie(OLD_COOKIE, path="/")


__all__ = [
    "ACCESS",
    "AUDIT",
    "CSRF_FIELD",
    "SESSION_COOKIE",
    "Access",
    "Session",
    "Sessions",
    "allowed",
    "csrf_ok",
    "page_allowed",
    "presented",
    "secure",
    "session",
    "set_session_cookie",
]
