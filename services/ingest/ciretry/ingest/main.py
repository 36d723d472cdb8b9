"""Wiring of the ingest service: routes and workers on top of the shared runtime."""

from __future__ import annotations

from aiohttp import web

from ciretry.common.service import Infra, Worker


async def setup(infra: Infra, app: web.Application) -> list[Worker]:
    return []
