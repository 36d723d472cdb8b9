"""``ciretry replay [--stream S] [--verify]``: rebuild budgets from the log, check decisions."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from ciretry.common.config import load_config
from ciretry.common.eventstore import EventStore
from ciretry.common.learning import LearningCheck, LearningSettings, learning_settings_from_text

from .policy import default_policy_text, load_policy
from .replay import ReplayReport, replay, replay_learning, replay_storms
from .storms import StormCheck

#: Connections of ``ciretry replay``: the log reads pipeline streams over up to three at once
#: (``EventStore.stream_bodies``), so PostgreSQL aggregates the next streams while this
#: process decodes and folds; more would only compete for the same cores.
POOL_SIZE = 4


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay", help="rebuild every retry budget from the event log and check the decisions"
    )
    p.add_argument("--stream", help="replay one stream only (e.g. pipeline-gitlab-42-900)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="exit 1 if any RetryRequested exceeded its budget at the time it was made, a "
        "learned verdict change is not backed by the outcomes before it, or a retry storm by "
        "the verdicts before it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    config = load_config()
    console = Console(stderr=True)
    if not config.database_url:
        console.print("CIRETRY_DATABASE_URL is not set")
        return 2
    store = await EventStore.connect(
        config.database_url, config.database_schema, max_size=POOL_SIZE
    )
    try:
        # No total: the events folded are those of pipeline streams, not known beforehand.
        with Progress(
            TextColumn("replaying"),
            BarColumn(),
            TextColumn("{task.completed:,} events"),
            console=console,
            transient=True,
            disable=bool(args.stream) or not console.is_terminal,
        ) as bar:
            task = bar.add_task("replay", total=None)
            report = await replay(store, args.stream, lambda n: bar.advance(task, n))
        learning = None
        storms = None
        if not args.stream:
            learning = await replay_learning(store, _learning_settings(config.policy_path))
            storms = await replay_storms(store, load_policy(config.policy_path).storm)
    finally:
        await store.close()
    print_report(report, Console())
    if learning is not None:
        print_learning(learning, Console())
    if storms is not None:
        print_storms(storms, Console())
    broken = (
        bool(report.violations)
        or (learning is not None and not learning.ok)
        or (storms is not None and not storms.ok)
    )
    return 1 if args.verify and broken else 0


def _learning_settings(policy_path: str) -> LearningSettings:
    if not policy_path:
        return learning_settings_from_text(default_policy_text(), "default.toml")
    with open(policy_path, encoding="utf-8") as f:
        return learning_settings_from_text(f.read(), policy_path)


def print_learning(check: LearningCheck, console: Console) -> None:
    summary = check.learner.summary()
    _rebuilt(console, "learning (rebuilt from the log)", [
        *((f"outcomes: {k}", v) for k, v in sorted(check.outcomes.items())),
        ("signatures scored", summary["signatures_scored"]),
        ("retryable signatures (learned)", len(summary["retryable_signatures"])),
        ("explain-only signatures and rules", len(summary["explain_only"])),
        ("learned changes recorded", check.changes),
        ("changes not backed by outcomes", len(check.unexplained)),
        ("verdicts citing no recorded change", len(check.unbacked)),
        ("proposals not yet in the log", len(check.missing)),
    ], [*check.unexplained, *check.unbacked])  # fmt: skip


def _rebuilt(
    console: Console, title: str, rows: list[tuple[str, int]], not_backed: list[str]
) -> None:
    """A state rebuilt from the log: its numbers, then what the record does not back."""
    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(name, f"{value:,}")
    console.print(table)
    for line in not_backed[:50]:
        console.print(f"[red]not backed[/red] {line}")


def print_storms(check: StormCheck, console: Console) -> None:
    summary = check.watch.summary()
    _rebuilt(console, "retry storms (rebuilt from the log)", [
        ("storms recorded", check.started),
        ("storms ended", check.ended),
        ("open now", summary["open"]),
        ("jobs parked", check.parked),
        ("parked jobs of ended storms not decided again yet", summary["waiting_release"]),
        ("storms no fold of the verdicts opens", len(check.unexplained)),
        ("parks naming no recorded storm", len(check.unbacked)),
    ], [*check.unexplained, *check.unbacked])  # fmt: skip


def print_report(report: ReplayReport, console: Console) -> None:
    table = Table(title="replay", show_header=False)
    for name, value in (
        ("events folded", report.events),
        ("pipelines", report.pipelines),
        ("attempt chains (budgets)", len(report.states)),
        ("chains spanning pipelines (checked in log order)", report.multi_stream_chains),
        ("retries requested", report.requests),
        ("skipped", report.skips),
        ("issued", report.issued),
        ("failed", report.failed),
        ("pending (scheduled or interrupted)", report.pending),
        ("over budget", len(report.violations)),
    ):
        table.add_row(name, f"{value:,}")
    console.print(table)
    for v in report.violations[:50]:
        console.print(f"[red]over budget[/red] {v.stream} @{v.position} {v.key}: {v.why}")
    if len(report.violations) > 50:
        console.print(f"... and {len(report.violations) - 50} more")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ciretry")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
