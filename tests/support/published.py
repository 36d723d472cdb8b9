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


async def decisions_until(
    nats_url: str,
    prefix: str,
    done: Callable[[list[dict[str, Any]]], bool],
    within: float,
    *,
    topics: tuple[str, ...] = ("action",),
) -> None:
    """Await events published on ``topics`` (core NATS subscription) until ``done`` holds of
    them (each a dict of the event's data plus its ``type``)."""
    seen: dict[str, dict[str, Any]] = {}
    changed = asyncio.Condition()
    nc = await nats.connect(nats_url)

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        wire = json.loads(msg.data)
        seen[wire["event_id"]] = {"type": wire["type"], **wire["data"]}
        async with changed:
            changed.notify_all()

    for topic in topics:
        await nc.subscribe(f"{prefix}.{topic}.>", cb=on_msg)
    try:

        async def wait() -> None:
            async with changed:
                await changed.wait_for(lambda: done(list(seen.values())))

        try:
            await asyncio.wait_for(wait(), within)
        except TimeoutError:
            summary = Counter(
                (d["type"], d.get("reason") or d.get("action") or "") for d in seen.values()
            )
            raise AssertionError(f"decisions so far: {dict(summary)}") from None
    finally:
        await nc.close()


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
