"""Small builders shared by the classify tests."""

from __future__ import annotations

from ciretry.classify.rules import RuleSet, ruleset_from_texts
from ciretry.common.events import JobFinished, PodTerminated


def rules_from(text: str, name: str = "test.toml") -> RuleSet:
    return ruleset_from_texts([(name, text)])


def rule_toml(
    rid: str = "r1",
    log: str | None = "boom",
    *,
    match: str = '["boom"]',
    no_match: str = '["fine"]',
    extra: str = "",
) -> str:
    log_line = f"log = '{log}'\n" if log is not None else ""
    return (
        f'[[rule]]\nid = "{rid}"\ncategory = "infra_network"\nbudget = "system"\n'
        f"{log_line}{extra}\n[rule.examples]\nmatch = {match}\nno_match = {no_match}\n"
    )


def job(
    *,
    status: str = "failed",
    exit_code: int | None = None,
    failure_reason: str | None = None,
    source: str = "gitlab",
) -> JobFinished:
    return JobFinished(
        source=source,  # type: ignore[arg-type]
        project="p",
        pipeline_id="10",
        job_id="20",
        job_name="build",
        status=status,
        exit_code=exit_code,
        failure_reason=failure_reason,
    )


def pod(
    *, container_reason: str | None = None, pod_reason: str | None = None,
    disruption_reason: str | None = None, exit_code: int | None = None,
) -> PodTerminated:  # fmt: skip
    return PodTerminated(
        namespace="ci", pod="runner-abc", source="gitlab", project="p", job_id="20",
        container_reason=container_reason, pod_reason=pod_reason,
        disruption_reason=disruption_reason, exit_code=exit_code,
    )  # fmt: skip
