"""The executors act runs, by source, built from configuration."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ciretry.common.http import DEFAULT_SETTINGS, HttpSettings, Transport

from .base import Executor, PipelineLinks
from .buildkite import BuildkiteExecutor
from .github import GitHubExecutor
from .gitlab import GitLabExecutor, GitLabVariables
from .taskcluster import TaskclusterExecutor


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
    variables: GitLabVariables | None = None,
    settings: HttpSettings | None = None,
    transport: Transport | None = None,
) -> Executors:
    """GitLab/GitHub/Taskcluster/Buildkite executors from ``ciretry.common.config.Config`` (uses
    gitlab_url/gitlab_token, github_url/github_token, taskcluster_url/taskcluster_token,
    buildkite_url/buildkite_token), over
    ``transport`` when given (the caller closes it), else each over its own aiohttp session.
    Must be called inside a running event loop (aiohttp sessions). ``settings``: by default,
    ``DEFAULT_SETTINGS`` with the config's ``provider_max_in_flight``."""
    if settings is None:
        settings = replace(DEFAULT_SETTINGS, max_in_flight=config.provider_max_in_flight)
    return Executors(
        {
            "gitlab": GitLabExecutor(
                config.gitlab_url,
                config.gitlab_token,
                variables=variables or GitLabVariables(),
                settings=settings,
                transport=transport,
            ),
            "github": GitHubExecutor(
                config.github_url, config.github_token, settings=settings, transport=transport
            ),
            "taskcluster": TaskclusterExecutor(
                config.taskcluster_url,
                config.taskcluster_token,
                settings=settings,
                transport=transport,
            ),
            "buildkite": BuildkiteExecutor(
                config.buildkite_url, config.buildkite_token, settings=settings, transport=transport
            ),
        }
    )
