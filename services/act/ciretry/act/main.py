"""Wiring of the act service: a verdict consumer and the scheduler for backed-off retries."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ciretry.common.bus import Consumer
from ciretry.common.events import RecordedEvent
from ciretry.common.service import Infra, Worker, consumer_settings

from .service import CONSUMER, build


async def setup(infra: Infra, app: web.Application) -> list[Worker]:
    handler = build(infra.store, infra.recorder, infra.config)
    infra.cleanups.append(handler.executors.close)

    async def on_verdict(event: RecordedEvent) -> None:
        await handler.handle_verdict(event)

    consumer = Consumer(
        infra.bus,
        infra.store,
        name=CONSUMER,
        topic="verdict",
        handler=on_verdict,
        settings=consumer_settings(infra.config),
    )
    await consumer.setup()
    infra.consumers.append(consumer)

    async def scheduler(stop: asyncio.Event) -> None:
        await handler.run_scheduler(stop, interval=infra.config.act_scheduler_interval)

    return [consumer.run, scheduler]
