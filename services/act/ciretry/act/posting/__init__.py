"""Posting explanations where people look (``act.explain`` renders them): a publisher per
provider over the executors' HTTP clients, each looking before it posts.

| module | what |
| --- | --- |
| ``base`` | ``Post``, ``Posted``, the ``Publisher`` protocol, ``PostRefused``, the retry round |
| ``gitlab`` | the merge request note and the ``ciretry`` commit status |
| ``github`` | the ``ciretry`` check run with annotations, and the pull request comment |
"""

from __future__ import annotations

from collections.abc import Mapping

from ..executors import Executors, GitHubExecutor, GitLabExecutor
from .base import Post, Posted, PostRefused, Publisher
from .github import GitHubPublisher
from .gitlab import GitLabPublisher


def publishers_from(executors: Executors) -> Mapping[str, Publisher]:
    """A publisher for each provider that has one, over its executor's client (same token,
    same transport)."""
    out: dict[str, Publisher] = {}
    for source, ex in executors.by_source.items():
        if isinstance(ex, GitLabExecutor):
            out[source] = GitLabPublisher(ex.http)
        elif isinstance(ex, GitHubExecutor):
            out[source] = GitHubPublisher(ex.http)
    return out


__all__ = [
    "GitHubPublisher",
    "GitLabPublisher",
    "Post",
    "PostRefused",
    "Posted",
    "Publisher",
    "publishers_from",
]
