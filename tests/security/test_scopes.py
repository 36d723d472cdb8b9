"""Security review (issue 18): separate credentials, on the real routes of one ingest process
(webhooks, pulse, the audit API and the dashboard) over real PostgreSQL.

* a read token reads, and cannot push a pod status or a pulse message (a viewer cannot forge an
  OOM kill) nor give feedback;
* a push token pushes and reads nothing;
* a feedback token reads and gives feedback; an admin token reads and gives feedback;
* two tokens of one scope work side by side (rotation without downtime);
* nothing a request presents, right or wrong, nor the configuration at start, reaches a log
  line (the provider tokens have the same test in tests/common/test_http.py).
"""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit import mount
from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.common.config import Config, redacted, startup_warnings
from ciretry.common.eventstore import EventStore
from ciretry.ingest.app import install

from ..audit.helpers import seed
from ..ingest.helpers import pod

READERS = ("reader-token-old-0123456789", "reader-token-new-0123456789")
GIVER = "feedback-token-0123456789"
PUSHERS = ("push-token-old-0123456789", "push-token-new-0123456789")
ADMIN = "admin-token-0123456789abc"
SESSION = "session-secret-0123456789abcdef"
EVERY_SECRET = (*READERS, GIVER, *PUSHERS, ADMIN, SESSION)
CONFIG = Config(
    read_tokens=READERS,
    feedback_tokens=(GIVER,),
    push_tokens=PUSHERS,
    admin_tokens=(ADMIN,),
    session_secrets=(SESSION,),
)


def _bearer(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@pytest.mark.timeout(120)
async def test_each_credential_does_its_own_job_and_nothing_reaches_the_log(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    seeded = await seed(store)
    await Projector(AuditStore(store)).catch_up()
    verdict = seeded.ids["build_verdict"].event_id
    app = web.Application()
    install(app, CONFIG, store)
    mount(app, store, CONFIG)
    pulse_body = {"exchange": "exchange/taskcluster-queue/v1/task-failed", "payload": {}}
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("ciretry.test").info("config %s", redacted(CONFIG))
        for warning in startup_warnings(CONFIG, "ingest", environ={}):
            logging.getLogger("ciretry.test").warning(warning)
        async with TestClient(TestServer(app)) as c:

            async def push(token: str | None) -> tuple[int, int]:
                k8s = await c.post("/webhooks/kubernetes", json=pod(), headers=_bearer(token))
                tc = await c.post("/pulse", json=pulse_body, headers=_bearer(token))
                return k8s.status, tc.status

            async def read(token: str | None) -> int:
                r = await c.get("/api/v1/events?limit=1", headers=_bearer(token))
                return r.status

            async def feedback(token: str | None) -> int:
                r = await c.post(
                    f"/api/v1/verdicts/{verdict}/feedback",
                    json={"verdict": "confirmed", "who": "carol"},
                    headers=_bearer(token),
                )
                return r.status

            # Who may not.
            for token in (*READERS, GIVER, ADMIN, None, "", PUSHERS[0] + "x"):
                assert await push(token) == (401, 401), token
            for token in (*PUSHERS, None, READERS[0][:-1]):
                assert await read(token) == 401, token
            for token in (*READERS, *PUSHERS, None):
                assert await feedback(token) == 401, token
            # Who may (both tokens of a rotating scope).
            for token in PUSHERS:
                k8s, tc = await push(token)
                assert k8s in (200, 202) and tc not in (401, 403, 500), (token, k8s, tc)
            for token in (*READERS, GIVER, ADMIN):
                assert await read(token) == 200, token
            for token in (GIVER, ADMIN):
                assert await feedback(token) == 201, token
            # The dashboard's sign-in takes read, feedback and admin tokens, not push ones.
            for token, status in ((READERS[1], 303), (GIVER, 303), (PUSHERS[0], 401)):
                r = await c.post("/login", data={"token": token}, allow_redirects=False)
                assert r.status == status, token
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    for secret in EVERY_SECRET:
        assert secret not in logged, secret
