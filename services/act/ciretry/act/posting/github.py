"""GitHub: the ``ciretry`` check run on the head SHA (summary and annotations), updated in place,
and optionally one pull request comment, edited in place.

* Check run: ``GET /repos/:repo/commits/:sha/check-runs?check_name=ciretry``; ``PATCH
  /repos/:repo/check-runs/:id`` when its output differs, ``POST /repos/:repo/check-runs`` when
  there is none. GitHub *appends* the annotations of an update to those the run has, so an update
  sends only the annotations ``GET /repos/:repo/check-runs/:id/annotations`` does not list yet.
* Comment: ``GET /repos/:repo/issues/:number/comments`` (pages of 100) for the comment starting
  with our marker; ``PATCH /repos/:repo/issues/comments/:id`` or ``POST
  /repos/:repo/issues/:number/comments``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ciretry.common.http import HttpClient

from ..explain import NAME, Annotation, CheckRunOutput
from .base import Post, Posted, PostRefused, checked, ok

PER_PAGE = 100
#: Pages of comments searched for ours (10,000 comments): bounds the look on a huge thread.
MAX_PAGES = 100


class GitHubPublisher:
    source = "github"

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    async def publish(self, project: str, post: Post) -> Posted:
        if post.target == "check_run":
            return await checked(self.http, f"github check run {post.subject}",
                                 lambda: self._check_run(project, post))  # fmt: skip
        if post.target == "pr_comment":
            return await checked(self.http, f"github comment {post.subject}",
                                 lambda: self._comment(project, post))  # fmt: skip
        raise ValueError(f"GitHub has no {post.target}")

    async def _check_run(self, repo: str, post: Post) -> Posted:
        assert post.check is not None and post.sha
        out = post.check
        state = out.conclusion or out.status
        listed = await self.http.request(
            "GET",
            f"/repos/{repo}/commits/{post.sha}/check-runs",
            params={"check_name": NAME, "filter": "latest", "per_page": str(PER_PAGE)},
        )
        if listed.status != 200 or not isinstance(listed.data, dict):
            raise PostRefused("list the commit's check runs", listed)
        runs = [r for r in listed.data.get("check_runs") or [] if isinstance(r, dict)]
        ours = [r for r in runs if r.get("name") == NAME]
        if not ours:
            body = {"name": NAME, "head_sha": post.sha, "external_id": post.pipeline_id,
                    **_fields(out, out.annotations)}  # fmt: skip
            if post.details_url:
                body["details_url"] = post.details_url
            resp = ok(await self.http.request("POST", f"/repos/{repo}/check-runs", json=body),
                      "create check run")  # fmt: skip
            return Posted(_id(resp.data), "created", state)
        run = max(ours, key=lambda r: int(r.get("id") or 0))
        run_id = str(run.get("id"))
        shown = run.get("output") or {}
        have = await self._annotations(repo, run_id)
        new = tuple(a for a in out.annotations if _key(asdict(a)) not in have)
        same = (
            run.get("status") == out.status
            and run.get("conclusion") == out.conclusion
            and shown.get("title") == out.title
            and shown.get("summary") == out.summary
        )
        if same and not new:
            return Posted(run_id, "found", state)
        ok(
            await self.http.request(
                "PATCH", f"/repos/{repo}/check-runs/{run_id}", json=_fields(out, new)
            ),
            "update check run",
        )
        return Posted(run_id, "edited", state)

    async def _annotations(self, repo: str, run_id: str) -> set[tuple[Any, ...]]:
        have: set[tuple[Any, ...]] = set()
        for page in range(1, MAX_PAGES + 1):
            resp = await self.http.request(
                "GET",
                f"/repos/{repo}/check-runs/{run_id}/annotations",
                params={"per_page": str(PER_PAGE), "page": str(page)},
            )
            if resp.status != 200 or not isinstance(resp.data, list):
                raise PostRefused("list the check run's annotations", resp)
            have |= {_key(a) for a in resp.data if isinstance(a, dict)}
            if len(resp.data) < PER_PAGE:
                break
        return have

    async def _comment(self, repo: str, post: Post) -> Posted:
        path = f"/repos/{repo}/issues/{post.number}/comments"
        found: dict[str, Any] | None = None
        for page in range(1, MAX_PAGES + 1):
            resp = await self.http.request(
                "GET", path, params={"per_page": str(PER_PAGE), "page": str(page)}
            )
            if resp.status != 200 or not isinstance(resp.data, list):
                raise PostRefused("list the pull request's comments", resp)
            found = next(
                (
                    c
                    for c in resp.data
                    if isinstance(c, dict) and str(c.get("body", "")).startswith(post.marker)
                ),
                None,
            )
            if found is not None or len(resp.data) < PER_PAGE:
                break
        if found is None:
            resp = ok(await self.http.request("POST", path, json={"body": post.body}),
                      "add comment")  # fmt: skip
            return Posted(_id(resp.data), "created")
        if found.get("body") == post.body:
            return Posted(str(found.get("id")), "found")
        ok(
            await self.http.request(
                "PATCH", f"/repos/{repo}/issues/comments/{found.get('id')}",
                json={"body": post.body},
            ),
            "edit comment",
        )  # fmt: skip
        return Posted(str(found.get("id")), "edited")


def _fields(out: CheckRunOutput, annotations: tuple[Annotation, ...]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "status": out.status,
        "output": {
            "title": out.title,
            "summary": out.summary,
            "annotations": [asdict(a) for a in annotations],
        },
    }
    if out.conclusion is not None:
        fields["conclusion"] = out.conclusion
    return fields


def _key(a: dict[str, Any]) -> tuple[Any, ...]:
    return (a.get("path"), a.get("start_line"), a.get("annotation_level"), a.get("message"))


def _id(data: object) -> str | None:
    return str(data.get("id")) if isinstance(data, dict) and data.get("id") is not None else None
