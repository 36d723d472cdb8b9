"""Fixtures of the audit tests: a seeded, projected store and an HTTP client on the audit app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit.api import add_routes
from ciretry.audit.projector import Projector
from ciretry.common.eventstore import EventStore

from .helpers import Seeded, seed

TOKEN = "s3cret-audit-token"


@pytest.fixture
async def seeded(store: EventStore) -> Seeded:
    s = await seed(store)
    await Projector(store).catch_up()
    return s


@pytest.fixture
async def client(store: EventStore) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    add_routes(app, store, token=TOKEN)
    async with TestClient(TestServer(app)) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}
