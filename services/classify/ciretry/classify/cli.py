"""``ciretry classify``, ``ciretry rules check`` and ``ciretry rules backtest``: the classifier
from a shell.

``rules backtest [PATH...] [--since 30d]`` judges the failures stored in the log with a candidate
rule set (``backtest``) and exits 1 when it would retry a failure that failed again on retry.

``rules check --against DIR`` judges the rules on a corpus (``corpus``): a confusion table of
labelled logs (precision, recall, false retries, per split) and every rule that fires on a
log of a passed job; it exits 1 on a false retry, a rule firing on a passed log, or recall
below ``--min-recall``.

``register(subparsers)`` adds both subcommands to the ``ciretry`` argparse CLI; each sets
``func(args) -> int``. ``main(argv)`` runs them standalone (tests, ``python -m``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ciretry.common.config import load_config
from ciretry.common.eventlog import EventLog
from ciretry.common.events import JobFinished, OutcomeRecorded, PodTerminated, VerdictReached
from ciretry.common.eventstore import EventStore

from .backtest import Change, StoredFailure, backtest
from .corpus import CorpusError, evaluate, format_report
from .engine import Scanner
from .fold import fold_verdict
from .rules import RuleFileError, RuleSet, load_ruleset


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "classify",
        help="classify a job log (and signals) into a verdict",
        description="Classify one job attempt from its log and signals, printing the verdict.",
    )
    p.add_argument("--log", required=True, type=Path, help="log file (plain or .gz)")
    p.add_argument("--exit-code", type=int, default=None)
    p.add_argument("--failure-reason", default=None, help="canonical failure reason")
    p.add_argument("--pod-reason", action="append", default=[], help="Kubernetes reason (repeat)")
    p.add_argument("--status", default="failed", help="job status (default: failed)")
    p.add_argument("--rules", nargs="+", type=Path, default=[], help="extra rule files or dirs")
    p.add_argument("--no-default-rules", action="store_true", help="do not load shipped rules")
    p.add_argument("--max-bytes", type=int, default=None, help="only scan the log's tail")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_classify)

    r = subparsers.add_parser("rules", help="work with classification rule files")
    rsub = r.add_subparsers(dest="rules_command", required=True)
    c = rsub.add_parser(
        "check",
        help="validate rule files, optionally against a corpus of labelled logs",
        description=(
            "Validate rule files (the shipped default set plus PATHs) including every rule's "
            "examples. With --against DIR: classify every log listed in a labels.json under DIR "
            "(shared format: file, category, retryable yes/no/either, optional split) and print "
            "the confusion table with precision and recall, and report every rule that matches "
            "a log of a passed job (logs under success/ directories, or every log when DIR has "
            "no labels.json). Exits 1 on a false retry, a rule firing on a passed log, or "
            "recall below --min-recall."
        ),
    )
    c.add_argument("paths", nargs="*", type=Path, help="rule files or directories")
    c.add_argument("--against", type=Path, default=None, help="corpus directory (gz logs too)")
    c.add_argument("--min-recall", type=float, default=0.0, help="fail below this recall")
    c.add_argument("--verbose", action="store_true", help="print every labelled log's verdict")
    c.add_argument("--no-default-rules", action="store_true")
    c.set_defaults(func=cmd_rules_check)
    b = rsub.add_parser(
        "backtest",
        help="replay stored failures through a candidate rule set; exit 1 on conflicts",
        description=(
            "Judge the failures stored in the event log (their decisive lines, matched lines "
            "and signals) with the shipped rules plus PATHs, and report what would change: "
            "verdicts gained and lost per rule, category changes, the retries it would spend, "
            "and conflicts: failures it would retry that failed again the same way on retry. "
            "Exits 1 on a conflict (gate a rules change in CI), 2 on a rule file error."
        ),
    )
    b.add_argument("paths", nargs="*", type=Path, help="candidate rule files or directories")
    b.add_argument("--since", default="30d", help="how far back: 30d, 12h (default 30d)")
    b.add_argument("--no-default-rules", action="store_true")
    b.add_argument("--json", action="store_true", help="print a JSON object")
    b.set_defaults(func=cmd_rules_backtest)


def _load(paths: Sequence[Path], no_default: bool, err: TextIO) -> RuleSet | None:
    try:
        return load_ruleset(paths, include_default=not no_default)
    except RuleFileError as exc:
        print(f"error: {exc}", file=err)
        return None


def classify_file(
    ruleset: RuleSet,
    log: Path,
    *,
    exit_code: int | None = None,
    failure_reason: str | None = None,
    pod_reasons: Sequence[str] = (),
    status: str = "failed",
    max_bytes: int | None = None,
) -> VerdictReached:
    """Classify a log file with the given signals (what the CLI and fixture tests run)."""
    job = JobFinished(
        source="gitlab", project="local", pipeline_id="0", job_id="0", job_name=log.name,
        status=status, failure_reason=failure_reason, exit_code=exit_code,
    )  # fmt: skip
    pods = [
        PodTerminated(
            namespace="local",
            pod="local",
            source="gitlab",
            project="local",
            job_id="0",
            container_reason=reason,
            exit_code=exit_code,
        )  # fmt: skip
        for reason in pod_reasons
    ]
    scan = Scanner(ruleset).scan_file(log, max_bytes=max_bytes)
    note = f"scanned {scan.bytes_scanned} bytes, {scan.total_lines} lines"
    return fold_verdict(
        job, pods, scan.matches(), ruleset, log_available=True, log_note=note, log_facts=scan.facts
    )


def verdict_dict(v: VerdictReached) -> dict[str, Any]:
    return {
        "category": v.category,
        "retryable": v.retryable,
        "budget": v.budget,
        "action": v.action,
        "confidence": v.confidence,
        "rules": list(v.rules),
        "evidence": [
            {
                k: val
                for k, val in (
                    ("rule", e.rule),
                    ("line", e.line),
                    ("text", e.text),
                    ("signal", e.signal),
                )
                if val is not None or k != "signal"
            }
            for e in v.evidence
        ],  # fmt: skip
        "signals": dict(v.signals),
        "ruleset_version": v.ruleset_version,
        "log_note": v.log_note,
    }


def cmd_classify(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    ruleset = _load(args.rules, args.no_default_rules, err)
    if ruleset is None:
        return 2
    if not args.log.is_file():
        print(f"error: no such log file: {args.log}", file=err)
        return 2
    v = classify_file(
        ruleset, args.log, exit_code=args.exit_code, failure_reason=args.failure_reason,
        pod_reasons=args.pod_reason, status=args.status, max_bytes=args.max_bytes,
    )  # fmt: skip
    if args.json:
        print(json.dumps(verdict_dict(v)), file=out)
        return 0
    print(f"category:   {v.category}", file=out)
    print(f"retryable:  {'yes' if v.retryable else 'no'}", file=out)
    print(f"budget:     {v.budget}", file=out)
    print(f"action:     {v.action}", file=out)
    print(f"confidence: {v.confidence:.2f}", file=out)
    print(f"rules:      {', '.join(v.rules) or '(none)'}", file=out)
    if v.evidence:
        print("evidence:", file=out)
        for e in v.evidence:
            where = f"line {e.line}: {e.text}" if e.line is not None else f"signal {e.signal}"
            print(f"  {e.rule}  {where}", file=out)
    return 0


def cmd_rules_check(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    ruleset = _load(args.paths, args.no_default_rules, err)
    if ruleset is None:
        return 2
    print(
        f"{len(ruleset)} rules OK ({len(ruleset.log_rules)} log rules), "
        f"version {ruleset.version}, from {', '.join(ruleset.sources)}",
        file=out,
    )
    if args.against is None:
        return 0
    if not args.against.is_dir():
        print(f"error: not a directory: {args.against}", file=err)
        return 2
    try:
        report = evaluate(ruleset, args.against)
    except CorpusError as exc:
        print(f"error: {exc}", file=err)
        return 2
    for line in format_report(report, args.against, verbose=args.verbose):
        print(line, file=out)
    recall = report.figures()["recall"]
    failed = bool(report.false_retries or report.passed_hits)
    if report.outcomes and recall < args.min_recall:
        print(f"recall {recall:.3f} is below --min-recall {args.min_recall}", file=out)
        failed = True
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ciretry")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())


def parse_since(text: str) -> dt.timedelta:
    """``30d``, ``12h``, ``90m`` as a duration."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"--since: {text!r} is not like 30d, 12h or 90m")
    return dt.timedelta(**{units[text[-1]]: int(text[:-1])})


async def stored_failures(log: EventLog, since: dt.datetime) -> list[StoredFailure]:
    """The failures the log holds since ``since``: each verdict with its outcome, if known."""
    verdicts: dict[Any, tuple[VerdictReached, str | None]] = {}
    async for event in log.read_all(0, types=("VerdictReached", "OutcomeRecorded")):
        data = event.data
        if isinstance(data, VerdictReached) and event.recorded_at >= since:
            verdicts[event.event_id] = (data, None)
        elif isinstance(data, OutcomeRecorded) and data.verdict_event_id in verdicts:
            verdicts[data.verdict_event_id] = (verdicts[data.verdict_event_id][0], data.outcome)
    return [StoredFailure(k, v, o) for k, (v, o) in verdicts.items()]


def cmd_rules_backtest(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        window = parse_since(args.since)
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return 2
    ruleset = _load(args.paths, args.no_default_rules, err)
    if ruleset is None:
        return 2
    config = load_config()
    if not config.database_url:
        print("error: CIRETRY_DATABASE_URL is not set", file=err)
        return 2

    async def read() -> list[StoredFailure]:
        store = await EventStore.connect(config.database_url, config.database_schema, max_size=2)
        try:
            return await stored_failures(store, dt.datetime.now(dt.UTC) - window)
        finally:
            await store.close()

    report = backtest(asyncio.run(read()), ruleset)
    body = {
        "failures": report.failures,
        "unjudged": report.unjudged,
        "retries_added": report.retries_added,
        "retries_saved": report.retries_saved,
        "gained_by_rule": dict(report.gained_by_rule),
        "lost_by_rule": dict(report.lost_by_rule),
        "recategorized": len(report.recategorized),
        "conflicts": [_change(c) for c in report.conflicts],
    }
    if args.json:
        print(json.dumps(body, indent=2, default=str), file=out)
    else:
        print(
            f"{report.failures} stored failures since {args.since} ({report.unjudged} without "
            f"lines to judge): {report.retries_added} more retries, {report.retries_saved} fewer, "
            f"{len(report.recategorized)} other category changes",
            file=out,
        )
        for rule, n in report.gained_by_rule.most_common():
            print(f"  + {n:5} retryable by {rule}", file=out)
        for rule, n in report.lost_by_rule.most_common():
            print(f"  - {n:5} no longer retryable (was {rule})", file=out)
        for c in report.conflicts:
            print(
                f"CONFLICT {c.job}: {c.old} -> {c.new} by {c.rule}, but its retry failed again "
                f"the same way (signature {c.signature})",
                file=out,
            )
    return 1 if report.conflicts else 0


def _change(c: Change) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ("job", "signature", "old", "new", "rule", "outcome")}
