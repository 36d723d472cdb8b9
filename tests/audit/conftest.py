"""Fixtures of the audit tests: a seeded, projected store and an HTTP client on the audit app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit import mount
from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.common.config import Config
from ciretry.common.eventstore import EventStore

from .helpers import Seeded, seed

TOKEN = "s3cret-audit-token"


@pytest.fixture
async def seeded(store: EventStore) -> Seeded:
    s = await seed(store)
    await Projector(AuditStore(store)).catch_up()
    return s


@pytest.fixture
async def client(store: EventStore) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    mount(app, store, Config(api_token=TOKEN))
    async with TestClient(TestServer(app)) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}
