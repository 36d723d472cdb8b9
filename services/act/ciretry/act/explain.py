"""What ciretry tells people where they look: one living note per merge request / pull request,
a commit status, a check run. Pure: the fold of a pipeline's decisions into an ``Explanation``,
its renderings (a Markdown note, a check run's output, a commit status) and the decision whether
to post now. The explainer (``explainer``) gathers the events and posts; nothing here does I/O.

A job is one line in one of four sections, in this order (docs/explanations.md):

* **Needs your attention**: a failure of the change itself (``deterministic``, ``unknown``,
  ``timeout``) that was not retried: its evidence line;
* **Retried automatically**: what, why, retry n of m, and the outcome when known;
* **Known infrastructure/flaky**: an infrastructure or flaky failure the rules say not to retry;
* **Not retried**: an infrastructure or flaky failure that could have been retried but was not,
  and why (budget spent, mostly broken pipeline, opted out, dry run, ...).

One line per logical job (its name): the latest decision about it decides the section; earlier
automatic retries are counted on the line ("after 2 automatic retries").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import quote

from ciretry.common.events import (
    Category,
    Evidence,
    JobFinished,
    RetryFailed,
    RetryIssued,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
)

Section = Literal["attention", "retried", "known", "not_retried"]
SECTIONS: Final[tuple[Section, ...]] = ("attention", "retried", "known", "not_retried")
TITLES: Final[dict[Section, str]] = {
    "attention": "Needs your attention",
    "retried": "Retried automatically",
    "known": "Known infrastructure/flaky",
    "not_retried": "Not retried",
}
ICONS: Final[dict[Section, str]] = {
    "attention": "❌",
    "retried": "🔁",
    "known": "⚠️",
    "not_retried": "⏸️",
}
#: Failures of the change itself: a person has to look.
OWN_CATEGORIES: Final[frozenset[Category]] = frozenset({"deterministic", "unknown", "timeout"})
#: The name of the commit status and the check run.
NAME: Final = "ciretry"
#: Evidence text kept on a line (the rest is in the "why" page).
EVIDENCE_CHARS: Final = 160
#: Lines shown per section: a note stays readable, and within GitHub's 65,536 characters of a
#: comment or check-run summary however many jobs fail (30 lines of at most ~450 characters).
MAX_LINES: Final = 30

ExplainMode = Literal["off", "status", "note"]
Target = Literal["mr_note", "commit_status", "check_run", "pr_comment"]
Decision = RetryRequested | RetrySkipped | RetryParked | RetryIssued | RetryFailed

_SKIP_WHY: Final[dict[str, str]] = {
    "job_budget_exhausted": "retry budget of the job spent",
    "pipeline_budget_exhausted": "retry budget of the pipeline spent",
    "pipeline_mostly_broken": "pipeline mostly broken",
    "opted_out": "opted out",
    "dry_run": "dry run",
    "resource_cap_reached": "already at the memory cap",
    "resize_unsupported": "the provider cannot rerun it bigger",
    "superseded": "a newer commit runs it",
    "not_retryable": "not retryable",
}


@dataclass(frozen=True, slots=True)
class JobLine:
    """One job of the explanation: its section, verdict, rule, evidence and what was done."""

    job_id: str
    job_name: str
    section: Section
    category: str
    rule: str | None
    #: The decisive evidence line (its text and line number in the log), if any.
    evidence: Evidence | None
    #: What was done, short: "retry 1 of 3: passed", "retry budget of the job spent (3 of 3)".
    detail: str
    why_url: str | None = None
    #: (file, line) when the evidence names a source location.
    location: tuple[str, int] | None = None
    #: How often this failure (its signature) happened in other pipelines this week.
    seen_elsewhere: int | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    source: str
    project: str
    pipeline_id: str
    sha: str | None
    ref: str | None
    lines: tuple[JobLine, ...]
    #: Retries still running or waiting (their outcome is not known yet).
    pending: int = 0

    def section(self, name: Section) -> list[JobLine]:
        return [line for line in self.lines if line.section == name]

    @property
    def headline(self) -> str:
        counts = [
            f"{len(self.section(s))} {TITLES[s].lower()}" for s in SECTIONS if self.section(s)
        ]
        return ", ".join(counts) if counts else "no failed jobs"


@dataclass(frozen=True, slots=True)
class Links:
    """Where the "why" of a job is: the dashboard's job page (verdict, evidence, decision, the
    numbers, feedback so far)."""

    public_url: str = ""

    def why(self, source: str, project: str, job_id: str) -> str | None:
        if not self.public_url:
            return None
        base = self.public_url.rstrip("/")
        # As the dashboard links its own job pages (a project path keeps its slashes).
        return f"{base}/jobs/{quote(source, safe='')}/{quote(project, safe='/')}/{quote(job_id, safe='')}"


NO_LINKS: Final = Links()

# --- the fold ---------------------------------------------------------------------------------

_LOCATION: Final = (
    # path/to/file.ext:12[:3]  (compilers, pytest, eslint, go, rustc's "--> file:line:col")
    re.compile(r"(?P<file>[\w.+\-/]*[\w\-]\.[A-Za-z][\w]{0,7}):(?P<line>\d{1,7})\b"),
    # File "path/to/file.py", line 12  (Python tracebacks)
    re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d{1,7})'),
)


#: Where CI runners check a repository out: a path under one is made relative to the repository
#: (GitHub Actions ``/__w/repo/repo/``, ``/home/runner/work/repo/repo/``, self-hosted
#: ``…/_work/repo/repo/``; GitLab ``/builds/group/project/``).
_WORKSPACE: Final = re.compile(
    r"^(?:.*?/)?(?:__w|_work|home/runner/work)/[^/]+/[^/]+/|^(?:.*?/)?builds/[^/]+/[^/]+/"
)


def source_location(text: str | None) -> tuple[str, int] | None:
    """The source file and line an evidence line names, if it names one, relative to the
    repository (a runner's checkout directory, a leading ``/`` or ``./`` is dropped)."""
    if not text:
        return None
    for pattern in _LOCATION:
        m = pattern.search(text)
        if m:
            path = _WORKSPACE.sub("", m.group("file").lstrip("/")).removeprefix("./")
            line = int(m.group("line"))
            if path and line > 0 and "://" not in text[max(0, m.start() - 3) : m.start() + 3]:
                return path, line
    return None


def _decisive(verdict: VerdictReached | None) -> Evidence | None:
    """The evidence line worth showing: the first with log text, else the first."""
    if verdict is None or not verdict.evidence:
        return None
    for e in verdict.evidence:
        if e.text:
            return e
    return verdict.evidence[0]


def _newer(a: str, b: str) -> bool:
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a > b


def explain(
    *,
    source: str,
    project: str,
    pipeline_id: str,
    decisions: Sequence[Decision],
    verdicts: Mapping[uuid.UUID, VerdictReached],
    jobs: Sequence[JobFinished],
    links: Links = NO_LINKS,
    seen_elsewhere: Mapping[str, int] | None = None,
) -> Explanation:
    """The explanation of a pipeline (its chain) from its decisions in log order, the verdicts
    they name, and every ``JobFinished`` of the chain's pipelines in log order; ``seen_elsewhere``:
    signature id -> verdicts with it in other pipelines this week. Pure."""
    issued = {d.idempotency_key: d for d in decisions if isinstance(d, RetryIssued)}
    failed: dict[str, RetryFailed] = {}
    for d in decisions:
        if isinstance(d, RetryFailed):
            failed[d.idempotency_key] = d
    latest: dict[str, RetryRequested | RetrySkipped | RetryParked] = {}
    retries: dict[str, int] = {}
    for d in decisions:
        if isinstance(d, RetryRequested | RetrySkipped | RetryParked):
            latest.pop(d.job_name, None)  # re-inserted: lines follow the latest decision's order
            latest[d.job_name] = d
            if isinstance(d, RetryRequested) and not d.dry_run:
                retries[d.job_name] = retries.get(d.job_name, 0) + 1
    by_name: dict[str, list[JobFinished]] = {}
    for j in jobs:
        by_name.setdefault(j.job_name, []).append(j)
    head = next((j for j in jobs if j.pipeline_id == pipeline_id), jobs[0] if jobs else None)

    lines: list[JobLine] = []
    pending = 0
    for name, d in latest.items():
        verdict = verdicts.get(d.verdict_event_id) if d.verdict_event_id else None
        evidence = _decisive(verdict)
        rule = verdict.rules[0] if verdict is not None and verdict.rules else None
        rule = rule or (evidence.rule if evidence is not None else None)
        before = retries.get(name, 0) - (
            1 if isinstance(d, RetryRequested) and not d.dry_run else 0
        )
        after = f" after {before} automatic retr{'y' if before == 1 else 'ies'}" if before else ""
        section: Section
        if isinstance(d, RetryRequested) and not d.dry_run:
            section = "retried"
            outcome, done = _outcome(d, issued.get(d.idempotency_key),
                                     failed.get(d.idempotency_key), by_name.get(name, []))  # fmt: skip
            pending += 0 if done else 1
            attempt = d.snapshot.job_attempts + 1
            detail = f"{d.action.replace('_', ' ')}, retry {attempt} of {d.snapshot.job_limit}"
            detail += f": {outcome}"
        elif isinstance(d, RetryRequested):  # dry run: recorded, not called
            section = "not_retried"
            detail = f"dry run: would {d.action.replace('_', ' ')}"
        elif isinstance(d, RetryParked):  # a retry storm holds it back: retried when it ends
            section = "known"
            pending += 1
            detail = "parked by a retry storm (the same failure in many pipelines); retried once it ends"
        elif d.category in OWN_CATEGORIES:
            section = "attention"
            detail = "not retried" + after
        elif d.category == "cancelled":
            section = "not_retried"
            detail = "cancelled"
        elif d.reason == "not_retryable":
            section = "known"
            detail = "not retried: the rule says retrying does not help" + after
        else:
            section = "not_retried"
            detail = _skip_detail(d) + after
        text = evidence.text if evidence is not None else None
        lines.append(
            JobLine(
                job_id=d.job_id,
                job_name=name,
                section=section,
                category=d.category,
                rule=rule,
                evidence=evidence,
                detail=detail,
                why_url=links.why(source, project, d.job_id),
                location=source_location(text),
                seen_elsewhere=(
                    (seen_elsewhere or {}).get(verdict.signature.id)
                    if verdict is not None and verdict.signature is not None
                    else None
                ),
            )
        )
    order = {s: i for i, s in enumerate(SECTIONS)}
    lines.sort(key=lambda line: order[line.section])  # stable: decision order within a section
    return Explanation(
        source=source,
        project=project,
        pipeline_id=pipeline_id,
        sha=head.sha if head is not None else None,
        ref=head.ref if head is not None else None,
        lines=tuple(lines),
        pending=pending,
    )


def _skip_detail(d: RetrySkipped) -> str:
    why = _SKIP_WHY.get(d.reason, d.reason.replace("_", " "))
    s = d.snapshot
    if d.reason == "job_budget_exhausted":
        return f"{why} ({s.job_attempts} of {s.job_limit})"
    if d.reason == "pipeline_budget_exhausted":
        return f"{why} ({s.pipeline_retries} of {s.pipeline_limit})"
    if d.reason == "pipeline_mostly_broken":
        return f"{why} ({s.deterministic_failures} of {s.pipeline_jobs} jobs failed on their own)"
    return why


def _outcome(
    request: RetryRequested,
    issued: RetryIssued | None,
    failed: RetryFailed | None,
    attempts: Sequence[JobFinished],
) -> tuple[str, bool]:
    """What came of a retry, and whether that is final."""
    if issued is None:
        if failed is not None and not failed.will_retry:
            return f"the retry call failed (HTTP {failed.status or '-'})", True
        if failed is not None:
            return "the provider did not answer; trying again", False
        if request.not_before is not None:
            return f"scheduled for {request.not_before.astimezone(dt.UTC):%H:%M} UTC", False
        return "requested", False
    later = [j for j in attempts if _newer(j.job_id, request.job_id)]
    if issued.new_job_id:
        exact = [j for j in later if j.job_id == issued.new_job_id]
        later = exact or later
    if issued.new_pipeline_id and not issued.new_job_id:
        later = [j for j in later if j.pipeline_id == issued.new_pipeline_id] or later
    if not later:
        return "running", False
    last = later[-1]
    if last.status == "success":
        return "passed", True
    if last.status == "failed":
        return "failed again", True
    return last.status, True


# --- renderings -------------------------------------------------------------------------------


def marker(source: str, project: str, subject: str) -> str:
    """The hidden line that finds our own note or comment again (check before acting)."""
    return f"<!-- ciretry:explanation source={source} project={project} on={subject} -->"


def _md(text: str) -> str:
    """Text safe inside a Markdown code span on one line (no backticks, no newlines)."""
    return " ".join(text.replace("`", "'").split())


_PLAIN: Final = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "*": "\\*",
        "_": "\\_",
        "[": "\\[",
        "]": "\\]",
        "|": "\\|",
        "#": "\\#",
        "@": "@\u200b",
    }  # fmt: skip
)


def _plain(text: str) -> str:
    """Text from a CI config (a job's name) shown as itself: no markup, no HTML, and no
    ``@mention`` (a zero-width space after ``@``) to ping people from ciretry's note."""
    return _md(text).translate(_PLAIN)


def _line(line: JobLine, *, with_evidence: bool) -> str:
    out = f"- {ICONS[line.section]} **{_plain(line.job_name)}** (#{line.job_id}) — {line.category}"
    if line.rule:
        out += f" · `{_md(line.rule)}`"
    out += f" · {line.detail}"
    if line.seen_elsewhere:
        out += f" · seen {line.seen_elsewhere}× elsewhere this week"
    if line.why_url:
        out += f" · [why]({line.why_url})"
    if with_evidence and line.evidence is not None and line.evidence.text:
        where = f"line {line.evidence.line}: " if line.evidence.line else ""
        out += f"\n  `{where}{_md(line.evidence.text)[:EVIDENCE_CHARS]}`"
    return out


def render_markdown(expl: Explanation, *, heading: bool = True) -> str:
    """The explanation in Markdown: the sections that matter open, the others folded."""
    out: list[str] = []
    if heading:
        out.append(f"### ciretry: pipeline {expl.pipeline_id}: {expl.headline}")
        out.append("")
    if not expl.lines:
        out.append("No failed job so far.")
    for section in SECTIONS:
        lines = expl.section(section)
        if not lines:
            continue
        open_ = section in ("attention", "retried")
        body = [_line(line, with_evidence=section != "retried") for line in lines[:MAX_LINES]]
        if len(lines) > MAX_LINES:
            body.append(f"- … and {len(lines) - MAX_LINES} more")
        if open_:
            out.append(f"**{TITLES[section]}**")
            out.append("")
            out.extend(body)
        else:
            out.append(f"<details><summary>{TITLES[section]} ({len(lines)})</summary>")
            out.append("")
            out.extend(body)
            out.append("")
            out.append("</details>")
        out.append("")
    out.append(
        "<sub>Wrong verdict? Reply <code>/ciretry wrong &lt;job id&gt; &lt;why&gt;</code>. "
        "This note is edited in place as the pipeline goes on.</sub>"
    )
    return "\n".join(out).rstrip() + "\n"


def render_note(expl: Explanation, subject: str) -> str:
    """The MR note / PR comment as posted: the marker line, then the Markdown."""
    return marker(expl.source, expl.project, subject) + "\n" + render_markdown(expl)


@dataclass(frozen=True, slots=True)
class Annotation:
    """A GitHub check-run annotation (the API's fields)."""

    path: str
    start_line: int
    end_line: int
    annotation_level: Literal["notice", "warning", "failure"]
    title: str
    message: str


@dataclass(frozen=True, slots=True)
class CheckRunOutput:
    status: Literal["in_progress", "completed"]
    conclusion: Literal["success", "failure", "neutral"] | None
    title: str
    summary: str
    annotations: tuple[Annotation, ...] = field(default=())


_LEVEL: Final[dict[Section, Literal["notice", "warning", "failure"]]] = {
    "attention": "failure",
    "retried": "notice",
    "known": "warning",
    "not_retried": "warning",
}
#: GitHub takes at most 50 annotations per request.
MAX_ANNOTATIONS: Final = 50
#: Where an annotation goes when the log names no file: the workflow directory, which every
#: repository running Actions has (GitHub requires a path).
NO_FILE: Final = ".github"


def render_check_run(expl: Explanation) -> CheckRunOutput:
    annotations: list[Annotation] = []
    for line in expl.lines:
        if line.evidence is None or not line.evidence.text:
            continue
        path, number = line.location or (NO_FILE, 1)
        log_line = f" (log line {line.evidence.line})" if line.evidence.line else ""
        annotations.append(
            Annotation(
                path=path,
                start_line=number,
                end_line=number,
                annotation_level=_LEVEL[line.section],
                title=f"{line.job_name}: {line.category}"
                + (f" ({line.rule})" if line.rule else ""),
                # Only what never changes: GitHub appends an update's annotations to the run's
                # and cannot take one back, so what was done stays in the summary.
                message=f"{line.evidence.text[:1000]}{log_line}",
            )
        )
    return CheckRunOutput(
        status="in_progress" if expl.pending else "completed",
        conclusion=None if expl.pending else _conclusion(expl),
        title=expl.headline,
        summary=render_markdown(expl, heading=False),
        annotations=tuple(annotations[:MAX_ANNOTATIONS]),
    )


def _conclusion(expl: Explanation) -> Literal["success", "failure", "neutral"]:
    if expl.section("attention"):
        return "failure"
    if expl.section("known") or expl.section("not_retried"):
        return "neutral"
    if all("passed" in line.detail for line in expl.section("retried")):
        return "success"
    return "neutral"


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """A GitLab commit status (``POST /projects/:id/statuses/:sha``)."""

    state: Literal["running", "success", "failed"]
    description: str
    target_url: str | None


def render_status(expl: Explanation, target_url: str | None = None) -> CommitStatus:
    """``failed`` when something needs the author's attention, ``running`` while retries are
    under way, ``success`` otherwise (what is left is not the change's fault)."""
    if expl.section("attention"):
        state: Literal["running", "success", "failed"] = "failed"
    elif expl.pending:
        state = "running"
    else:
        state = "success"
    return CommitStatus(state=state, description=expl.headline[:255], target_url=target_url)


def digest(*parts: str) -> str:
    """A short content hash: what was posted, for the idempotency key."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- when to post ------------------------------------------------------------------------------


def targets(mode: ExplainMode, source: str, review: str | None) -> tuple[Target, ...]:
    """Where an explanation goes under ``mode``: ``status`` posts the commit status (GitLab) or
    check run (GitHub) only; ``note`` adds the MR note / PR comment when the pipeline belongs to
    a merge/pull request (``review``: its number)."""
    if mode == "off" or source not in ("gitlab", "github"):
        return ()
    base: Target = "commit_status" if source == "gitlab" else "check_run"
    if mode == "note" and review is not None:
        return (base, "mr_note" if source == "gitlab" else "pr_comment")
    return (base,)


PostPlan = Literal["post", "unchanged", "older"]


def plan_post(
    last_pipeline: str | None,
    last_digest: str | None,
    last_at: dt.datetime | None,
    pipeline_id: str,
    new_digest: str,
    now: dt.datetime,
    min_interval_s: float,
) -> tuple[PostPlan, float]:
    """Whether to post now: ``unchanged`` (the same content was posted), ``older`` (a newer
    pipeline of the same merge request was explained already: never overwrite it with an older
    one), else ``post`` with the seconds to wait first (rate limit per target, 0: now)."""
    if last_pipeline is not None and _newer(last_pipeline, pipeline_id):
        return "older", 0.0
    if last_digest == new_digest and last_pipeline == pipeline_id:
        return "unchanged", 0.0
    if last_at is None:
        return "post", 0.0
    wait = min_interval_s - (now - last_at).total_seconds()
    return "post", max(0.0, wait)


_MR_REF: Final = re.compile(r"^refs/merge-requests/(\d+)/(?:head|merge|train)$")
_PR_REF: Final = re.compile(r"^refs/pull/(\d+)/(?:head|merge)$")


def review_from_ref(ref: str | None) -> str | None:
    """The merge/pull request a pipeline's ref names itself (GitLab's detached merge request
    pipelines run on ``refs/merge-requests/<iid>/head``), else None."""
    if not ref:
        return None
    m = _MR_REF.match(ref) or _PR_REF.match(ref)
    return m.group(1) if m else None


__all__ = [
    "NAME",
    "NO_LINKS",
    "SECTIONS",
    "TITLES",
    "Annotation",
    "CheckRunOutput",
    "CommitStatus",
    "Decision",
    "ExplainMode",
    "Explanation",
    "JobLine",
    "Links",
    "Target",
    "digest",
    "explain",
    "marker",
    "plan_post",
    "render_check_run",
    "render_markdown",
    "render_note",
    "render_status",
    "review_from_ref",
    "source_location",
    "targets",
]
