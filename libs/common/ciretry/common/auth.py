"""Every check of a presented credential, in one module: constant time, never logged.

Pure and synchronous; the HTTP handlers (ingest's webhooks, the audit API and dashboard) read the
header and ask here. What is compared:

* ``TokenSet``: the tokens one purpose accepts. Several at once, so a token can be rotated (add
  the new one, move the senders, remove the old). A presented token is compared with *every*
  token, without stopping at the first match, so the time taken tells neither how many there are
  nor which one matched.
* ``ProjectTokens``: tokens valid for every project plus tokens valid for one project only
  (GitLab's per-project webhooks: ``project:<id>:<secret>`` entries).
* ``signature_ok``: an HMAC-SHA256 of a body in hex (GitHub's ``X-Hub-Signature-256``).
* ``buildkite_signature_ok``: Buildkite's ``X-Buildkite-Signature``, an HMAC-SHA256 of
  ``<timestamp>.<body>`` whose timestamp must be recent (a captured delivery cannot be replayed
  later). Buildkite's other form, the token itself in ``X-Buildkite-Token``, is a ``TokenSet``.
* ``bearer``: the token of an ``Authorization: Bearer <token>`` header (the scheme is
  case-insensitive, RFC 7235).

Who may do what is a ``Scope`` (a name, the tokens it accepts, and whether it is open to
anyone); ``scopes(config)`` builds the four from the configuration (docs/security.md):

* ``read``: the audit API and dashboard. ``CIRETRY_READ_TOKENS``, and every ``feedback`` and
  ``admin`` token (who disputes a verdict must see it). Closed without a token unless
  ``CIRETRY_API_OPEN=true`` opens it on purpose.
* ``feedback``: dispute or confirm a verdict (writes an event). ``CIRETRY_FEEDBACK_TOKENS`` and
  the ``admin`` tokens. Never open.
* ``push``: ``/webhooks/kubernetes`` and ``/pulse`` (events that make act spend budgets).
  ``CIRETRY_PUSH_TOKENS`` only: a viewer cannot forge an OOM kill. Never open.
* ``admin``: ``CIRETRY_ADMIN_TOKENS``; what read and feedback may (and any admin route to come).

The deprecated ``CIRETRY_API_TOKEN`` counts as a read, feedback and push token. Every scope takes
several tokens, for rotation. GitLab and GitHub webhook secrets have schemes of their own and are
checked with ``ProjectTokens`` and ``signature_ok``; Buildkite's with
``buildkite_signature_ok`` (or ``TokenSet`` for its plain token).

``fingerprint`` names a token without showing it (an HMAC under a server key): a dashboard
session holds the fingerprint of the token it signed in with, so removing that token from the
configuration ends the session, and the cookie never carries a token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .config import Config

#: The scopes (see the module doc).
READ: Final = "read"
FEEDBACK: Final = "feedback"
PUSH: Final = "push"
ADMIN: Final = "admin"
SCOPES: Final = (READ, FEEDBACK, PUSH, ADMIN)

_PROJECT_PREFIX: Final = "project:"
_SIGNATURE_PREFIX: Final = "sha256="
#: How far a Buildkite signature's timestamp may be from now, either way (seconds): Buildkite
#: stamps the time it sends the request, and a retried delivery is signed again.
BUILDKITE_SIGNATURE_MAX_AGE: Final = 300.0


def _bytes(value: str) -> bytes:
    # surrogateescape: a header with bytes that are not UTF-8 is compared (and refused), not an
    # exception.
    return value.encode("utf-8", "surrogateescape")


def _any_equal(presented: bytes, secrets: Iterable[bytes]) -> bool:
    ok = False
    for secret in secrets:
        # No short-circuit: every secret is compared whatever the earlier results.
        ok |= hmac.compare_digest(presented, secret)
    return ok


@dataclass(frozen=True, slots=True)
class TokenSet:
    """The tokens one purpose accepts (several during a rotation)."""

    tokens: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, *tokens: str) -> TokenSet:
        """The non-empty ones of ``tokens``."""
        return cls(tuple(_bytes(t) for t in tokens if t))

    @property
    def configured(self) -> bool:
        return bool(self.tokens)

    def matches(self, presented: str | None) -> bool:
        """Is ``presented`` one of the tokens? Never true for an empty set or no token."""
        if presented is None or not self.tokens:
            return False
        return _any_equal(_bytes(presented), self.tokens)

    def __or__(self, other: TokenSet) -> TokenSet:
        return TokenSet(self.tokens + other.tokens)

    def has_fingerprint(self, key: bytes, presented: str | None) -> bool:
        """Is ``presented`` the ``fingerprint`` under ``key`` of one of the tokens?"""
        if not presented or not self.tokens:
            return False
        return _any_equal(_bytes(presented), (_fingerprint(key, t) for t in self.tokens))


@dataclass(frozen=True, slots=True)
class ProjectTokens:
    """Tokens valid for every project, and tokens valid for one project only."""

    everywhere: TokenSet = TokenSet()
    by_project: Mapping[str, TokenSet] = field(default_factory=dict)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ProjectTokens:
        """Entries are tokens, or ``project:<id>:<token>`` for one project's."""
        everywhere: list[str] = []
        scoped: dict[str, list[str]] = {}
        for entry in entries:
            if entry.startswith(_PROJECT_PREFIX) and entry.count(":") >= 2:
                _, project, secret = entry.split(":", 2)
                if project and secret:
                    scoped.setdefault(project, []).append(secret)
                    continue
            if entry:
                everywhere.append(entry)
        return cls(TokenSet.of(*everywhere), {p: TokenSet.of(*s) for p, s in scoped.items()})

    @property
    def configured(self) -> bool:
        return self.everywhere.configured or bool(self.by_project)

    @property
    def has_project_tokens(self) -> bool:
        return bool(self.by_project)

    def matches_everywhere(self, presented: str | None) -> bool:
        return self.everywhere.matches(presented)

    def matches_project(self, presented: str | None, project: str | None) -> bool:
        if project is None:
            return False
        return self.by_project.get(project, TokenSet()).matches(presented)


def signature_ok(secrets: TokenSet, body: bytes, signature: str | None) -> bool:
    """``sha256=<hex HMAC-SHA256 of body>`` made with any of ``secrets``."""
    if not signature or not secrets.configured or not signature.startswith(_SIGNATURE_PREFIX):
        return False
    presented = signature[len(_SIGNATURE_PREFIX) :].strip().lower().encode("ascii", "replace")
    expected = (hmac.new(s, body, hashlib.sha256).hexdigest().encode() for s in secrets.tokens)
    return _any_equal(presented, expected)


def buildkite_signature_ok(
    secrets: TokenSet,
    body: bytes,
    header: str | None,
    now: float,
    max_age: float = BUILDKITE_SIGNATURE_MAX_AGE,
) -> bool:
    """``timestamp=<unix seconds>,signature=<hex HMAC-SHA256 of "<timestamp>.<body>">`` made
    with any of ``secrets``, its timestamp within ``max_age`` seconds of ``now``."""
    if not header or not secrets.configured:
        return False
    parts: dict[str, str] = {}
    for item in header.split(","):
        key, _, value = item.partition("=")
        parts[key.strip()] = value.strip()
    stamp, presented = parts.get("timestamp", ""), parts.get("signature", "")
    if not (stamp.isascii() and stamp.isdigit() and presented):
        return False
    if abs(now - int(stamp)) > max_age:
        return False
    message = stamp.encode() + b"." + body
    expected = (hmac.new(s, message, hashlib.sha256).hexdigest().encode() for s in secrets.tokens)
    return _any_equal(presented.lower().encode("ascii", "replace"), expected)


def bearer(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (surrounding blanks dropped); None for no
    header or another scheme."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip()


def _fingerprint(key: bytes, token: bytes) -> bytes:
    return hmac.new(key, token, hashlib.sha256).hexdigest().encode()


def derive_key(key: bytes, purpose: str) -> bytes:
    """A key of its own for ``purpose`` from ``key`` (HMAC-SHA256), so one secret never serves
    two uses."""
    return hmac.new(key, purpose.encode(), hashlib.sha256).digest()


def fingerprint(key: bytes, token: str) -> str:
    """A name for ``token`` that does not reveal it without ``key`` (HMAC-SHA256, hex)."""
    return _fingerprint(key, _bytes(token)).decode()


@dataclass(frozen=True, slots=True)
class Scope:
    """What one kind of caller may do: the tokens it accepts, and whether it is open to all."""

    name: str
    tokens: TokenSet
    #: True: anyone may, token or not (``CIRETRY_API_OPEN`` on ``read``). Set on purpose only.
    open: bool = False

    @property
    def is_open(self) -> bool:
        """Does this scope let everyone in?"""
        return self.open

    @property
    def closed(self) -> bool:
        """Does it let no one in (not open, and no token configured)?"""
        return not self.open and not self.tokens.configured

    def allows(self, presented: str | None) -> bool:
        return self.open or self.tokens.matches(presented)

    def allows_fingerprint(self, key: bytes, presented: str | None) -> bool:
        """Does a session holding this token fingerprint (``fingerprint``) get in?"""
        return self.open or self.tokens.has_fingerprint(key, presented)


def scopes(config: Config) -> dict[str, Scope]:
    """The scopes of the configuration (module doc)."""
    legacy = TokenSet.of(config.api_token)
    admin = TokenSet.of(*config.admin_tokens)
    feedback = TokenSet.of(*config.feedback_tokens) | legacy | admin
    return {
        READ: Scope(READ, TokenSet.of(*config.read_tokens) | feedback, open=config.api_open),
        FEEDBACK: Scope(FEEDBACK, feedback),
        PUSH: Scope(PUSH, TokenSet.of(*config.push_tokens) | legacy),
        ADMIN: Scope(ADMIN, admin),
    }


__all__ = [
    "ADMIN",
    "BUILDKITE_SIGNATURE_MAX_AGE",
    "FEEDBACK",
    "PUSH",
    "READ",
    "SCOPES",
    "ProjectTokens",
    "Scope",
    "TokenSet",
    "bearer",
    "buildkite_signature_ok",
    "derive_key",
    "fingerprint",
    "scopes",
    "signature_ok",
]
