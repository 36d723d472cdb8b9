"""Builders for act tests: events with the fields that matter and sane defaults for the rest."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ciretry.common.events import (
    Action,
    BudgetClass,
    Category,
    JobFinished,
    VerdictReached,
)

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
PROJECT = "42"
PIPELINE = "900"


def job(job_id: str | int, name: str = "build", **kw: Any) -> JobFinished:
    fields: dict[str, Any] = {
        "source": "gitlab",
        "project": PROJECT,
        "pipeline_id": PIPELINE,
        "status": "failed",
        "ref": "main",
        "sha": "abc123",
        "user": "alice",
    }
    fields.update(kw)
    return JobFinished(job_id=str(job_id), job_name=name, **fields)


_ACTIONS: dict[str, Action] = {
    "oom": "rerun_with_resources",
    "deterministic": "none",
    "flaky_test": "retry_job",
}


def verdict(
    job_id: str | int,
    name: str = "build",
    category: Category = "preempted",
    *,
    retryable: bool | None = None,
    budget: BudgetClass | None = None,
    action: Action | None = None,
    **kw: Any,
) -> VerdictReached:
    fields: dict[str, Any] = {
        "source": "gitlab",
        "project": PROJECT,
        "pipeline_id": PIPELINE,
        "confidence": 0.9,
    }
    fields.update(kw)
    return VerdictReached(
        job_id=str(job_id),
        job_name=name,
        category=category,
        retryable=category != "deterministic" if retryable is None else retryable,
        budget=budget or ("user" if category in ("deterministic", "flaky_test") else "system"),
        action=action or _ACTIONS.get(category, "retry_job"),
        **fields,
    )
