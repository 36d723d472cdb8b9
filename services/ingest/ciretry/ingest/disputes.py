"""Disputes where people are: a reply ``/ciretry wrong <job> [why]`` on a merge request (GitLab
note hook) or a pull request (GitHub ``issue_comment``) becomes the ``VerdictDisputed`` the
audit API's feedback endpoint records.

The normalizers are pure and do not know which verdict a job has, so they return a ``Dispute``
(who, which job, why, and an idempotency key from the comment's id); ingest's app resolves it
against the log (the latest ``VerdictReached`` in the job's stream) and appends the event there.
A job is named by its id, as every line of ciretry's note shows it (``#5001``): a name would be
ambiguous across attempts. A command naming a job ciretry has no verdict for is answered 202
ignored (GitLab disables hooks that keep failing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from .fields import Dispute, Ignored, InvalidPayload, Result, obj, opt_obj, opt_str, req_number_id

#: ``/ciretry wrong 5001 it was the network``, at the start of a line; ``#5001`` works too.
COMMAND: Final = re.compile(r"^\s*/ciretry\s+wrong\s+#?(?P<job>\d{1,20})\b[ \t]*(?P<why>[^\n]*)",
                            re.MULTILINE)  # fmt: skip
MAX_WHY: Final = 2000


def command(text: str | None) -> tuple[str, str] | None:
    """(job id, why) from the first ``/ciretry wrong`` line of a comment, else None."""
    if not text:
        return None
    m = COMMAND.search(text)
    if m is None:
        return None
    why = m.group("why").strip()[:MAX_WHY] or "disputed by reply, no reason given"
    return m.group("job"), why


def gitlab_note(data: Mapping[str, Any], delivery: str | None) -> Result:
    """A GitLab note hook (``object_kind: note``) on a merge request."""
    attrs = opt_obj(data, "object_attributes", "")
    if attrs is None:
        raise InvalidPayload("object_attributes", "required")
    if attrs.get("noteable_type") != "MergeRequest":
        return Ignored("a note on something other than a merge request")
    found = command(opt_str(attrs, "note", "object_attributes", limit=100_000))
    if found is None:
        return Ignored("a note without a /ciretry command")
    project_obj = opt_obj(data, "project", "")
    project = req_number_id(project_obj if project_obj is not None else attrs,
                            "id" if project_obj is not None else "project_id",
                            "project")  # fmt: skip
    note_id = req_number_id(attrs, "id", "object_attributes")
    user = opt_obj(data, "user", "")
    who = (opt_str(user, "username", "user") if user else None) or "unknown GitLab user"
    job_id, why = found
    return Dispute(source="gitlab", project=project, job_id=job_id, who=f"gitlab:{who}", why=why,
                   key=f"gitlab:dispute:{project}:{note_id}", delivery=delivery)  # fmt: skip


def github_comment(data: Mapping[str, Any], project: str, delivery: str | None) -> Result:
    """A GitHub ``issue_comment`` (created) on a pull request."""
    if data.get("action") != "created":
        return Ignored("issue_comment action is not 'created'")
    issue = opt_obj(data, "issue", "")
    if issue is None or issue.get("pull_request") is None:
        return Ignored("a comment on an issue, not a pull request")
    comment = obj(data.get("comment"), "comment")
    found = command(opt_str(comment, "body", "comment", limit=100_000))
    if found is None:
        return Ignored("a comment without a /ciretry command")
    comment_id = req_number_id(comment, "id", "comment")
    user = opt_obj(comment, "user", "comment")
    who = (opt_str(user, "login", "comment.user") if user else None) or "unknown GitHub user"
    job_id, why = found
    return Dispute(source="github", project=project, job_id=job_id, who=f"github:{who}", why=why,
                   key=f"github:dispute:{project}:{comment_id}", delivery=delivery)  # fmt: skip


__all__ = ["COMMAND", "command", "github_comment", "gitlab_note"]
