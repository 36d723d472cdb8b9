"""docs/explanations.md shows an MR note and a check-run summary as ciretry posts them. They are
produced here, from a real fixture pipeline (GitLab's documented pipeline hook, pipeline 31 of a
merge request, three of its jobs failed with real CI logs from the shared fixtures), through
ingest's normalizer, the classifier, act's decisions and the explainer, and compared with the
document: the example stays true. ``UPDATE_DOCS=1 pytest tests/act/test_explanations_doc.py``
writes the blocks after a deliberate change."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec

from ciretry.act.executors import GitLabExecutor
from ciretry.act.explain import explain, render_check_run
from ciretry.act.policy import default_policy_text, parse_policy
from ciretry.act.service import build
from ciretry.classify.cli import classify_file
from ciretry.classify.rules import load_ruleset
from ciretry.common.config import Config
from ciretry.common.events import (
    JobFinished,
    RetryIssued,
    job_stream,
    pipeline_stream,
)
from ciretry.common.memory import MemoryEventLog
from ciretry.ingest import gitlab as ingest_gitlab
from ciretry.ingest.fields import Accepted
from tests.support.providers import FakeGitLab

from .test_service import FAST, _nosleep

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures"
HOOK = FIXTURES / "gitlab_webhooks" / "gitlab-docs__pipeline_hook_example.json"
LOGS = FIXTURES / "logs" / "pytorch"
DOC = ROOT / "docs" / "explanations.md"
NOW = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
#: The failed jobs of the example and the real log each one ran into.
FAILED = {
    378: "compile_error.log",  # a compile error: the author's
    379: "uv_python_download_failed.log",  # DNS failure while downloading: retried
    380: "gha_cancellation_shutdown.log",  # the runner shut down: budget already spent
}
POLICY = default_policy_text().replace('explain = "off"', 'explain = "note"').replace(
    "floor = 3", "floor = 1"
)


def pipeline_hook() -> dict[str, Any]:
    """The documented hook, as GitLab sends it for a detached merge request pipeline whose jobs
    378-380 failed."""
    hook: dict[str, Any] = copy.deepcopy(json.loads(HOOK.read_text()))
    hook["object_attributes"].update(status="failed", ref="refs/merge-requests/1/head")
    for build_ in hook["builds"]:
        if build_["id"] in FAILED:
            build_.update(status="failed", failure_reason="script_failure")
    return hook


async def example() -> tuple[str, str]:
    """The note as posted on merge request !1, and the check run's output as GitHub would
    show it for the same pipeline."""
    log = MemoryEventLog()
    result = ingest_gitlab.normalize({"X-Gitlab-Event": "Pipeline Hook"}, pipeline_hook())
    assert isinstance(result, Accepted)
    await log.append_batch(result.events)
    project = "1"
    stream = pipeline_stream("gitlab", project, "31")
    jobs = {r.data.job_id: r for r in await log.read_stream(stream) if isinstance(r.data, JobFinished)}
    fake = FakeGitLab()
    for job_id in FAILED:
        fake.add_job(job_id, jobs[str(job_id)].data.job_name, 31, ref="refs/merge-requests/1/head")
    fake.heads["refs/merge-requests/1/head"] = jobs["378"].data.sha
    ex = GitLabExecutor(fake.url, "tok", settings=FAST, sleep=_nosleep, transport=fake.transport())
    act = build(log, None, Config(public_url="https://ciretry.example.org"),
                policy=parse_policy(POLICY), executors={"gitlab": ex}, clock=lambda: NOW)  # fmt: skip
    rules = load_ruleset()
    for job_id, log_name in FAILED.items():
        rec = jobs[str(job_id)]
        v = classify_file(rules, LOGS / log_name)
        v = msgspec.structs.replace(v, source="gitlab", project=project, pipeline_id="31",
                                    job_id=str(job_id), job_name=rec.data.job_name,
                                    job_event_id=rec.event_id, log_note=None)  # fmt: skip
        (verdict,) = await log.append(job_stream("gitlab", project, str(job_id)), [v])
        await act.handle_verdict(verdict)
    # The DNS failure's retry waits out its backoff, runs, and passes.
    await act.run_due(NOW + dt.timedelta(minutes=5))
    (issued,) = [r.data for r in await log.read_stream(stream) if isinstance(r.data, RetryIssued)]
    assert issued.new_job_id is not None
    rerun = msgspec.structs.replace(jobs["379"].data, job_id=issued.new_job_id, status="success")
    await log.append(stream, [rerun])
    await act.explainer.explain_chain("gitlab", project, "31")
    (note,) = fake.notes[1]
    decisions, chain_jobs, _ = await act.explainer._chain("gitlab", project, "31")
    verdicts = await act.explainer._verdicts(decisions)
    expl = explain(source="gitlab", project=project, pipeline_id="31", decisions=decisions,
                   verdicts=verdicts, jobs=chain_jobs, links=act.explainer.links)  # fmt: skip
    run = render_check_run(expl)
    # The check run's summary is the note without its marker and heading (shown once, above).
    assert note["body"].endswith(run.summary)
    shown = {
        "name": "ciretry", "status": run.status, "conclusion": run.conclusion,
        "output": {"title": run.title, "summary": "(the note above, from its first section)",
                   "annotations": [dataclasses.asdict(a) for a in run.annotations]},
    }  # fmt: skip
    await ex.close()
    return note["body"], json.dumps(shown, indent=2, ensure_ascii=False)


def with_block(doc: str, name: str, fence: str, content: str) -> str:
    start, end = f"<!-- example:{name} -->", f"<!-- /example:{name} -->"
    block = f"{start}\n```{fence}\n{content.rstrip()}\n```\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    assert pattern.search(doc), f"docs/explanations.md has no {start} ... {end} block"
    return pattern.sub(lambda _: block, doc)


async def test_the_documented_example_is_what_ciretry_posts() -> None:
    note, check_run = await example()
    doc = DOC.read_text()
    want = with_block(with_block(doc, "note", "markdown", note), "check-run", "json", check_run)
    if os.environ.get("UPDATE_DOCS") == "1":
        DOC.write_text(want)
    assert doc == want, "docs/explanations.md is stale: UPDATE_DOCS=1 pytest " + __file__
    # What the example must show, whatever its wording.
    assert "**Needs your attention**" in note and "**test-build** (#378)" in note
    assert "**staging** (#379)" in note and "retry 1 of 3: passed" in note
    assert "<details><summary>Not retried (1)</summary>" in note and "(#380)" in note
