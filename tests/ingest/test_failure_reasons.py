import json

import pytest

from ciretry.ingest.failure_reasons import (
    GITLAB_ALIASES,
    GITLAB_REASONS,
    TASKCLUSTER_REASONS,
    gitlab_canonical,
    gitlab_reasons_matching,
    is_unknown,
    taskcluster_canonical,
)

from .helpers import TASKCLUSTER


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("job_execution_timeout", "job_execution_timeout"),
        ("server_timeout_running", "job_execution_timeout"),
        ("server_timeout_canceling", "job_execution_timeout"),
        ("job_execution_server_timeout", "job_execution_timeout"),
        ("stuck_or_timeout_failure", "stuck_or_timeout_failure"),
        ("stuck_pending_with_matching_runners", "stuck_or_timeout_failure"),
        ("stuck_pending_no_matching_runners", "stuck_or_timeout_failure"),
        ("no_updates_running", "stuck_or_timeout_failure"),
        ("no_updates_canceling", "stuck_or_timeout_failure"),
        ("runner_system_failure", "runner_system_failure"),
        ("runner_interrupted", "runner_interrupted"),
        ("runner_configuration_error", "runner_configuration_error"),
        ("runner_external_dependency_failure", "runner_external_dependency_failure"),
        ("script_failure", "script_failure"),
        ("image_pull_failure", "image_pull_failure"),
        (
            "downstream_project_trigger_resolved_to_empty",
            "downstream_project_trigger_resolved_to_empty",
        ),
    ],
)
def test_gitlab_old_and_new_names_map_to_one(raw: str, canonical: str) -> None:
    assert gitlab_canonical(raw) == canonical


def test_every_known_gitlab_reason_is_canonical_or_an_alias() -> None:
    aliased = {new for news in GITLAB_ALIASES.values() for new in news}
    for raw in GITLAB_REASONS:
        canon = gitlab_canonical(raw)
        assert not is_unknown(canon)
        assert canon == raw or raw in aliased


def test_legacy_name_covers_everything_that_replaced_it() -> None:
    # What a `retry:when: job_execution_timeout` written before the rename must still match.
    assert gitlab_reasons_matching("job_execution_timeout") == {
        "job_execution_timeout",
        "job_execution_server_timeout",
        "server_timeout_running",
        "server_timeout_canceling",
    }


def test_unknown_values_are_kept_not_guessed() -> None:
    assert gitlab_canonical("runner_exploded") == "unknown:runner_exploded"
    assert taskcluster_canonical("moon-phase") == "unknown:taskcluster:moon-phase"


def test_taskcluster_reasons_follow_the_rendered_schema() -> None:
    schema = json.loads((TASKCLUSTER / "rendered" / "task-status.json").read_text())
    enum = schema["properties"]["runs"]["items"]["properties"]["reasonResolved"]["enum"]
    assert set(enum) == TASKCLUSTER_REASONS
    assert taskcluster_canonical("worker-shutdown") == "taskcluster:worker-shutdown"
