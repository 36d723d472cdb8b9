"""Wiring of the act service: a verdict consumer and the scheduler for backed-off retries."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ciretry.common.bus import Consumer
from ciretry.common.events import RecordedEvent
from ciretry.common.service import Infra, Worker, consumer_settings

from .explainer import CONSUMER as EXPLAIN_CONSUMER
from .explainer import PIPELINE_CONSUMER
from .service import CONSUMER, build


async def setup(infra: Infra, app: web.Application) -> list[Worker]:
    handler = build(infra.store, infra.recorder, infra.config)
    infra.cleanups.append(handler.executors.close)
    # Cleanups run after the consumers and the scheduler drained: the last outcomes are
    # committed by then.
    infra.cleanups.append(handler.close)

    if handler.policy.storm.mode != "off":
        # Know the open storms before the first verdict (as classify's learner knows what it
        # learned): a replica starting during a storm parks its retries from the start.
        await handler.storms.catch_up()

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

    # Explanations on consumers of their own: a provider refusing or slow to take a note
    # delays the note, never a retry (docs/explanations.md).
    # Only when the policy explains somewhere: otherwise every decision would cost a tracking
    # row for nothing.
    explainers = []
    topics = ((EXPLAIN_CONSUMER, "action"), (PIPELINE_CONSUMER, "pipeline"))
    for name, topic in topics if handler.policy.explains else ():

        async def on_event(event: RecordedEvent, name: str = name) -> None:
            await handler.explainer.handle(event, name)

        explainer = Consumer(
            infra.bus,
            infra.store,
            name=name,
            topic=topic,
            handler=on_event,
            settings=consumer_settings(infra.config),
        )
        await explainer.setup()
        infra.consumers.append(explainer)
        explainers.append(explainer.run)

    async def scheduler(stop: asyncio.Event) -> None:
        await handler.run_scheduler(stop, interval=infra.config.act_scheduler_interval)

    # The retry-storm breaker: one follower per replica (with the breaker off, it ends and
    # releases what a former policy parked, if anything, and then has nothing to do).
    return [consumer.run, scheduler, handler.storms.run, *explainers]
