"""``ciretry ingest reconcile --since 2h --project ID ...`` (registered by ciretry.cli)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence

from ciretry.common.config import Config, load_config
from ciretry.common.eventlog import AppendResult
from ciretry.common.events import NewEvent
from ciretry.common.eventstore import EventStore
from ciretry.common.http import AiohttpTransport
from ciretry.common.providers import GITLAB

from .reconcile import RECONCILE_HTTP, ReconcileReport, parse_since, reconcile

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = subparsers.add_parser("ingest", help="ingest maintenance commands")
    sub = ingest.add_subparsers(dest="ingest_command", metavar="COMMAND")
    rec = sub.add_parser(
        "reconcile",
        help="append failed GitLab jobs that webhooks missed (idempotent)",
    )
    rec.add_argument("--since", default="2h", help="2h, 30m, 1d or an ISO timestamp")
    rec.add_argument(
        "--project",
        action="append",
        required=True,
        metavar="ID",
        help="GitLab project id or path (repeatable)",
    )
    rec.add_argument("--gitlab-url", default=None, help="default: CIRETRY_GITLAB_URL")
    rec.add_argument("--dry-run", action="store_true", help="list and count, append nothing")
    rec.set_defaults(func=_cmd_reconcile)

    def usage(_args: argparse.Namespace) -> int:
        ingest.print_help()
        return 2

    ingest.set_defaults(func=usage)


def _cmd_reconcile(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    config = load_config()
    if not args.dry_run and not config.database_url:
        print("CIRETRY_DATABASE_URL is required (or use --dry-run)", file=sys.stderr)
        return 2
    report = asyncio.run(_run(config, since, args.project, args.gitlab_url, args.dry_run))
    print(json.dumps(vars(report)))
    return 1 if report.errors else 0


async def _run(
    config: Config, since: dt.datetime, projects: Sequence[str], url: str | None, dry_run: bool
) -> ReconcileReport:
    store: EventStore | None = None
    if not dry_run:
        store = await EventStore.connect(config.database_url, config.database_schema, max_size=2)
    transport = AiohttpTransport()
    try:
        gitlab = GITLAB.client(
            transport, url or config.gitlab_url, config.gitlab_token, settings=RECONCILE_HTTP
        )
        append = None
        if store is not None:
            s = store

            async def append_fn(events: Sequence[NewEvent]) -> list[AppendResult]:
                # Committed events reach the bus through the outbox sweeper of a running
                # service; this one-shot command needs no NATS connection.
                return await s.append_batch(events)

            append = append_fn
        return await reconcile(since, projects=projects, gitlab=gitlab, append=append)
    finally:
        await transport.aclose()
        if store is not None:
            await store.close()
