"""``ciretry audit job|pipeline|why|stats|events``: the audit queries from a terminal.

Rich tables by default, ``--json`` for the same document the HTTP API returns. The read models
must be projected (the projector worker does it; ``ciretry replay --projections`` rebuilds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from ciretry.common.config import load_config
from ciretry.common.eventstore import EventStore

from .projector import rebuild_projections
from .queries import METRICS, Audit, QueryError, parse_time
from .store import AuditStore

NO_DATABASE = (
    "CIRETRY_DATABASE_URL is not set and no `ciretry up` runs with the data directory here "
    "(CIRETRY_DATA_DIR, default .ciretry): start one (./run up) or set CIRETRY_DATABASE_URL"
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "clusters", help="failures no rule explains, clustered by signature, ranked by impact"
    )
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--project")
    p.add_argument("--all", action="store_true", help="every failure, not only the unexplained")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--stubs", action="store_true", help="print each cluster's rule stub")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run_clusters)

    audit = subparsers.add_parser("audit", help="query the audit read models (why, stats, …)")
    sub = audit.add_subparsers(dest="audit_command", metavar="QUERY", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    for name, helptext in (
        ("job", "a job attempt's timeline"),
        ("why", "why it was retried or not"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("source")
        p.add_argument("project", help="project as the source names it (owner/repo is fine)")
        p.add_argument("job_id")
        common(p)
        p.set_defaults(func=run_job if name == "job" else run_why)

    p = sub.add_parser("pipeline", help="a pipeline's summary, jobs and retries")
    p.add_argument("source")
    p.add_argument("project")
    p.add_argument("pipeline_id")
    common(p)
    p.set_defaults(func=run_pipeline)

    p = sub.add_parser("stats", help="time-bucketed counts of one metric")
    p.add_argument("metric", choices=METRICS)
    p.add_argument("--bucket", default="day", choices=("hour", "day", "week"))
    p.add_argument("--from", dest="start", help="ISO 8601 start (default 30 days ago)")
    p.add_argument("--to", dest="end", help="ISO 8601 end (default now)")
    p.add_argument("--project")
    p.add_argument("--source")
    p.add_argument("--top", type=int, default=10)
    common(p)
    p.set_defaults(func=run_stats)

    p = sub.add_parser("outcomes", help="how failures ended per rule, with the pass rate")
    p.add_argument("--days", type=int, default=7, choices=(1, 7, 30))
    p.add_argument(
        "--by", default="none", choices=("none", "project", "runner", "job", "signature")
    )
    p.add_argument("--project")
    p.add_argument("--limit", type=int, default=50)
    common(p)
    p.set_defaults(func=run_outcomes)

    p = sub.add_parser("storms", help="retry storms: one failure in many pipelines at once")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--limit", type=int, default=50)
    common(p)
    p.set_defaults(func=run_storms)

    p = sub.add_parser("events", help="raw events by stream, type, time and position")
    p.add_argument("--stream")
    p.add_argument("--type", action="append", default=[], help="repeatable")
    p.add_argument("--from", dest="start")
    p.add_argument("--to", dest="end")
    p.add_argument("--after", type=int, default=0, help="position (or a next_cursor)")
    p.add_argument("--limit", type=int, default=50)
    common(p)
    p.set_defaults(func=run_events)


def _run(args: argparse.Namespace, query: Callable[[Audit], Awaitable[Any]]) -> Any:
    config = load_config()
    if not config.database_url:
        print(NO_DATABASE, file=sys.stderr)
        raise SystemExit(2)

    async def go() -> Any:
        store = await EventStore.connect(config.database_url, config.database_schema, max_size=2)
        try:
            return await query(Audit(AuditStore(store)))
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _emit(args: argparse.Namespace, body: Any, render: Callable[[Any, Console], None]) -> int:
    if body is None:
        print("not found", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2, default=str))
    else:
        render(body, Console())
    return 0


def _kv(title: str, values: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False)
    for k, v in values.items():
        t.add_row(k, "" if v is None else str(v))
    return t


def run_clusters(args: argparse.Namespace) -> int:
    body = _run(
        args,
        lambda a: a.clusters(
            days=args.days, project=args.project, unexplained=not args.all, limit=args.limit
        ),
    )

    def render(b: dict[str, Any], c: Console) -> None:
        t = Table(title=f"failure clusters, last {b['days']} days"
                  + (" (no rule explains them)" if b["unexplained"] else ""))  # fmt: skip
        for col in ("#", "signature", "jobs", "pipelines", "commits", "7d", "passed/again",
                    "top job", "example"):  # fmt: skip
            t.add_column(col)
        for i, cl in enumerate(b["clusters"], 1):
            o = cl["outcomes"]
            t.add_row(
                str(i), cl["signature"], str(cl["impact"]["jobs"]),
                str(cl["impact"]["pipelines"]), str(cl["impact"]["commits"]),
                str(cl["trend"]["7d"]), f"{o['passed_on_retry']}/{o['failed_again_same']}",
                (cl["top_jobs"] or ["-"])[0], (cl["examples"] or ["-"])[-1][:80],
            )  # fmt: skip
        c.print(t)
        if args.stubs:
            for i, cl in enumerate(b["clusters"], 1):
                if cl["rule_stub"]:
                    c.print(f"# cluster {i}: {cl['signature']}", markup=False)
                    c.print(cl["rule_stub"], markup=False, highlight=False)

    return _emit(args, body, render)


def run_outcomes(args: argparse.Namespace) -> int:
    body = _run(
        args,
        lambda a: a.outcomes(days=args.days, by=args.by, project=args.project, limit=args.limit),
    )

    def render(b: dict[str, Any], c: Console) -> None:
        t = Table(title=f"outcomes of failures, last {b['days']} days, per rule and {b['by']}")
        for col in ("rule", b["by"], "failures", "passed", "again", "differently", "never",
                    "pass rate (95 %)"):  # fmt: skip
            t.add_column(col)
        for i in b["items"]:
            rate = "-" if i["pass_rate"] is None else (
                f"{i['pass_rate']:.0%} ({i['pass_rate_low']:.0%}-{i['pass_rate_high']:.0%})"
            )  # fmt: skip
            t.add_row(i["rule"] or "(no rule)", i["key"] or "", str(i["failures"]),
                      str(i["passed_on_retry"]), str(i["failed_again_same"]),
                      str(i["failed_differently"]), str(i["never_retried"]), rate)  # fmt: skip
        c.print(t)

    return _emit(args, body, render)


def run_storms(args: argparse.Namespace) -> int:
    body = _run(args, lambda a: a.storms(days=args.days, limit=args.limit))

    def render(b: dict[str, Any], c: Console) -> None:
        t = Table(title=f"retry storms, last {b['days']} days")
        for col in ("storm", "state", "category", "started", "ended", "pipelines", "parked",
                    "example"):  # fmt: skip
            t.add_column(col)
        for s in b["storms"]:
            state = s["state"] if s["mode"] == "park" else f"{s['state']} (watch)"
            t.add_row(s["storm_id"], state, s["category"], s["started_at"] or "-",
                      s["ended_at"] or "-", str(s["pipeline_count"]), str(s["parked_count"]),
                      (s["example"] or "-")[:80])  # fmt: skip
        c.print(t)

    return _emit(args, body, render)


def run_job(args: argparse.Namespace) -> int:
    body = _run(args, lambda a: a.job(args.source, args.project, args.job_id))

    def render(b: dict[str, Any], c: Console) -> None:
        c.print(_kv("job", b["job"]))
        if b["verdict"]:
            ev = Table("rule", "line", "text", "signal", title="evidence")
            for e in b["verdict"]["evidence"]:
                ev.add_row(e.get("rule", ""), str(e.get("line", "")), e.get("text", ""),
                           e.get("signal", ""))  # fmt: skip
            c.print(ev)
        if b["decision"]:
            c.print(_kv("decision", {k: v for k, v in b["decision"].items() if k != "budget"}
                        | b["decision"]["budget"]))  # fmt: skip
        t = Table("position", "recorded at", "type", "stream", title="timeline")
        for e in b["events"]:
            t.add_row(str(e["position"]), e["recorded_at"], e["type"], e["stream"])
        c.print(t)

    return _emit(args, body, render)


def run_why(args: argparse.Namespace) -> int:
    body = _run(args, lambda a: a.why(args.source, args.project, args.job_id))

    def render(b: dict[str, Any], c: Console) -> None:
        c.print(b["summary"])
        d = b["facts"].get("decision")
        if d:
            c.print(_kv("budget at the decision", d["budget"]))

    return _emit(args, body, render)


def run_pipeline(args: argparse.Namespace) -> int:
    body = _run(args, lambda a: a.pipeline(args.source, args.project, args.pipeline_id))

    def render(b: dict[str, Any], c: Console) -> None:
        c.print(_kv("pipeline", b["pipeline"]))
        t = Table("job", "name", "status", "category", "decision", "reason", title="jobs")
        for j in b["jobs"]:
            t.add_row(j["job_id"], j["job_name"] or "", j["status"] or "", j["category"] or "",
                      j["decision"] or "", j["decision_reason"] or "")  # fmt: skip
        c.print(t)

    return _emit(args, body, render)


def run_stats(args: argparse.Namespace) -> int:
    body = _run(
        args,
        lambda a: a.stats(
            args.metric, bucket=args.bucket, start=parse_time(args.start, "--from"),
            end=parse_time(args.end, "--to"), project=args.project, source=args.source,
            top=args.top,
        ),
    )  # fmt: skip

    def render(b: dict[str, Any], c: Console) -> None:
        t = Table("key", "total", *(p["t"][:13] for p in _buckets(b)), title=b["metric"])
        times = [p["t"] for p in _buckets(b)]
        for s in b["series"]:
            by_t = {p["t"]: p["n"] for p in s["points"]}
            t.add_row(s["key"], str(s["total"]), *(str(by_t.get(x, "")) for x in times))
        c.print(t)

    return _emit(args, body, render)


def _buckets(b: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for s in b["series"]:
        for p in s["points"]:
            seen.setdefault(p["t"], p)
    return [seen[k] for k in sorted(seen)][-12:]  # the latest buckets fit a terminal


def run_events(args: argparse.Namespace) -> int:
    body = _run(
        args,
        lambda a: a.events(
            stream=args.stream, types=args.type, start=parse_time(args.start, "--from"),
            end=parse_time(args.end, "--to"), after=args.after, limit=args.limit,
        ),
    )  # fmt: skip

    def render(b: dict[str, Any], c: Console) -> None:
        t = Table("position", "recorded at", "type", "stream", title="events")
        for e in b["events"]:
            t.add_row(str(e["position"]), e["recorded_at"], e["type"], e["stream"])
        c.print(t)
        if b["next_cursor"]:
            c.print(f"more: --after {b['next_cursor']}")

    return _emit(args, body, render)


def run_rebuild(args: argparse.Namespace) -> int:
    """What ``ciretry replay --projections`` runs (the lead wires the flag)."""
    config = load_config()
    if not config.database_url:
        print(NO_DATABASE, file=sys.stderr)
        return 2

    async def go() -> int:
        store = await EventStore.connect(config.database_url, config.database_schema, max_size=2)
        try:
            await store.migrate()
            return await rebuild_projections(AuditStore(store))
        finally:
            await store.close()

    n = asyncio.run(go())
    print(f"projected {n:,} events into the audit read models")
    return 0


__all__ = ["register", "rebuild_projections", "run_rebuild"]
