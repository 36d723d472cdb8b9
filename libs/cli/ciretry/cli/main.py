"""``ciretry``: one command for the dev stack, each service, migrations and the tools.

This is the composition root: the only place that imports every service (lazily, so that
``ciretry serve act`` loads act's code only).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence

from ciretry.common.config import ConfigError, load_config
from ciretry.common.embedded import EmbeddedServerError

SERVICES = ("ingest", "classify", "act")

#: Modules whose ``register(subparsers)`` adds their own subcommands.
PLUGINS = ("ciretry.classify.cli", "ciretry.ingest.cli", "ciretry.act.cli", "ciretry.audit.cli")


def _cmd_serve(args: argparse.Namespace) -> int:
    from ciretry.common.service import run_service

    config = load_config()
    if not config.database_url or not config.nats_url:
        print(
            "ciretry serve needs CIRETRY_DATABASE_URL and CIRETRY_NATS_URL "
            "(`ciretry up` starts embedded servers and sets them)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"ciretry.{args.service}.main")
    asyncio.run(run_service(args.service, config, module.setup))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from ciretry.common.eventstore import EventStore

    config = load_config()
    if not config.database_url:
        print("ciretry migrate needs CIRETRY_DATABASE_URL", file=sys.stderr)
        return 2

    async def run() -> list[str]:
        store = await EventStore.connect(config.database_url, config.database_schema, max_size=1)
        try:
            return await store.migrate()
        finally:
            await store.close()

    applied = asyncio.run(run())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from .devstack import run_dev_stack

    return run_dev_stack(
        data_dir=args.data_dir, base_port=args.base_port, services=args.services or SERVICES
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciretry",
        description="Classify CI job failures and retry only what is worth retrying.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run the whole stack (embedded PostgreSQL/NATS unless URLs are configured)",
    )
    up.add_argument("--data-dir", default=None, help="embedded servers' data (default .ciretry/)")
    up.add_argument(
        "--base-port", type=int, default=8080, help="ingest's port; classify +1, act +2"
    )
    up.add_argument("--services", nargs="*", choices=SERVICES, help="a subset of the services")
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="run one service (what compose and Kubernetes run)")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(func=_cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=_cmd_migrate)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = (
            module.register
        )
        register(sub)
    _replay_with_projections(sub)
    return parser


def _replay_with_projections(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``ciretry replay --projections``: act owns budget replay, audit owns the read models;
    the command that knows both joins them here."""
    replay = sub.choices.get("replay")
    if replay is None:
        return
    replay.add_argument(
        "--projections",
        action="store_true",
        help="rebuild the audit read models from position 0 instead of replaying budgets",
    )
    budgets = replay.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if args.projections:
            from ciretry.audit.cli import run_rebuild

            return run_rebuild(args)
        return int(budgets(args))

    replay.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(0)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        code = 2
    except EmbeddedServerError as exc:
        print(f"cannot start an embedded server: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
