"""Executors: the CI API calls behind a RetryRequested, checked before acting. One module per
provider over the one HTTP client of ``ciretry.common.http`` (its transport injectable: tests
answer in-process, production speaks aiohttp), with each provider's API conventions in
``ciretry.common.providers``.

| module | what | kind |
| --- | --- | --- |
| ``base`` | ``Outcome``, the ``Executor`` protocol, the check-then-call loop (``CheckingExecutor``): check fails closed, no call once the request is no longer held (``ClaimLost``), 404 final, transient errors retried with the check | the loop; I/O through its client |
| ``listings`` | one listing of a pipeline's jobs for its requests checked at once, each listing sent after every sharer's claim | the coalescer; I/O through the executor's fetch |
| ``gitlab`` | retry a job, create a pipeline (recreate, more resources); pipeline origins and ref heads for attempt chains | adapter |
| ``github`` | rerun a job or a run's failed jobs | adapter |
| ``taskcluster`` | rerun a task | adapter |
| ``buildkite`` | retry a job | adapter |
| ``registry`` | ``Executors`` by source, ``executors_from_config`` | wiring |

A new provider: a module here subclassing ``CheckingExecutor`` (``find_newer``, ``call``,
``unsupported``), its API conventions in ``ciretry.common.providers``, one entry in
``executors_from_config``; the whole checklist is docs/adding-a-provider.md.
"""

from ciretry.common.http import HttpSettings, TransientError, parse_retry_after
from ciretry.common.providers import hawk_header

from .base import (
    CannotCheck,
    CheckingExecutor,
    ClaimLost,
    Confirm,
    Executor,
    Outcome,
    PipelineLinks,
    PipelineOrigin,
    unclaimed,
)
from .buildkite import BuildkiteExecutor
from .github import GitHubExecutor
from .gitlab import MAX_PIPELINE_PAGES, GitLabExecutor, GitLabVariables
from .registry import Executors, executors_from_config
from .taskcluster import TaskclusterExecutor

__all__ = [
    "MAX_PIPELINE_PAGES",
    "BuildkiteExecutor",
    "CannotCheck",
    "CheckingExecutor",
    "ClaimLost",
    "Confirm",
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
    "TransientError",
    "executors_from_config",
    "hawk_header",
    "parse_retry_after",
    "unclaimed",
]
