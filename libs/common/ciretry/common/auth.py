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

Who may do what is a ``Scope`` (a name, its tokens, and whether it is open while no token is
configured); ``scopes(config)`` builds today's two from the configuration. Today: ``webhooks``
(``/webhooks/kubernetes`` and ``/pulse``: closed without a token) and ``read`` (the audit API
and dashboard: open without a token). Both take ``CIRETRY_API_TOKEN``. GitLab, GitHub and
Buildkite webhook secrets have schemes of their own and are checked with ``ProjectTokens``,
``signature_ok`` and ``buildkite_signature_ok`` (or ``TokenSet`` for Buildkite's plain token).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .config import Config

#: Today's scopes (see the module doc).
WEBHOOKS: Final = "webhooks"
READ: Final = "read"

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


@dataclass(frozen=True, slots=True)
class Scope:
    """What one kind of caller may do: its tokens, and what happens while none is configured."""

    name: str
    tokens: TokenSet
    #: True: anyone may while no token is configured (today's read API); False: no one may.
    open_without_tokens: bool = False

    @property
    def is_open(self) -> bool:
        """Does this scope let everyone in (no token configured, and open then)?"""
        return self.open_without_tokens and not self.tokens.configured

    def allows(self, presented: str | None) -> bool:
        return self.is_open or self.tokens.matches(presented)


def scopes(config: Config) -> dict[str, Scope]:
    """Today's scopes from the configuration (module doc)."""
    api = TokenSet.of(config.api_token)
    return {
        WEBHOOKS: Scope(WEBHOOKS, api, open_without_tokens=False),
        READ: Scope(READ, api, open_without_tokens=True),
    }


__all__ = [
    "BUILDKITE_SIGNATURE_MAX_AGE",
    "READ",
    "WEBHOOKS",
    "ProjectTokens",
    "Scope",
    "TokenSet",
    "bearer",
    "buildkite_signature_ok",
    "scopes",
    "signature_ok",
]
