"""Judge a rule set on a labelled corpus of real CI logs (``ciretry rules check --against``).

A corpus is a directory holding any number of ``labels.json`` files in the shared format (a
list of ``{"file", "category", "retryable": "yes" | "no" | "either", "source"}``, optionally
``"split"``), each ``file`` relative to the labels file's directory or its parent, plain or
gzipped; and logs of jobs that *passed* under directories named ``success``. A directory with
no labels file is taken as logs of passed jobs only.

What counts, as a retry bot is judged:

* a **false retry** is a log labelled ``no`` that the rules would retry: retrying a
  deterministic failure wastes a runner and hides a real error;
* **recall** is the share of logs labelled ``yes`` (spurious failures) that would be retried;
  **precision** the share of retries (over logs labelled ``yes`` or ``no``) that were right;
* a **passed log** must fire no rule at all: a pattern that matches a successful job's log is
  too broad, whatever signals would also be needed (elastic-recheck's lesson).

Labels ``either`` (a timeout, an unknown) are shown but count for neither side.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ciretry.common.events import JobFinished, VerdictReached

from .engine import Scanner
from .fold import fold_verdict
from .rules import RuleSet

#: Files taken for logs.
LOG_SUFFIXES = (".log", ".log.gz", ".txt", ".txt.gz")
#: Logs under a directory of this name are logs of jobs that passed.
PASSED_DIR = "success"


class CorpusError(ValueError):
    """A labels file that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Labelled:
    path: Path
    name: str
    category: str
    retryable: str  # yes | no | either
    split: str


@dataclass(frozen=True, slots=True)
class Outcome:
    log: Labelled
    verdict: VerdictReached

    @property
    def retried(self) -> bool:
        return self.verdict.retryable


@dataclass(frozen=True, slots=True)
class PassedHit:
    path: Path
    rule: str
    category: str
    count: int
    line: int
    text: str


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    passed_logs: list[Path] = field(default_factory=list)
    passed_hits: list[PassedHit] = field(default_factory=list)

    def table(self, split: str | None = None) -> Counter[tuple[str, bool]]:
        return Counter(
            (o.log.retryable, o.retried)
            for o in self.outcomes
            if split is None or o.log.split == split
        )

    def figures(self, split: str | None = None) -> dict[str, float | int]:
        t = self.table(split)
        yes_retry, yes_total = t[("yes", True)], t[("yes", True)] + t[("yes", False)]
        retries = yes_retry + t[("no", True)]
        return {
            "logs": sum(t.values()),
            "spurious": yes_total,
            "recall": yes_retry / yes_total if yes_total else 1.0,
            "precision": yes_retry / retries if retries else 1.0,
            "false_retries": t[("no", True)],
        }

    @property
    def splits(self) -> list[str]:
        return sorted({o.log.split for o in self.outcomes})

    @property
    def false_retries(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.log.retryable == "no" and o.retried]

    @property
    def missed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.log.retryable == "yes" and not o.retried]


def _is_log(p: Path) -> bool:
    return p.is_file() and p.name.endswith(LOG_SUFFIXES)


def load_labels(labels_file: Path) -> list[Labelled]:
    try:
        entries = json.loads(labels_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{labels_file}: cannot read labels: {exc}") from None
    if not isinstance(entries, list):
        raise CorpusError(f"{labels_file}: labels must be a JSON list")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("file"), str):
            raise CorpusError(f"{labels_file}: an entry without a file: {e!r}")
        if e.get("retryable") not in ("yes", "no", "either"):
            raise CorpusError(f"{labels_file}: {e['file']}: retryable must be yes, no or either")
        candidates = [labels_file.parent / e["file"], labels_file.parent.parent / e["file"]]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise CorpusError(f"{labels_file}: no such log: {e['file']}")
        out.append(
            Labelled(
                path=path,
                name=e["file"],
                category=str(e.get("category", "")),
                retryable=e["retryable"],
                split=str(e.get("split", "all")),
            )
        )
    return out


def corpus_logs(root: Path) -> tuple[list[Labelled], list[Path]]:
    """The labelled logs and the passed-job logs under ``root``."""
    labelled: list[Labelled] = []
    for lf in sorted(root.rglob("labels.json")):
        labelled.extend(load_labels(lf))
    logs = sorted(p for p in root.rglob("*") if _is_log(p))
    if labelled:
        passed = [p for p in logs if PASSED_DIR in p.relative_to(root).parts[:-1]]
    else:
        passed = logs
    return labelled, passed


def classify_log(
    ruleset: RuleSet, scanner: Scanner, log: Path, *, status: str = "failed"
) -> VerdictReached:
    """The verdict for a failed job whose only evidence is its log (no provider signals)."""
    job = JobFinished(
        source="gitlab", project="local", pipeline_id="0", job_id="0", job_name=log.name,
        status=status,
    )  # fmt: skip
    scan = scanner.scan_file(log)
    note = f"scanned {scan.bytes_scanned} bytes, {scan.total_lines} lines"
    return fold_verdict(
        job, [], scan.matches(), ruleset, log_available=True, log_note=note, log_facts=scan.facts
    )


def evaluate(ruleset: RuleSet, root: Path, scanner: Scanner | None = None) -> Report:
    scanner = scanner or Scanner(ruleset)
    labelled, passed = corpus_logs(root)
    report = Report(passed_logs=passed)
    for lab in labelled:
        report.outcomes.append(Outcome(lab, classify_log(ruleset, scanner, lab.path)))
    for log in passed:
        scan = scanner.scan_file(log)
        for rule_id, hits in scan.hits.items():
            report.passed_hits.append(
                PassedHit(log, rule_id, ruleset[rule_id].category, hits.count,
                          hits.first.line, hits.first.text)
            )  # fmt: skip
    return report


def format_table(report: Report, split: str | None = None) -> list[str]:
    t = report.table(split)
    lines = [f"  {'label':<10}{'retry':>8}{'no retry':>10}"]
    for label in ("yes", "no", "either"):
        lines.append(f"  {label:<10}{t[(label, True)]:>8}{t[(label, False)]:>10}")
    f = report.figures(split)
    lines.append(
        f"  precision {f['precision']:.3f}  recall {f['recall']:.3f} "
        f"({int(f['spurious'] * f['recall'] + 0.5)}/{f['spurious']} spurious)  "
        f"false retries {f['false_retries']}"
    )
    return lines


def format_report(report: Report, root: Path, *, verbose: bool = False) -> Iterable[str]:
    if report.outcomes:
        yield f"labelled logs under {root}: {len(report.outcomes)}"
        yield from format_table(report)
        if len(report.splits) > 1:
            for split in report.splits:
                yield f"split {split}:"
                yield from format_table(report, split)
        for o in report.false_retries:
            yield (
                f"FALSE RETRY {o.log.name} (labelled {o.log.category}): {o.verdict.category} "
                f"by {', '.join(o.verdict.rules[:3])}"
            )
        for o in report.missed:
            yield f"missed {o.log.name} ({o.log.category}, {o.log.split}): {o.verdict.category}"
        if verbose:
            for o in report.outcomes:
                yield (
                    f"  {o.log.name:<70} {o.log.retryable:<6} {o.log.category:<13} -> "
                    f"{o.verdict.category:<13} {'retry' if o.retried else '-':<6} "
                    f"{','.join(o.verdict.rules[:2])}"
                )
    for h in report.passed_hits:
        yield (
            f"{h.path}: rule {h.rule} ({h.category}) matches {h.count} line(s), "
            f"first at line {h.line}: {h.text}"
        )
    yield f"{len(report.passed_hits)} rule match(es) in {len(report.passed_logs)} passed log(s)"
