"""What a provider is asked to show, what it answered, and the one rule every publisher keeps:
look first (our own note is found by its marker, our status or check run by its name), then
create or edit, so a post repeated after a crash or by another replica edits instead of adding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from ciretry.common.errors import DependencyUnavailable
from ciretry.common.http import ApiResponse, HttpClient, TransientError

from ..explain import CheckRunOutput, CommitStatus, Target

How = Literal["created", "edited", "found"]


@dataclass(frozen=True, slots=True)
class Post:
    """One explanation for one target."""

    target: Target
    #: ``mr-<iid>`` / ``pr-<number>`` for a note or comment, the commit SHA for a status or run.
    subject: str
    pipeline_id: str
    #: The merge/pull request number (notes and comments).
    number: str | None = None
    sha: str | None = None
    #: The hidden first line of our note (notes and comments).
    marker: str = ""
    #: Markdown of the note or comment.
    body: str = ""
    status: CommitStatus | None = None
    check: CheckRunOutput | None = None
    #: The check run's ``details_url``.
    details_url: str | None = None


@dataclass(frozen=True, slots=True)
class Posted:
    provider_id: str | None
    how: How
    state: str | None = None


class PostRefused(Exception):
    """The provider said no in a way asking again will not change (403, 404, 422): given up."""

    def __init__(self, what: str, resp: ApiResponse) -> None:
        super().__init__(f"{what}: HTTP {resp.status}: {resp.text[:200]}")
        self.status = resp.status


class Publisher(Protocol):
    source: str

    async def publish(self, project: str, post: Post) -> Posted:
        """Show ``post`` (looked up first, created or edited). Raises ``DependencyUnavailable``
        when the provider does not answer (try later), ``PostRefused`` when it refuses."""
        ...


async def checked(http: HttpClient, what: str, round_: _Round) -> Posted:
    """``round_`` (look, then post) again after transient errors, the look included: a post
    that timed out may have landed. ``DependencyUnavailable`` when the tries run out."""
    try:
        return await http.retrying(round_, what)
    except TransientError as exc:
        raise DependencyUnavailable(str(exc)) from None


class _Round(Protocol):
    async def __call__(self) -> Posted: ...


def ok(resp: ApiResponse, what: str) -> ApiResponse:
    if resp.status in (200, 201):
        return resp
    raise PostRefused(what, resp)
