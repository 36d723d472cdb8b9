"""The CI providers' API conventions, in one place: each service reaches a provider through an
``HttpClient`` built here, whatever it wants from it (act: retries; classify: logs; ingest:
reconciliation).

Each provider is a ``ProviderApi`` value: ``GITLAB.client(transport, url, token)``.

* **GitLab** REST v4 (``GITLAB``): ``/api/v4`` under the instance URL; the token in
  ``PRIVATE-TOKEN``; a project named by id or by its full path quoted as one path segment
  (``group%2Fproject``: ``gitlab_project``); offset paging with ``page``/``per_page``
  (``gitlab_pages``), the next page named by ``X-Next-Page`` (empty on the last one), else
  counted from ``X-Total``, else a full page means there may be another (GitLab leaves the totals
  out above 10,000 rows).
* **GitHub** REST (``GITHUB``): ``Authorization: Bearer``, the ``vnd.github+json`` media
  type and a pinned ``X-GitHub-Api-Version``.
* **Taskcluster**'s queue (``TASKCLUSTER_QUEUE``): ``/api/queue/v1`` under the root URL;
  requests signed with Hawk (``hawk_header``) from ``clientId:accessToken`` credentials, or
  anonymous without them (public artifacts such as task logs need none).
* **Buildkite** REST (``BUILDKITE``): ``/v2`` under ``https://api.buildkite.com``, an API access
  token as ``Authorization: Bearer``; a job is addressed through its organization, pipeline and
  build number (``buildkite_job``), the project being ``<organization>/<pipeline>`` slugs.

Pure: building clients and reading pages does no I/O of its own (the transport does).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from .http import (
    DEFAULT_SETTINGS,
    ApiResponse,
    Auth,
    HttpClient,
    HttpSettings,
    Params,
    Sleep,
    Transport,
    query_pairs,
)


@dataclass(frozen=True, slots=True)
class ProviderApi:
    """How one provider's API is reached: its path under the instance URL, the headers every
    call sends, and how a configured token becomes credentials (and which part of it is the
    secret to scrub). ``client`` builds the ``HttpClient`` for one instance."""

    prefix: str
    credentials: Callable[[str], Mapping[str, str] | Auth | None]
    headers: Mapping[str, str] = field(default_factory=dict)
    secret: Callable[[str], str] = str

    def client(
        self,
        transport: Transport,
        base_url: str,
        token: str,
        *,
        settings: HttpSettings = DEFAULT_SETTINGS,
        sleep: Sleep | None = None,
    ) -> HttpClient:
        return HttpClient(
            transport,
            base_url.rstrip("/") + self.prefix,
            headers=self.headers,
            credentials=self.credentials(token) if token else None,
            secret=self.secret(token),
            settings=settings,
            sleep=sleep,
        )


# --- GitLab ---------------------------------------------------------------------------------

GITLAB = ProviderApi("/api/v4", lambda token: {"PRIVATE-TOKEN": token})
GITLAB_PER_PAGE = 100


def gitlab_project(project: str) -> str:
    """The API path of a project given by id or full path: ``/projects/group%2Fproject``."""
    return f"/projects/{quote(project, safe='')}"


@dataclass(frozen=True, slots=True)
class GitLabPage:
    """One page of a listing: the answer, its number, and the next one's (None after the last,
    and after an answer other than 200, which the caller judges)."""

    response: ApiResponse
    number: int
    next: int | None

    @property
    def items(self) -> list[Any] | None:
        """The page's rows; None when the answer was not a JSON array."""
        data = self.response.data
        return data if isinstance(data, list) else None


def gitlab_next_page(response: ApiResponse, number: int, per_page: int) -> int | None:
    """The page after ``number`` as GitLab says it (module doc), None after the last."""
    if response.status != 200:
        return None
    following = response.headers.get("X-Next-Page")
    if following is not None:
        following = following.strip()
        return int(following) if following.isdigit() else None
    total = response.headers.get("X-Total", "").strip()
    if total.isdigit():
        return number + 1 if number * per_page < int(total) else None
    rows = response.data if isinstance(response.data, list) else []
    return number + 1 if len(rows) >= per_page else None


async def gitlab_pages(
    client: HttpClient,
    path: str,
    params: Params = (),
    *,
    per_page: int = GITLAB_PER_PAGE,
    retry: bool = False,
) -> AsyncIterator[GitLabPage]:
    """The pages of a listing, first to last, each fetched as the caller asks for it; with
    ``retry``, each page is tried again on transient errors (``HttpClient.retrying``)."""
    number: int | None = 1
    while number is not None:
        query = [*query_pairs(params), ("per_page", str(per_page)), ("page", str(number))]

        async def fetch(query: list[tuple[str, str]] = query) -> ApiResponse:
            return await client.request("GET", path, params=query)

        response = await (client.retrying(fetch, f"GET {path}") if retry else fetch())
        following = gitlab_next_page(response, number, per_page)
        yield GitLabPage(response, number, following)
        number = following


# --- GitHub ---------------------------------------------------------------------------------

GITHUB_API_VERSION = "2022-11-28"
GITHUB = ProviderApi(
    "",
    lambda token: {"Authorization": f"Bearer {token}"},
    {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": GITHUB_API_VERSION},
)


# --- Buildkite ------------------------------------------------------------------------------

BUILDKITE = ProviderApi("/v2", lambda token: {"Authorization": f"Bearer {token}"})


def buildkite_job(project: str, build: str, job_id: str) -> str:
    """The API path of one job: ``/organizations/<org>/pipelines/<pipeline>/builds/<n>/jobs/<id>``
    for the project ``<org>/<pipeline>`` (each part quoted as one segment)."""
    org, _, pipeline = project.partition("/")
    parts = (org, pipeline, build, job_id)
    org, pipeline, build, job_id = (quote(p, safe="") for p in parts)
    return f"/organizations/{org}/pipelines/{pipeline}/builds/{build}/jobs/{job_id}"


# --- Taskcluster ----------------------------------------------------------------------------


def _hawk(credentials: str) -> Auth | None:
    client_id, _, access = credentials.partition(":")
    if not (client_id and access):
        return None

    def auth(method: str, url: str) -> Mapping[str, str]:
        return {"Authorization": hawk_header(client_id, access, method, url)}

    return auth


#: The queue service; its token is ``clientId:accessToken`` (the access token is the secret).
TASKCLUSTER_QUEUE = ProviderApi(
    "/api/queue/v1", _hawk, secret=lambda credentials: credentials.partition(":")[2]
)


def hawk_header(client_id: str, access_token: str, method: str, url: str) -> str:
    """A Hawk Authorization header (what Taskcluster's clients send), without payload hash."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    ts = str(int(time.time()))
    nonce = base64.urlsafe_b64encode(os.urandom(6)).decode().rstrip("=")
    normalized = (
        f"hawk.1.header\n{ts}\n{nonce}\n{method.upper()}\n{resource}\n"
        f"{parts.hostname}\n{port}\n\n\n"
    )
    mac = base64.b64encode(
        hmac.new(access_token.encode(), normalized.encode(), hashlib.sha256).digest()
    ).decode()
    return f'Hawk id="{client_id}", ts="{ts}", nonce="{nonce}", mac="{mac}"'


__all__ = [
    "BUILDKITE",
    "GITHUB",
    "GITHUB_API_VERSION",
    "GITLAB",
    "GITLAB_PER_PAGE",
    "TASKCLUSTER_QUEUE",
    "GitLabPage",
    "ProviderApi",
    "buildkite_job",
    "gitlab_next_page",
    "gitlab_pages",
    "gitlab_project",
    "hawk_header",
]
