"""GitLab: one merge request note, edited in place, and the ``ciretry`` commit status.

* Note: ``GET /projects/:id/merge_requests/:iid/notes`` (paged) for the note whose body starts
  with our marker; ``PUT .../notes/:note_id`` when its body differs, ``POST .../notes`` when
  there is none.
* Status: ``GET /projects/:id/repository/commits/:sha/statuses?name=ciretry`` (the latest per
  name); ``POST /projects/:id/statuses/:sha`` only when state, description or link differ
  (GitLab refuses a transition to the state a status is already in).
"""

from __future__ import annotations

from ciretry.common.http import HttpClient
from ciretry.common.providers import gitlab_pages, gitlab_project

from ..explain import NAME
from .base import Post, Posted, PostRefused, checked, ok


class GitLabPublisher:
    source = "gitlab"

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    async def publish(self, project: str, post: Post) -> Posted:
        if post.target == "mr_note":
            return await checked(self.http, f"gitlab note {post.subject}",
                                 lambda: self._note(project, post))  # fmt: skip
        if post.target == "commit_status":
            return await checked(self.http, f"gitlab status {post.subject}",
                                 lambda: self._status(project, post))  # fmt: skip
        raise ValueError(f"GitLab has no {post.target}")

    async def _note(self, project: str, post: Post) -> Posted:
        path = f"{gitlab_project(project)}/merge_requests/{post.number}/notes"
        found: dict[str, object] | None = None
        query = {"sort": "asc", "order_by": "created_at"}
        async for page in gitlab_pages(self.http, path, query):
            if page.response.status != 200 or page.items is None:
                raise PostRefused("list the merge request's notes", page.response)
            for note in page.items:
                if isinstance(note, dict) and str(note.get("body", "")).startswith(post.marker):
                    found = note
                    break
            if found is not None:
                break
        if found is None:
            resp = ok(await self.http.request("POST", path, json={"body": post.body}), "add note")
            return Posted(_id(resp.data), "created")
        if found.get("body") == post.body:
            return Posted(str(found.get("id")), "found")
        resp = ok(
            await self.http.request("PUT", f"{path}/{found.get('id')}", json={"body": post.body}),
            "edit note",
        )
        return Posted(str(found.get("id")), "edited")

    async def _status(self, project: str, post: Post) -> Posted:
        assert post.status is not None and post.sha
        base = gitlab_project(project)
        want = post.status
        listed = await self.http.request(
            "GET", f"{base}/repository/commits/{post.sha}/statuses", params={"name": NAME}
        )
        if listed.status != 200 or not isinstance(listed.data, list):
            raise PostRefused("list the commit's statuses", listed)
        ours = [s for s in listed.data if isinstance(s, dict) and s.get("name") == NAME]
        if ours:
            current = max(ours, key=lambda s: int(s.get("id") or 0))
            if current.get("status") == want.state and want.state == "running":
                # GitLab refuses running -> running; the state is what people read.
                return Posted(str(current.get("id")), "found", want.state)
            if (current.get("status"), current.get("description"), current.get("target_url")) == (
                want.state,
                want.description,
                want.target_url,
            ):
                return Posted(str(current.get("id")), "found", want.state)
        body: dict[str, object] = {
            "state": want.state,
            "name": NAME,
            "description": want.description,
            "pipeline_id": int(post.pipeline_id) if post.pipeline_id.isdigit() else None,
        }
        if want.target_url:
            body["target_url"] = want.target_url
        resp = ok(
            await self.http.request("POST", f"{base}/statuses/{post.sha}", json=body), "set status"
        )
        return Posted(_id(resp.data), "edited" if ours else "created", want.state)


def _id(data: object) -> str | None:
    return str(data.get("id")) if isinstance(data, dict) and data.get("id") is not None else None
