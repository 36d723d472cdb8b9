"""Losing a claim the way production loses one: PostgreSQL's claims are session advisory locks,
gone with their connection (a restart, a failover, a killed backend), their holders none the
wiser until they ask (``Claim.held``). ``lose_claim`` ends the backend holding the claim on
``key`` (this schema's lock only: parallel tests and other sessions keep theirs); on the
in-memory twin it drops its claims, as a restart would."""

from __future__ import annotations

from ciretry.common.eventlog import EventLog
from ciretry.common.eventstore import EventStore, claim_lock
from ciretry.common.memory import MemoryEventLog

_HOLDER = """
SELECT pg_terminate_backend(pid, 5000) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid = $1::oid AND objid = $2::oid
"""


async def lose_claim(log: EventLog, key: str) -> None:
    if isinstance(log, MemoryEventLog):
        log.lose_claims()
        return
    assert isinstance(log, EventStore)
    lock = claim_lock(log.schema, key) & 0xFFFFFFFFFFFFFFFF
    async with log.connection() as conn:
        ended = await conn.fetch(_HOLDER, lock >> 32, lock & 0xFFFFFFFF)
    assert [r[0] for r in ended] == [True], f"no backend held the claim on {key!r}"
