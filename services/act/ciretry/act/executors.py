"""Executors: the CI API calls behind a RetryRequested, checked before acting.

Every executor follows one loop: look at the provider for a newer attempt of the job (if there is
one, the retry already happened — maybe by us before a crash — and nothing is called), then call;
on 429/5xx/timeouts wait (Retry-After when given, else jittered exponential backoff) and go round
again, *including the check*, because a POST that timed out may well have succeeded. The result is
an ``Outcome`` value; the service turns it into RetryIssued / RetryFailed.

The check fails closed: when the provider does not answer it with 200 (a 403 after a token
rotation, a 400 from a proxy), nothing is called: the request stays pending and is tried again
after its failure backoff (``will_retry``), because calling without knowing could retry twice. A
404 (the pipeline or task is gone) is final: there is nothing left to retry.

Tokens go only into request headers; nothing here logs headers, and provider text copied into an
outcome is scrubbed of the token in case a provider echoes it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from ciretry.common.errors import DependencyUnavailable
from ciretry.common.events import RETRY_OF_VARIABLE, JobFinished, Resources, RetryRequested
from ciretry.common.resources import DEFAULT_VARIABLES, ResourceVariables
from ciretry.common.telemetry import client_trace_config

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    issued: bool
    new_job_id: str | None = None
    new_pipeline_id: str | None = None
    found_existing: bool = False
    status: int | None = None
    detail: str = ""
    #: A failure worth trying again later (the provider was down or rate-limited us).
    will_retry: bool = False


class Executor(Protocol):
    source: str

    async def execute(self, request: RetryRequested, job: JobFinished | None) -> Outcome: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PipelineOrigin:
    """How a provider says a pipeline was created by act: the request's key and the size the
    pipeline asked for."""

    retry_of: str
    resources: Resources | None = None


class PipelineLinks(Protocol):
    """Providers whose retries can leave their pipeline (GitLab creates new ones) answer where a
    pipeline came from, and where a ref's tip is (where a new pipeline would run)."""

    async def pipeline_link(self, project: str, pipeline_id: str) -> PipelineOrigin | None: ...

    async def ref_head(self, project: str, ref: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class HttpSettings:
    timeout_s: float = 15.0
    #: Rounds of check-then-call before giving up (with will_retry=True) on transient errors.
    max_attempts: int = 4
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    #: A Retry-After longer than this is not waited for here: the failure is reported as
    #: will_retry and the scheduler comes back later.
    retry_after_cap_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    data: Any
    text: str
    retry_after: float | None


class TransientError(Exception):
    """The provider did not answer usefully (timeout, connection reset, 429, 5xx)."""

    def __init__(self, detail: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.status = status
        self.retry_after = retry_after


class CannotCheck(Exception):
    """The check before acting got an answer other than 200: act must not call (fail closed)."""

    def __init__(self, what: str, resp: Response) -> None:
        super().__init__(f"cannot {what}: HTTP {resp.status}: {resp.text[:200]}")
        self.status = resp.status


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _transient(status: int) -> bool:
    return status == 429 or status >= 500


class _Http:
    """A session with auth headers, a timeout, and scrubbing of the token from any text."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        secret: str,
        settings: HttpSettings,
        session: aiohttp.ClientSession | None = None,
        auth: Callable[[str, str], Mapping[str, str]] | None = None,
        peer: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self._secret = secret
        self._auth = auth
        self._own = session is None
        self._session = session or aiohttp.ClientSession(
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
            trace_configs=[client_trace_config(peer or self.base_url)],
        )

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    async def request(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None
    ) -> Response:
        url = self.base_url + path
        headers = dict(self._auth(method, url)) if self._auth else None
        try:
            async with self._session.request(
                method, url, json=json, params=params, headers=headers
            ) as resp:
                text = await resp.text()
                data: Any = None
                if text and "json" in (resp.content_type or ""):
                    try:
                        data = msgspec.json.decode(text)
                    except msgspec.DecodeError:
                        data = None
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                result = Response(resp.status, data, self.scrub(text[:500]), retry_after)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransientError(
                f"{method} {path}: {type(exc).__name__}: {self.scrub(str(exc))}"
            ) from None
        if _transient(result.status):
            raise TransientError(
                f"{method} {path}: HTTP {result.status}: {result.text[:200]}",
                result.status,
                result.retry_after,
            )
        return result

    async def close(self) -> None:
        if self._own:
            await self._session.close()


class _Base:
    """The check-then-call loop shared by all providers."""

    source = ""

    def __init__(self, http: _Http, settings: HttpSettings, sleep: Sleep | None) -> None:
        self.http = http
        self.settings = settings
        self._sleep = sleep or asyncio.sleep

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        raise NotImplementedError

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        raise NotImplementedError

    def unsupported(self, request: RetryRequested) -> str | None:
        return None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        s = self.settings
        return float(min(s.backoff_cap_s, s.backoff_base_s * 2**attempt) * random.uniform(0.5, 1.0))

    async def execute(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        why = self.unsupported(request)
        if why is not None:
            return Outcome(issued=False, detail=why, will_retry=False)
        last: TransientError | None = None
        for attempt in range(self.settings.max_attempts):
            try:
                found = await self.find_newer(request, job)
                if found is not None:
                    return found
                return await self.call(request, job)
            except CannotCheck as exc:
                gone = exc.status == 404
                return Outcome(
                    issued=False,
                    status=exc.status,
                    detail=f"check before acting failed, not calling: {exc}"[:500],
                    will_retry=not gone,
                )
            except TransientError as exc:
                last = exc
                delay = self._delay(attempt, exc.retry_after)
                if attempt + 1 >= self.settings.max_attempts:
                    break
                if delay > self.settings.retry_after_cap_s:
                    break
                log.warning(
                    "%s %s: %s; again in %.1fs", self.source, request.idempotency_key, exc, delay
                )
                await self._sleep(delay)
        assert last is not None
        return Outcome(issued=False, status=last.status, detail=str(last)[:500], will_retry=True)

    async def close(self) -> None:
        await self.http.close()

    @staticmethod
    def refused(resp: Response, what: str) -> Outcome:
        return Outcome(
            issued=False,
            status=resp.status,
            detail=f"{what}: HTTP {resp.status}: {resp.text[:300]}",
            will_retry=False,
        )


# --- GitLab ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GitLabVariables:
    """The CI variables act sets on the pipelines it creates: the size of a rerun (what the
    runner config reads, e.g. the Kubernetes executor's overwrite variables), and the request's
    idempotency key (``retry_of``): people see where the pipeline came from, the check before
    acting recognizes it, and ingest links it into its attempt chain."""

    resources: ResourceVariables = DEFAULT_VARIABLES
    retry_of: str = RETRY_OF_VARIABLE

    def for_resources(self, r: Resources | None) -> list[tuple[str, str]]:
        return self.resources.render(r)


class GitLabExecutor(_Base):
    source = "gitlab"

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        variables: GitLabVariables = GitLabVariables(),
        settings: HttpSettings = HttpSettings(),
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        headers = {"PRIVATE-TOKEN": token} if token else {}
        super().__init__(
            _Http(base_url + "/api/v4", headers, token, settings, session, peer="gitlab"),
            settings,
            sleep,
        )
        self.variables = variables

    @staticmethod
    def _project(project: str) -> str:
        return quote(project, safe="")

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        p = self._project(request.project)
        if request.action == "retry_job":
            page = "1"
            while page:
                resp = await self.http.request(
                    "GET",
                    f"/projects/{p}/pipelines/{request.pipeline_id}/jobs",
                    params={"include_retried": "true", "per_page": "100", "page": page},
                )
                if resp.status != 200 or not isinstance(resp.data, list):
                    raise CannotCheck("list the pipeline's jobs", resp)
                newer = [
                    int(j["id"])
                    for j in resp.data
                    if j.get("name") == request.job_name and _gt(str(j["id"]), request.job_id)
                ]
                if newer:
                    return Outcome(
                        issued=True,
                        new_job_id=str(max(newer)),
                        found_existing=True,
                        detail=f"job {max(newer)} already retries {request.job_id}",
                    )
                page = _next_page(resp, page)
            return None
        ref = job.ref if job else None
        if not ref:
            return None
        # Our pipeline is created on the ref's head, which may have moved past the failed job's
        # commit: look at the ref's API-created pipelines newer than the failed one (newest
        # first, paging back until they are older, at most MAX_PIPELINE_PAGES pages), and
        # recognise ours by its CIRETRY_RETRY_OF key.
        page = "1"
        pages = 0
        while page and pages < MAX_PIPELINE_PAGES:
            pages += 1
            resp = await self.http.request(
                "GET",
                f"/projects/{p}/pipelines",
                params={
                    "ref": ref,
                    "source": "api",
                    "order_by": "id",
                    "sort": "desc",
                    "per_page": "100",
                    "page": page,
                },
            )
            if resp.status != 200 or not isinstance(resp.data, list):
                raise CannotCheck("list the ref's pipelines", resp)
            newer = [int(x["id"]) for x in resp.data if _gt(str(x["id"]), request.pipeline_id)]
            for pid in newer:
                got = await self.http.request("GET", f"/projects/{p}/pipelines/{pid}/variables")
                if got.status == 404:
                    continue  # deleted since it was listed: not ours to find any more
                if got.status != 200 or not isinstance(got.data, list):
                    raise CannotCheck(f"read pipeline {pid}'s variables", got)
                if any(
                    v.get("key") == self.variables.retry_of
                    and v.get("value") == request.idempotency_key
                    for v in got.data
                ):
                    return Outcome(
                        issued=True,
                        new_pipeline_id=str(pid),
                        found_existing=True,
                        detail=f"pipeline {pid} already reruns {request.job_id}",
                    )
            if len(newer) < len(resp.data):
                return None  # reached pipelines older than the failed one
            page = _next_page(resp, page)
        if page:
            log.warning(
                "gitlab %s: more than %d pages of newer API pipelines on %s; not checked further",
                request.idempotency_key,
                MAX_PIPELINE_PAGES,
                ref,
            )
        return None

    async def pipeline_link(self, project: str, pipeline_id: str) -> PipelineOrigin | None:
        """What created ``pipeline_id``: the request key in its ``CIRETRY_RETRY_OF`` variable
        and the size its variables ask for; None when act did not create it (or it is gone).
        Raises ``DependencyUnavailable`` when GitLab does not say: the caller must not guess."""
        p = self._project(project)
        try:
            resp = await self.http.request("GET", f"/projects/{p}/pipelines/{pipeline_id}/variables")
        except TransientError as exc:
            raise DependencyUnavailable(str(exc)) from None
        if resp.status == 404:
            return None
        if resp.status != 200 or not isinstance(resp.data, list):
            raise DependencyUnavailable(
                f"cannot read pipeline {pipeline_id}'s variables: HTTP {resp.status}"
            )
        variables = {
            str(v.get("key")): str(v.get("value"))
            for v in resp.data
            if isinstance(v, dict) and v.get("key") is not None and v.get("value") is not None
        }
        retry_of = variables.get(self.variables.retry_of)
        if not retry_of:
            return None
        return PipelineOrigin(retry_of, self.variables.resources.read(variables))

    async def ref_head(self, project: str, ref: str) -> str | None:
        """The commit ``ref`` (a branch or tag) points at now; None when it no longer exists.
        Raises ``DependencyUnavailable`` when GitLab does not say."""
        p = self._project(project)
        path = f"/projects/{p}/repository/commits/{quote(ref, safe='')}"
        try:
            resp = await self.http.request("GET", path)
        except TransientError as exc:
            raise DependencyUnavailable(str(exc)) from None
        if resp.status == 404:
            return None
        if resp.status != 200 or not isinstance(resp.data, dict) or not resp.data.get("id"):
            raise DependencyUnavailable(f"cannot read the tip of {ref}: HTTP {resp.status}")
        return str(resp.data["id"])

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        p = self._project(request.project)
        if request.action == "retry_job":
            resp = await self.http.request("POST", f"/projects/{p}/jobs/{request.job_id}/retry")
            if resp.status in (200, 201) and isinstance(resp.data, dict):
                return Outcome(issued=True, new_job_id=str(resp.data.get("id")), status=resp.status)
            return self.refused(resp, "retry job")
        ref = job.ref if job else None
        if not ref:
            return Outcome(issued=False, detail="no ref known for this pipeline: cannot recreate")
        # The size goes with every pipeline act creates, not only OOM reruns: a job rerun with
        # more memory and later preempted keeps its larger size.
        variables = [(self.variables.retry_of, request.idempotency_key)]
        variables += self.variables.for_resources(request.resources)
        body = {
            "ref": ref,
            "variables": [{"key": k, "value": v, "variable_type": "env_var"} for k, v in variables],
        }
        resp = await self.http.request("POST", f"/projects/{p}/pipeline", json=body)
        if resp.status in (200, 201) and isinstance(resp.data, dict):
            return Outcome(
                issued=True, new_pipeline_id=str(resp.data.get("id")), status=resp.status
            )
        return self.refused(resp, "create pipeline")


def _gt(a: str, b: str) -> bool:
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a > b


#: Pages of newer pipelines searched for our own before giving up (the call then creates one):
#: bounds the check on a very busy ref.
MAX_PIPELINE_PAGES = 20


def _next_page(resp: Response, page: str) -> str:
    # GitLab's X-Next-Page is not kept on Response; a full page means there may be another.
    return str(int(page) + 1) if isinstance(resp.data, list) and len(resp.data) >= 100 else ""


# --- GitHub ---------------------------------------------------------------------------------


class GitHubExecutor(_Base):
    source = "github"

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        settings: HttpSettings = HttpSettings(),
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        super().__init__(
            _Http(base_url, headers, token, settings, session, peer="github"), settings, sleep
        )

    def unsupported(self, request: RetryRequested) -> str | None:
        if request.action == "rerun_with_resources":
            return "GitHub Actions cannot change a job's resources on rerun"
        return None

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        repo, run = request.project, request.pipeline_id
        page = 1
        while True:
            resp = await self.http.request(
                "GET",
                f"/repos/{repo}/actions/runs/{run}/jobs",
                params={"filter": "all", "per_page": "100", "page": str(page)},
            )
            if resp.status != 200 or not isinstance(resp.data, dict):
                raise CannotCheck("list the run's jobs", resp)
            jobs = resp.data.get("jobs") or []
            newer = [
                j
                for j in jobs
                if j.get("name") == request.job_name and _gt(str(j.get("id")), request.job_id)
            ]
            if newer:
                best = max(newer, key=lambda j: int(j["id"]))
                return Outcome(
                    issued=True,
                    new_job_id=str(best["id"]),
                    found_existing=True,
                    detail=f"run attempt {best.get('run_attempt')} already reruns the job",
                )
            if len(jobs) < 100:
                return None
            page += 1

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        repo = request.project
        if request.action == "retry_job":
            path = f"/repos/{repo}/actions/jobs/{request.job_id}/rerun"
        else:
            path = f"/repos/{repo}/actions/runs/{request.pipeline_id}/rerun-failed-jobs"
        resp = await self.http.request("POST", path)
        if resp.status in (200, 201, 204):
            # GitHub answers 201 with no body: the new job id appears in the run's jobs later.
            return Outcome(issued=True, new_pipeline_id=request.pipeline_id, status=resp.status)
        return self.refused(resp, "rerun")


# --- Taskcluster ----------------------------------------------------------------------------


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


class TaskclusterExecutor(_Base):
    source = "taskcluster"

    def __init__(
        self,
        root_url: str,
        credentials: str,
        *,
        settings: HttpSettings = HttpSettings(),
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        """``credentials``: ``clientId:accessToken`` (empty: anonymous)."""
        client_id, _, access = credentials.partition(":")
        auth = None
        if client_id and access:

            def auth(method: str, url: str) -> Mapping[str, str]:
                return {"Authorization": hawk_header(client_id, access, method, url)}

        super().__init__(
            _Http(
                root_url + "/api/queue/v1", {}, access, settings, session, auth, peer="taskcluster"
            ),
            settings,
            sleep,
        )

    def unsupported(self, request: RetryRequested) -> str | None:
        if request.action != "retry_job":
            return f"Taskcluster executor supports retry_job only, not {request.action}"
        return None

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        failed_run = job.attempt if job is not None and job.attempt is not None else None
        resp = await self.http.request("GET", f"/task/{request.job_id}/status")
        if resp.status != 200 or not isinstance(resp.data, dict):
            raise CannotCheck("read the task's status", resp)
        runs = (resp.data.get("status") or {}).get("runs") or []
        ids = [int(r["runId"]) for r in runs]
        if failed_run is None or not ids or max(ids) <= failed_run:
            return None
        return Outcome(
            issued=True,
            new_job_id=f"{request.job_id}#{max(ids)}",
            found_existing=True,
            detail=f"run {max(ids)} already reruns run {failed_run}",
        )

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        resp = await self.http.request("POST", f"/task/{request.job_id}/rerun")
        if resp.status == 200 and isinstance(resp.data, dict):
            runs = (resp.data.get("status") or {}).get("runs") or []
            new = max((int(r["runId"]) for r in runs), default=None)
            return Outcome(
                issued=True,
                new_job_id=f"{request.job_id}#{new}" if new is not None else None,
                status=resp.status,
            )
        return self.refused(resp, "rerun task")


# --- from configuration ---------------------------------------------------------------------


@dataclass(slots=True)
class Executors:
    """Executors by source. A source without one gets RetryFailed(no executor)."""

    by_source: dict[str, Executor] = field(default_factory=dict)

    def get(self, source: str) -> Executor | None:
        return self.by_source.get(source)

    def links(self, source: str) -> PipelineLinks | None:
        """The source's pipeline-origin lookup, when its retries can create pipelines."""
        executor = self.by_source.get(source)
        return executor if isinstance(executor, GitLabExecutor) else None

    async def close(self) -> None:
        for e in self.by_source.values():
            await e.close()


def executors_from_config(
    config: Any,
    *,
    variables: GitLabVariables = GitLabVariables(),
    settings: HttpSettings = HttpSettings(),
) -> Executors:
    """GitLab/GitHub/Taskcluster executors from ``ciretry.common.config.Config`` (uses
    gitlab_url/gitlab_token, github_url/github_token, taskcluster_url/taskcluster_token).
    Must be called inside a running event loop (aiohttp sessions)."""
    return Executors(
        {
            "gitlab": GitLabExecutor(
                config.gitlab_url, config.gitlab_token, variables=variables, settings=settings
            ),
            "github": GitHubExecutor(config.github_url, config.github_token, settings=settings),
            "taskcluster": TaskclusterExecutor(
                config.taskcluster_url, config.taskcluster_token, settings=settings
            ),
        }
    )


__all__ = [
    "Executor",
    "Executors",
    "GitHubExecutor",
    "GitLabExecutor",
    "GitLabVariables",
    "HttpSettings",
    "Outcome",
    "PipelineLinks",
    "PipelineOrigin",
    "TaskclusterExecutor",
    "executors_from_config",
    "hawk_header",
    "parse_retry_after",
]
