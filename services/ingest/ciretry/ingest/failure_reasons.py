"""Canonical failure reasons: every name a provider ever sent, old and new, maps to one.

Why: GitLab renamed ``job_execution_timeout`` to ``server_timeout_running`` and Spack's
``retry:when`` silently stopped matching. Downstream code (classify, act) must only ever see the
canonical name in ``JobFinished.failure_reason``; the raw value stays in
``provider_failure_reason``.

GitLab: the canonical name is GitLab's own *broad* name, following GitLab's
``Enums::Ci::CommitStatus.failure_reason_aliases``, which keeps the legacy names matching the
granular reasons that replaced them:

* ``stuck_or_timeout_failure`` <- stuck_pending_with_matching_runners,
  stuck_pending_no_matching_runners, no_updates_running, no_updates_canceling
* ``job_execution_timeout`` <- server_timeout_running, server_timeout_canceling,
  job_execution_server_timeout (the short-lived name in between)

Every other name in GitLab's enum (``Enums::Ci::CommitStatus.failure_reasons``, ids 0..33 and
1000..1017, plus the names only the presenter or gitlab-runner know) is canonical as itself.
A value not listed is *not guessed*: it becomes ``unknown:<value>`` and is surfaced as a note
(response body and a warning log) so somebody adds it here.

Taskcluster: ``taskcluster:<reasonResolved>`` for every reason in the queue's task-status
schema; unknown ones likewise become ``unknown:taskcluster:<value>``.

Buildkite: ``buildkite:<signal_reason>`` for every reason a job's ``signal_reason`` can hold (why
the agent, not the command, ended the job or never started it); unknown ones become
``unknown:buildkite:<value>``.
"""

from __future__ import annotations

from typing import Final

#: Legacy broad reason -> the granular reasons that replaced it (mirrors GitLab's alias table).
GITLAB_ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "stuck_or_timeout_failure": (
        "stuck_pending_with_matching_runners",
        "stuck_pending_no_matching_runners",
        "no_updates_running",
        "no_updates_canceling",
    ),
    "job_execution_timeout": (
        "job_execution_server_timeout",
        "server_timeout_running",
        "server_timeout_canceling",
    ),
}

#: Every failure_reason GitLab's Rails enum has held (ids in comments), plus values only the
#: presenter (secrets_manager_access_denied, duo_workflow_connection_failure) or gitlab-runner
#: (image_pull_failure; job_canceled is runner-internal) use.
GITLAB_REASONS: Final[frozenset[str]] = frozenset(
    {
        "unknown_failure",  # 0 / nil
        "script_failure",  # 1
        "api_failure",  # 2
        "stuck_or_timeout_failure",  # 3
        "runner_system_failure",  # 4
        "missing_dependency_failure",  # 5
        "runner_unsupported",  # 6
        "stale_schedule",  # 7
        "job_execution_timeout",  # 8
        "archived_failure",  # 9
        "unmet_prerequisites",  # 10
        "scheduler_failure",  # 11
        "data_integrity_failure",  # 12
        "forward_deployment_failure",  # 13, deprecated for failed_outdated_deployment_job
        "user_blocked",  # 14
        "project_deleted",  # 15
        "ci_quota_exceeded",  # 16
        "pipeline_loop_detected",  # 17
        "no_matching_runner",  # 18
        "trace_size_exceeded",  # 19
        "builds_disabled",  # 20
        "environment_creation_failure",  # 21
        "deployment_rejected",  # 22
        "failed_outdated_deployment_job",  # 23
        "job_execution_server_timeout",  # 24
        "stuck_pending_with_matching_runners",  # 25
        "stuck_pending_no_matching_runners",  # 26
        "no_updates_running",  # 27
        "no_updates_canceling",  # 28
        "server_timeout_running",  # 29
        "server_timeout_canceling",  # 30
        "runner_configuration_error",  # 31
        "runner_external_dependency_failure",  # 32
        "runner_interrupted",  # 33
        "protected_environment_failure",  # 1000
        "insufficient_bridge_permissions",  # 1001
        "downstream_bridge_project_not_found",  # 1002
        "invalid_bridge_trigger",  # 1003
        "upstream_bridge_project_not_found",  # 1004
        "insufficient_upstream_permissions",  # 1005
        "bridge_pipeline_is_child_pipeline",  # 1006
        "downstream_pipeline_creation_failed",  # 1007
        "secrets_provider_not_found",  # 1008
        "reached_max_descendant_pipelines_depth",  # 1009
        "ip_restriction_failure",  # 1010
        "reached_max_pipeline_hierarchy_size",  # 1011
        "reached_downstream_pipeline_trigger_rate_limit",  # 1012
        "duo_workflow_not_allowed",  # 1013
        "job_router_failure",  # 1014
        "job_token_expired",  # 1015
        "id_token_burned_project_path",  # 1016
        "downstream_project_trigger_resolved_to_empty",  # 1017
        "secrets_manager_access_denied",
        "duo_workflow_connection_failure",
        "image_pull_failure",
        "job_canceled",
    }
)

_GITLAB_CANONICAL: Final[dict[str, str]] = {
    **{name: name for name in GITLAB_REASONS},
    **{new: legacy for legacy, news in GITLAB_ALIASES.items() for new in news},
}

#: reasonResolved values of the Taskcluster queue's task-status schema.
TASKCLUSTER_REASONS: Final[frozenset[str]] = frozenset(
    {
        "completed",
        "failed",
        "deadline-exceeded",
        "canceled",
        "claim-expired",
        "worker-shutdown",
        "malformed-payload",
        "resource-unavailable",
        "internal-error",
        "intermittent-task",
        "superseded",
    }
)

#: A Buildkite job's ``signal_reason`` values (REST API job data model, GraphQL
#: ``JobEventSignalReason``).
BUILDKITE_REASONS: Final[frozenset[str]] = frozenset(
    {
        "agent_stop",
        "cancel",
        "process_run_error",
        "agent_refused",
        "agent_incompatible",
        "signature_rejected",
        "stack_error",
    }
)

UNKNOWN_PREFIX: Final = "unknown:"


def gitlab_canonical(raw: str) -> str:
    """Canonical name of a GitLab ``failure_reason`` / ``build_failure_reason``."""
    return _GITLAB_CANONICAL.get(raw) or UNKNOWN_PREFIX + raw


def taskcluster_canonical(raw: str) -> str:
    """Canonical name of a Taskcluster ``reasonResolved`` (``taskcluster:worker-shutdown``)."""
    if raw in TASKCLUSTER_REASONS:
        return "taskcluster:" + raw
    return UNKNOWN_PREFIX + "taskcluster:" + raw


def buildkite_canonical(raw: str) -> str:
    """Canonical name of a Buildkite ``signal_reason`` (``buildkite:agent_stop``)."""
    if raw in BUILDKITE_REASONS:
        return "buildkite:" + raw
    return UNKNOWN_PREFIX + "buildkite:" + raw


def is_unknown(canonical: str) -> bool:
    return canonical.startswith(UNKNOWN_PREFIX)


def gitlab_reasons_matching(canonical: str) -> frozenset[str]:
    """Every raw GitLab name that maps to ``canonical`` (what a ``retry:when`` entry covers)."""
    return frozenset(raw for raw, canon in _GITLAB_CANONICAL.items() if canon == canonical)
