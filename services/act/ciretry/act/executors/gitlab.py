"""GitLab's executor: retry a job, or create a pipeline on the job's ref (a recreated pipeline,
or a rerun with more resources), each checked first (``base``).

A retried job stays in its pipeline: the check lists the pipeline's jobs, retried ones included,
for a newer job of the same name; the requests of one pipeline carried out at once share that
listing (``listings``: one listing sent after each of their claims). A created pipeline runs on
the ref's head, which may have moved past the failed job's commit: the check looks at the ref's
API-created pipelines newer than the failed one and recognizes ours by the request's key in its
``CIRETRY_RETRY_OF`` variable. The same variables answer where a pipeline came from
(``pipeline_link``) for ingest's attempt chains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ciretry.common.errors import DependencyUnavailable
from ciretry.common.events import RETRY_OF_VARIABLE, JobFinished, Resources, RetryRequested
from ciretry.common.http import (
    DEFAULT_SETTINGS,
    ApiResponse,
    HttpSettings,
    Sleep,
    TransientError,
    Transport,
)
from ciretry.common.providers import GITLAB, gitlab_pages, gitlab_project
from ciretry.common.resources import DEFAULT_VARIABLES, ResourceVariables

from .base import CannotCheck, CheckingExecutor, Outcome, PipelineOrigin, newer_id
from .listings import Listing, SharedListings

log = logging.getLogger(__name__)

#: Pages of newer pipelines searched for our own before giving up (the call then creates one):
#: bounds the check on a very busy ref.
MAX_PIPELINE_PAGES = 20


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


class GitLabExecutor(CheckingExecutor):
    source = "gitlab"
    api = GITLAB

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        variables: GitLabVariables = GitLabVariables(),
        settings: HttpSettings = DEFAULT_SETTINGS,
        transport: Transport | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        super().__init__(base_url, token, settings=settings, transport=transport, sleep=sleep)
        self.variables = variables
        #: Each pipeline's jobs, by (project, pipeline), listed once for the requests that
        #: check them at once.
        self.pipeline_jobs: SharedListings[tuple[str, str]] = SharedListings(self._list_jobs)

    async def _list_jobs(self, pipeline: tuple[str, str]) -> Listing:
        """Every page of a pipeline's jobs, retried ones included, up to the first that does
        not come back as a list of jobs."""
        project, pipeline_id = pipeline
        path = f"{gitlab_project(project)}/pipelines/{pipeline_id}/jobs"
        pages: list[list[Any]] = []
        try:
            async for page in gitlab_pages(self.http, path, {"include_retried": "true"}):
                if page.response.status != 200 or page.items is None:
                    return Listing(tuple(pages), refused=page.response)
                pages.append(page.items)
        except TransientError as exc:
            return Listing(tuple(pages), failed=exc)
        return Listing(tuple(pages))

    async def close(self) -> None:
        await self.pipeline_jobs.close()
        await super().close()

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        project = gitlab_project(request.project)
        if request.action == "retry_job":
            listing = await self.pipeline_jobs.get((request.project, request.pipeline_id))
            for same_name in listing.named(request.job_name, "list the pipeline's jobs"):
                newer = [int(j["id"]) for j in same_name if newer_id(str(j["id"]), request.job_id)]
                if newer:
                    return Outcome(
                        issued=True,
                        new_job_id=str(max(newer)),
                        found_existing=True,
                        detail=f"job {max(newer)} already retries {request.job_id}",
                    )
            return None
        ref = job.ref if job else None
        if not ref:
            return None
        # Our pipeline is created on the ref's head, which may have moved past the failed job's
        # commit: look at the ref's API-created pipelines newer than the failed one (newest
        # first, paging back until they are older, at most MAX_PIPELINE_PAGES pages), and
        # recognise ours by its CIRETRY_RETRY_OF key.
        query = {"ref": ref, "source": "api", "order_by": "id", "sort": "desc"}
        async for page in gitlab_pages(self.http, f"{project}/pipelines", query):
            if page.response.status != 200 or page.items is None:
                raise CannotCheck("list the ref's pipelines", page.response)
            newer = [
                int(x["id"]) for x in page.items if newer_id(str(x["id"]), request.pipeline_id)
            ]
            for pid in newer:
                got = await self.http.request("GET", f"{project}/pipelines/{pid}/variables")
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
            if len(newer) < len(page.items):
                return None  # reached pipelines older than the failed one
            if page.next is not None and page.number >= MAX_PIPELINE_PAGES:
                log.warning(
                    "gitlab %s: more than %d pages of newer API pipelines on %s; not checked "
                    "further",
                    request.idempotency_key,
                    MAX_PIPELINE_PAGES,
                    ref,
                )
                return None
        return None

    async def pipeline_link(self, project: str, pipeline_id: str) -> PipelineOrigin | None:
        """What created ``pipeline_id``: the request key in its ``CIRETRY_RETRY_OF`` variable
        and the size its variables ask for; None when act did not create it (or it is gone).
        Raises ``DependencyUnavailable`` when GitLab does not say: the caller must not guess."""
        path = f"{gitlab_project(project)}/pipelines/{pipeline_id}/variables"
        resp = await self._look_up(path)
        if resp is None:
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
        path = f"{gitlab_project(project)}/repository/commits/{quote(ref, safe='')}"
        resp = await self._look_up(path)
        if resp is None:
            return None
        if resp.status != 200 or not isinstance(resp.data, dict) or not resp.data.get("id"):
            raise DependencyUnavailable(f"cannot read the tip of {ref}: HTTP {resp.status}")
        return str(resp.data["id"])

    async def _look_up(self, path: str) -> ApiResponse | None:
        """One GET for attempt chains; None on 404 (gone). ``DependencyUnavailable`` when
        GitLab did not answer: the caller must not guess."""
        try:
            resp = await self.http.request("GET", path)
        except TransientError as exc:
            raise DependencyUnavailable(str(exc)) from None
        return None if resp.status == 404 else resp

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        project = gitlab_project(request.project)
        if request.action == "retry_job":
            resp = await self.http.request("POST", f"{project}/jobs/{request.job_id}/retry")
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
        resp = await self.http.request("POST", f"{project}/pipeline", json=body)
        if resp.status in (200, 201) and isinstance(resp.data, dict):
            return Outcome(
                issued=True, new_pipeline_id=str(resp.data.get("id")), status=resp.status
            )
        return self.refused(resp, "create pipeline")
