"""Wiring of the audit component: ``mount`` puts it into whichever process serves it.

Today ingest's server does (the one service reachable from outside): ``mount(app, store,
config)`` adds the read API under ``/api/v1/`` and the dashboard at ``/`` to its aiohttp app,
and returns the projector as a worker for the service to run. The projector is exactly-once,
so every replica may run it. The read models' tables are created by the log's migrations
(``ciretry migrate``; docs/audit.md says why they stay there).
"""

from __future__ import annotations

from aiohttp import web

from ciretry.common.auth import scopes
from ciretry.common.config import Config
from ciretry.common.eventstore import EventStore
from ciretry.common.service import Worker

from . import api, dashboard
from .access import ACCESS, AUDIT, Access, Sessions
from .projector import Projector
from .queries import Audit
from .store import AuditStore


def mount(app: web.Application, log: EventStore, config: Config) -> list[Worker]:
    """Serve the audit API and dashboard on ``app``; returns the workers to run (the
    projector)."""
    store = AuditStore(log)
    app[AUDIT] = Audit(store)
    app[ACCESS] = Access(scopes(config), Sessions(config.session_secrets, config.session_max_age))
    api.add_routes(app)
    dashboard.add_routes(app)
    return [Projector(store).run]


__all__ = ["mount"]
