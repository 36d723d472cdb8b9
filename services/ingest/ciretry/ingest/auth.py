"""Webhook authentication: constant-time, never logging a secret or what was presented.

GitLab secrets (``CIRETRY_GITLAB_WEBHOOK_SECRETS``, comma separated) are either global or scoped
to one project with the form ``project:<id>:<secret>`` (per-project webhooks with their own
secret). A token is compared with *every* configured secret, without stopping at the first match,
so the time taken does not tell how many secrets there are or which one matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_SCOPED = "project:"


@dataclass(frozen=True, slots=True)
class GitLabSecrets:
    global_secrets: tuple[bytes, ...] = ()
    scoped: dict[str, tuple[bytes, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, secrets: Iterable[str]) -> GitLabSecrets:
        global_: list[bytes] = []
        scoped: dict[str, list[bytes]] = {}
        for entry in secrets:
            if entry.startswith(_SCOPED) and entry.count(":") >= 2:
                _, project, secret = entry.split(":", 2)
                if project and secret:
                    scoped.setdefault(project, []).append(secret.encode())
                    continue
            if entry:
                global_.append(entry.encode())
        return cls(tuple(global_), {k: tuple(v) for k, v in scoped.items()})

    @property
    def configured(self) -> bool:
        return bool(self.global_secrets or self.scoped)

    @property
    def has_scoped(self) -> bool:
        return bool(self.scoped)

    def check_global(self, token: str | None) -> bool:
        return _any_equal(token, self.global_secrets)

    def check_project(self, token: str | None, project: str | None) -> bool:
        if project is None:
            return False
        return _any_equal(token, self.scoped.get(project, ()))


def _any_equal(token: str | None, secrets: Sequence[bytes]) -> bool:
    if token is None or not secrets:
        return False
    presented = token.encode("utf-8", "surrogateescape")
    ok = False
    for secret in secrets:
        # No short-circuit: every secret is compared whatever the earlier results.
        ok |= hmac.compare_digest(presented, secret)
    return ok


def github_signature_ok(secrets: Sequence[str], body: bytes, signature: str | None) -> bool:
    """``X-Hub-Signature-256: sha256=<hex hmac of the raw body>`` against every secret."""
    if not signature or not secrets or not signature.startswith("sha256="):
        return False
    presented = signature[7:].strip().lower().encode("ascii", "replace")
    ok = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
        ok |= hmac.compare_digest(presented, expected)
    return ok


def bearer_ok(token: str, authorization: str | None) -> bool:
    """``Authorization: Bearer <token>`` for the endpoints without a provider scheme."""
    if not token or not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), token.encode())
