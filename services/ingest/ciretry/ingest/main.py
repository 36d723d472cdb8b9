"""Wiring of the ingest service: webhook routes, and the pulse consumer when AMQP is set."""

from __future__ import annotations

from aiohttp import web

from ciretry.audit.api import add_routes as add_audit_routes
from ciretry.audit.projector import Projector
from ciretry.common.service import Infra, Worker

from .app import install
from .pulse import PulseConsumer, PulseSettings


async def setup(infra: Infra, app: web.Application) -> list[Worker]:
    batcher = install(app, infra.config, infra.store, infra.recorder)
    # The read API, the dashboard and their projector live on ingest's server (the one service
    # reachable from outside); the projector is exactly-once, so every replica may run it.
    add_audit_routes(app, infra.store, token=infra.config.api_token)
    workers: list[Worker] = [Projector(infra.store).run]
    if infra.config.amqp_url:
        pulse = PulseConsumer(PulseSettings.from_env(), append=batcher.append)

        async def pulse_connected() -> bool:
            return pulse.connection is not None and not pulse.connection.is_closed

        infra.ready_checks.append(pulse_connected)
        workers.append(pulse.run)
    return workers
