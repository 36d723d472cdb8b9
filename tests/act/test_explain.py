"""The explanation's pure parts: the fold into sections, the renderings, when to post."""

from __future__ import annotations

import datetime as dt
import uuid

from ciretry.act.explain import (
    Links,
    explain,
    marker,
    plan_post,
    render_check_run,
    render_note,
    render_status,
    review_from_ref,
    source_location,
    targets,
)
from ciretry.common.events import (
    BudgetSnapshot,
    Evidence,
    RetryIssued,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
)

from .helpers import NOW, PIPELINE, PROJECT, job, verdict

SNAP = BudgetSnapshot(job_attempts=0, job_limit=3, pipeline_retries=0, pipeline_limit=3)


def _verdict(job_id: int, name: str, category: str, rule: str, text: str | None) -> VerdictReached:
    return verdict(job_id, name, category, rules=(rule,),  # type: ignore[arg-type]
                   evidence=(Evidence(rule=rule, line=120, text=text),))  # fmt: skip


def _scene() -> tuple[list, dict[uuid.UUID, VerdictReached], list]:  # type: ignore[type-arg]
    ids = [uuid.uuid4() for _ in range(4)]
    verdicts = {
        ids[0]: _verdict(
            1,
            "compile",
            "deterministic",
            "c-compile-error",
            "src/net/socket.c:42:7: error: 'fd' undeclared",
        ),  # fmt: skip
        ids[1]: _verdict(2, "test-k8s", "preempted", "k8s-preempted", None),
        ids[2]: _verdict(
            3, "docs", "infra_network", "dns-failure", "curl: (6) Could not resolve host: pypi.org"
        ),  # fmt: skip
        ids[3]: _verdict(4, "lint", "flaky_test", "known-flaky", "FAILED test_timing"),
    }
    request = RetryRequested(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="2", job_name="test-k8s",
        action="retry_job", idempotency_key="k2", category="preempted", budget="system",
        snapshot=SNAP, verdict_event_id=ids[1],
    )  # fmt: skip
    decisions = [
        RetrySkipped(
            source="gitlab",
            project=PROJECT,
            pipeline_id=PIPELINE,
            job_id="1",
            job_name="compile",
            reason="not_retryable",
            detail="",
            category="deterministic",
            snapshot=SNAP,
            verdict_event_id=ids[0],
        ),  # fmt: skip
        request,
        RetryIssued(
            source="gitlab",
            project=PROJECT,
            pipeline_id=PIPELINE,
            job_id="2",
            idempotency_key="k2",
            new_job_id="5",
        ),  # fmt: skip
        RetrySkipped(
            source="gitlab",
            project=PROJECT,
            pipeline_id=PIPELINE,
            job_id="3",
            job_name="docs",
            reason="pipeline_budget_exhausted",
            detail="",
            category="infra_network",
            verdict_event_id=ids[2],
            snapshot=BudgetSnapshot(pipeline_retries=3, pipeline_limit=3),
        ),  # fmt: skip
        RetrySkipped(
            source="gitlab",
            project=PROJECT,
            pipeline_id=PIPELINE,
            job_id="4",
            job_name="lint",
            reason="not_retryable",
            detail="",
            category="flaky_test",
            snapshot=SNAP,
            verdict_event_id=ids[3],
        ),  # fmt: skip
    ]
    jobs = [job(1, "compile"), job(2, "test-k8s"), job(3, "docs"), job(4, "lint"),
            job(5, "test-k8s", status="success")]  # fmt: skip
    return decisions, verdicts, jobs


def test_each_job_lands_in_its_section_in_order() -> None:
    decisions, verdicts, jobs = _scene()
    e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, decisions=decisions,
                verdicts=verdicts, jobs=jobs, links=Links("https://ci.example/"))  # fmt: skip
    assert [(line.section, line.job_name) for line in e.lines] == [
        ("attention", "compile"),
        ("retried", "test-k8s"),
        ("known", "lint"),
        ("not_retried", "docs"),
    ]
    retried = e.section("retried")[0]
    assert retried.detail == "retry job, retry 1 of 3: passed"
    assert e.pending == 0
    assert e.section("not_retried")[0].detail == "retry budget of the pipeline spent (3 of 3)"
    assert e.section("attention")[0].location == ("src/net/socket.c", 42)
    assert e.section("attention")[0].why_url == f"https://ci.example/jobs/gitlab/{PROJECT}/1"


def test_note_is_short_with_the_quiet_sections_folded() -> None:
    decisions, verdicts, jobs = _scene()
    e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, decisions=decisions,
                verdicts=verdicts, jobs=jobs)  # fmt: skip
    note = render_note(e, "mr-7")
    assert note.startswith(marker("gitlab", PROJECT, "mr-7") + "\n")
    order = [note.index(t) for t in ("Needs your attention", "Retried automatically",
                                     "Known infrastructure/flaky (1)", "Not retried (1)")]  # fmt: skip
    assert order == sorted(order)
    assert "<details><summary>Known infrastructure/flaky (1)</summary>" in note
    assert "/ciretry wrong" in note
    assert "`line 120: src/net/socket.c:42:7: error: 'fd' undeclared`" in note
    assert len(note.splitlines()) < 30


def test_pending_retry_keeps_the_check_run_in_progress_and_status_running() -> None:
    decisions, verdicts, jobs = _scene()
    e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                decisions=decisions[:2], verdicts=verdicts, jobs=jobs[:4])  # fmt: skip
    assert e.pending == 1
    assert e.section("retried")[0].detail.endswith(": requested")
    run = render_check_run(e)
    assert (run.status, run.conclusion) == ("in_progress", None)
    assert render_status(e).state == "failed"  # compile still needs attention
    only_retry = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                         decisions=decisions[1:2], verdicts=verdicts, jobs=jobs[:4])  # fmt: skip
    assert render_status(only_retry).state == "running"
    done = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                   decisions=decisions[1:3], verdicts=verdicts, jobs=jobs)  # fmt: skip
    assert render_status(done).state == "success"
    assert render_check_run(done).conclusion == "success"


def test_check_run_annotations_point_at_the_file_when_the_log_names_one() -> None:
    decisions, verdicts, jobs = _scene()
    e = explain(source="github", project="o/r", pipeline_id=PIPELINE, decisions=decisions,
                verdicts=verdicts, jobs=jobs)  # fmt: skip
    run = render_check_run(e)
    assert run.conclusion == "failure"
    by_title = {a.title.split(":")[0]: a for a in run.annotations}
    assert (by_title["compile"].path, by_title["compile"].start_line) == ("src/net/socket.c", 42)
    assert by_title["compile"].annotation_level == "failure"
    assert by_title["docs"].path == ".github"  # no file in the log: the workflow directory
    assert "test-k8s" not in by_title  # no evidence text: nothing to annotate


def test_a_retried_job_that_fails_again_is_counted_on_its_new_line() -> None:
    decisions, verdicts, jobs = _scene()
    again = uuid.uuid4()
    verdicts[again] = _verdict(5, "test-k8s", "deterministic", "py-assert", "AssertionError")
    decisions.append(
        RetrySkipped(
            source="gitlab",
            project=PROJECT,
            pipeline_id=PIPELINE,
            job_id="5",
            job_name="test-k8s",
            reason="not_retryable",
            detail="",
            category="deterministic",
            snapshot=SNAP,
            verdict_event_id=again,
        )  # fmt: skip
    )
    jobs[-1] = job(5, "test-k8s", status="failed")
    e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, decisions=decisions,
                verdicts=verdicts, jobs=jobs)  # fmt: skip
    names = [line.job_name for line in e.section("attention")]
    assert names == ["compile", "test-k8s"]
    assert e.section("attention")[1].detail == "not retried after 1 automatic retry"
    assert not e.section("retried")


def test_source_locations() -> None:
    assert source_location('  File "/app/tests/test_x.py", line 12, in test') == (
        "app/tests/test_x.py", 12)  # fmt: skip
    assert source_location("./src/main.rs:7:3: error[E0425]") == ("src/main.rs", 7)
    assert source_location("/__w/pytorch/pytorch/torch/csrc/x.cpp:128:26: error: no") == (
        "torch/csrc/x.cpp", 128)  # fmt: skip
    assert source_location("/builds/group/app/src/a.go:9: undefined: x") == ("src/a.go", 9)
    assert source_location("Killed") is None
    assert source_location("fetching https://example.com:443/x") is None


def test_targets_by_mode_and_review() -> None:
    assert targets("off", "gitlab", "7") == ()
    assert targets("status", "gitlab", "7") == ("commit_status",)
    assert targets("note", "gitlab", "7") == ("commit_status", "mr_note")
    assert targets("note", "gitlab", None) == ("commit_status",)
    assert targets("note", "github", "3") == ("check_run", "pr_comment")
    assert targets("note", "taskcluster", None) == ()


def test_plan_post_rate_limits_and_never_goes_back_to_an_older_pipeline() -> None:
    later = NOW + dt.timedelta(seconds=4)
    assert plan_post(None, None, None, "10", "d", NOW, 10) == ("post", 0.0)
    assert plan_post("10", "d", NOW, "10", "d", later, 10) == ("unchanged", 0.0)
    assert plan_post("10", "d", NOW, "10", "e", later, 10) == ("post", 6.0)
    assert plan_post("11", "d", NOW, "10", "e", later, 10) == ("older", 0.0)
    assert plan_post("10", "d", NOW, "11", "d", later + dt.timedelta(seconds=9), 10) == (
        "post", 0.0)  # fmt: skip


def test_review_from_ref() -> None:
    assert review_from_ref("refs/merge-requests/17/head") == "17"
    assert review_from_ref("refs/pull/3/merge") == "3"
    assert review_from_ref("main") is None


def test_job_names_cannot_ping_or_inject() -> None:
    decisions, verdicts, jobs = _scene()
    import msgspec

    decisions[0] = msgspec.structs.replace(decisions[0], job_name="@all <img src=x> *b*")
    e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, decisions=decisions,
                verdicts=verdicts, jobs=jobs)  # fmt: skip
    note = render_note(e, "mr-7")
    assert "**@\u200ball &lt;img src=x&gt; \\*b\\***" in note
    assert "@all" not in note and "<img" not in note


def test_a_huge_pipeline_stays_within_what_a_comment_can_hold() -> None:
    import msgspec

    decisions, verdicts, jobs = _scene()
    skip = decisions[0]
    many = [msgspec.structs.replace(skip, job_id=str(10_000 + i), job_name=f"job-{i}" + "x" * 200)
            for i in range(500)]  # fmt: skip
    e = explain(source="github", project="o/r", pipeline_id=PIPELINE, decisions=many,
                verdicts=verdicts, jobs=jobs)  # fmt: skip
    note = render_note(e, "pr-1")
    assert "- … and 470 more" in note
    assert len(note) < 65_536 and len(render_check_run(e).summary) < 65_535


def test_a_job_parked_by_a_retry_storm_is_known_and_pending_until_decided_again() -> None:
    decisions, verdicts, jobs = _scene()
    docs = decisions[3]
    assert isinstance(docs, RetrySkipped)
    parked = RetryParked(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="3", job_name="docs",
        category="infra_network", storm_id="storm:sig-v1:ab12:1", signature="sig-v1:ab12",
        would_action="retry_job", verdict_event_id=docs.verdict_event_id, snapshot=SNAP,
    )  # fmt: skip
    e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                decisions=[*decisions[:3], parked], verdicts=verdicts, jobs=jobs)  # fmt: skip
    line = next(line for line in e.lines if line.job_name == "docs")
    assert line.section == "known" and "parked by a retry storm" in line.detail
    assert e.pending == 1
    assert render_status(e).state == "failed"  # compile still needs attention
    released = RetryRequested(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="3", job_name="docs",
        action="retry_job", idempotency_key="k3", category="infra_network", budget="system",
        snapshot=SNAP, verdict_event_id=docs.verdict_event_id,
    )  # fmt: skip
    after = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                    decisions=[*decisions[:3], parked, released], verdicts=verdicts,
                    jobs=jobs)  # fmt: skip
    line = next(line for line in after.lines if line.job_name == "docs")
    assert line.section == "retried" and line.detail == "retry job, retry 1 of 3: requested"
