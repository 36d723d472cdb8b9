"""Reading what a deployment of ``ciretry serve`` processes did, with the test's own code: the
events it publishes (awaited on a core NATS subscription) and the raw rows of its log."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import nats


class Published:
    """Events published on some topics (core NATS subscription), kept as dicts of the event's
    data plus its ``type``, for a test to await conditions on."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.seen: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Condition()

    @classmethod
    async def subscribe(
        cls, nats_url: str, prefix: str, topics: tuple[str, ...] = ("action",)
    ) -> Published:
        published = cls(await nats.connect(nats_url))
        for topic in topics:
            await published.nc.subscribe(f"{prefix}.{topic}.>", cb=published._on_msg)
        return published

    async def _on_msg(self, msg: nats.aio.msg.Msg) -> None:
        wire = json.loads(msg.data)
        self.seen[wire["event_id"]] = {"type": wire["type"], **wire["data"]}
        async with self.changed:
            self.changed.notify_all()

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self.seen.values())

    async def until(self, done: Callable[[list[dict[str, Any]]], bool], within: float) -> None:
        """Until ``done`` holds of the events so far; fails after ``within`` seconds with a
        summary of what was seen."""

        async def wait() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: done(self.events))

        try:
            await asyncio.wait_for(wait(), within)
        except TimeoutError:
            summary = Counter(
                (d["type"], d.get("reason") or d.get("action") or "") for d in self.events
            )
            raise AssertionError(f"decisions so far: {dict(summary)}") from None

    async def close(self) -> None:
        await self.nc.close()


async def decisions_until(
    nats_url: str,
    prefix: str,
    done: Callable[[list[dict[str, Any]]], bool],
    within: float,
    *,
    topics: tuple[str, ...] = ("action",),
) -> None:
    """Await events published on ``topics`` until ``done`` holds of them."""
    published = await Published.subscribe(nats_url, prefix, topics)
    try:
        await published.until(done, within)
    finally:
        await published.close()


async def read_log(pg_dsn: str, schema: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(stream, type, body) of every event, in log order: the test's own reading of the log."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(
            f'SELECT stream, type, body FROM "{schema}".events ORDER BY position'
        )
    finally:
        await conn.close()
    return [(r["stream"], r["type"], json.loads(bytes(r["body"]))) for r in rows]


async def delete_stream(nats_url: str, env: dict[str, str]) -> None:
    """Remove the JetStream stream of a deployment's environment (``service_env``)."""
    from ciretry.common.bus import Bus

    bus = await Bus.connect(nats_url, prefix=env["CIRETRY_NATS_PREFIX"],
                            stream=env["CIRETRY_NATS_STREAM"])  # fmt: skip
    try:
        await bus.delete_stream()
    finally:
        await bus.close()
