"""Wiring of the ingest service: webhook routes, the audit component, and the pulse consumer when
AMQP is set."""

from __future__ import annotations

from aiohttp import web

from ciretry import audit
from ciretry.common.service import Infra, Worker

from .app import install
from .pulse import PulseConsumer, PulseSettings


async def setup(infra: Infra, app: web.Application) -> list[Worker]:
    batcher = install(app, infra.config, infra.store, infra.recorder)
    # The audit (read API, dashboard, projector) is served by ingest's server, the one service
    # reachable from outside.
    workers = audit.mount(app, infra.store, infra.config)
    if infra.config.amqp_url:
        pulse = PulseConsumer(PulseSettings.from_config(infra.config), append=batcher.append)

        async def pulse_connected() -> bool:
            return pulse.connection is not None and not pulse.connection.is_closed

        infra.ready_checks.append(pulse_connected)
        workers.append(pulse.run)
    return workers
