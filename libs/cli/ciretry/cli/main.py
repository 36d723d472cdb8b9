"""``ciretry``: one command for the dev stack, each service, migrations and the tools.

This is the composition root: the only place that imports every service (lazily, so that
``ciretry serve act`` loads act's code only).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ciretry.common import devstack as stackfile
from ciretry.common.config import ConfigError, check_paths, load_config, unknown_variables
from ciretry.common.embedded import EmbeddedServerError
from ciretry.common.errors import is_transient
from ciretry.common.startup import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_IN_USE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    DependencyUnavailable,
    PortInUse,
    StopRequested,
    endpoint,
    wait_for,
    why_failed,
)

SERVICES = ("ingest", "classify", "act")

#: Modules whose ``register(subparsers)`` adds their own subcommands.
PLUGINS = ("ciretry.classify.cli", "ciretry.ingest.cli", "ciretry.act.cli", "ciretry.audit.cli")


def _cmd_serve(args: argparse.Namespace) -> int:
    from ciretry.common.eventstore import MigrationsPending
    from ciretry.common.service import run_service

    config = load_config()
    check_paths(config)
    if not config.database_url or not config.nats_url:
        print(
            "ciretry serve needs CIRETRY_DATABASE_URL and CIRETRY_NATS_URL "
            "(`ciretry up` starts embedded servers and sets them)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"ciretry.{args.service}.main")
    try:
        asyncio.run(run_service(args.service, config, module.setup))
    except (DependencyUnavailable, PortInUse) as exc:
        # Logging is set up (JSON by default): the last line goes where the others went.
        logging.getLogger("ciretry.serve").error("%s: %s", args.service, exc)
        return EXIT_IN_USE if isinstance(exc, PortInUse) else EXIT_UNAVAILABLE
    except MigrationsPending as exc:
        # The runtime role may not change the schema (docs/security.md): say what to run.
        logging.getLogger("ciretry.serve").error("%s: %s", args.service, exc)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    from ciretry.common.eventstore import EventStore

    config = load_config()
    if not config.database_url:
        print(
            "ciretry migrate needs CIRETRY_DATABASE_URL (or a `ciretry up` running here)",
            file=sys.stderr,
        )
        return EXIT_CONFIG

    async def run() -> tuple[list[str], str]:
        store = await wait_for(
            endpoint("PostgreSQL", config.database_url),
            lambda: EventStore.connect(config.database_url, config.database_schema, max_size=1),
            attempts=config.connect_attempts,
            report=lambda line: print(line, file=sys.stderr, flush=True),
        )
        try:
            applied = await store.migrate()
            role = config.database_runtime_role
            outcome = "" if not role else await store.grant_runtime(
                role, config.database_runtime_password
            )
            return applied, outcome
        finally:
            await store.close()

    applied, outcome = asyncio.run(run())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    role = config.database_runtime_role
    if outcome == "cannot_create":
        print(
            f"warning: the runtime role {role} does not exist and this database user may not "
            "create it (no CREATEROLE): the services keep the owner's rights. Create it "
            "(a LOGIN role of that name) and run `ciretry migrate` again "
            "(docs/security.md)",
            file=sys.stderr,
        )
    elif outcome:
        login = "can log in" if config.database_runtime_password else "a group role (no password)"
        print(
            f"runtime role {role} ({outcome}, {login}): may read and append to the event log, "
            "not change or empty it; the services' CIRETRY_DATABASE_URL should use it"
        )
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


#: Commands that start or are the stack: they never borrow a running ``up``'s servers.
_STACK_COMMANDS = frozenset({"up", "serve"})


def use_running_dev_stack(command: str) -> None:
    """A tool run next to a ``ciretry up`` (same data directory) with no database configured
    uses that stack's PostgreSQL and NATS, and says so."""
    if command in _STACK_COMMANDS or os.environ.get("CIRETRY_DATABASE_URL"):
        return
    data_dir = Path(os.environ.get("CIRETRY_DATA_DIR") or ".ciretry").absolute()
    info = stackfile.running(data_dir)
    if info is None:
        return
    os.environ["CIRETRY_DATABASE_URL"] = info.database_url
    os.environ.setdefault("CIRETRY_DATABASE_SCHEMA", info.database_schema)
    if not os.environ.get("CIRETRY_NATS_URL"):
        os.environ["CIRETRY_NATS_URL"] = info.nats_url
    print(f"using the dev stack of `ciretry up` (pid {info.pid}) in {data_dir}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; the exit codes are ciretry.common.startup's ``EXIT_*``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(0)
    if args.command not in _STACK_COMMANDS:
        for warning in unknown_variables():
            print(f"warning: {warning}", file=sys.stderr)
    try:
        use_running_dev_stack(args.command)
        code = args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except EmbeddedServerError as exc:
        print(f"cannot start an embedded server: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except DependencyUnavailable as exc:
        print(f"ciretry {args.command}: {exc}", file=sys.stderr)
        code = EXIT_UNAVAILABLE
    except (PortInUse, stackfile.StackBusy) as exc:
        print(f"ciretry {args.command}: {exc}", file=sys.stderr)
        code = EXIT_IN_USE
    except StopRequested:
        code = EXIT_OK
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        if not is_transient(exc):
            raise
        # A tool whose database or NATS went away: the cause in one line, not a traceback.
        what, variable = (
            ("NATS", "CIRETRY_NATS_URL")
            if type(exc).__module__.startswith("nats")
            else ("PostgreSQL", "CIRETRY_DATABASE_URL")
        )
        where = endpoint(what, os.environ.get(variable, ""))
        print(f"ciretry {args.command}: {where} {why_failed(exc)}", file=sys.stderr)
        code = EXIT_UNAVAILABLE
    raise SystemExit(code)
