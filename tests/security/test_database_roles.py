"""Security review (issue 18): the services' database role, on real PostgreSQL.

``ciretry migrate`` runs as the owner, applies migration 0007 and creates the runtime role
(CIRETRY_DATABASE_RUNTIME_ROLE, LOGIN with CIRETRY_DATABASE_RUNTIME_PASSWORD). Connected as that
role, ``UPDATE``, ``DELETE``, ``TRUNCATE`` and ``ALTER TABLE … DISABLE TRIGGER`` on ``events``
are refused by *privileges* (the message says "permission denied" or "must be owner", not the
append-only trigger's "events is append-only"), as are DDL in the schema. What the services do
works as that role: the whole EventLog contract suite runs as it too
(tests/common/test_eventlog_contract.py, the ``runtime_role`` case), and so does a service's
start-up check that no migration is pending.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from ciretry.common.events import JobFinished, Metadata, NewEvent
from ciretry.common.eventstore import EventStore, MigrationsPending, grant_runtime

from ..support.commands import CIRETRY, clean_env, run

PASSWORD = "runtime-password-0123456789"


@pytest.fixture
async def role(pg_dsn: str, unique: str) -> AsyncIterator[str]:
    """A role name of this test's own, dropped after it (roles are cluster-wide)."""
    name = f"ciretry_rt_{unique}"
    yield name
    conn = await asyncpg.connect(pg_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
        if exists:
            await conn.execute(f"DROP OWNED BY {name}")
            await conn.execute(f"DROP ROLE {name}")
    finally:
        await conn.close()


def _migrate(pg_dsn: str, schema: str, role: str) -> str:
    res = run(
        [*CIRETRY, "migrate"],
        clean_env(
            CIRETRY_DATABASE_URL=pg_dsn,
            CIRETRY_DATABASE_SCHEMA=schema,
            CIRETRY_DATABASE_RUNTIME_ROLE=role,
            CIRETRY_DATABASE_RUNTIME_PASSWORD=PASSWORD,
        ),
    )
    assert res.returncode == 0, res.stderr
    assert PASSWORD not in res.stdout + res.stderr
    return res.stdout


def _as(dsn: str, role: str) -> str:
    scheme, _, rest = dsn.partition("://")
    host = rest.split("@", 1)[1] if "@" in rest else rest
    return f"{scheme}://{role}:{PASSWORD}@{host}"


@pytest.mark.timeout(120)
async def test_the_runtime_role_appends_and_reads_but_cannot_change_the_log(
    pg_dsn: str, schema: str, role: str
) -> None:
    out = _migrate(pg_dsn, schema, role)
    assert "0007_runtime_role.sql" in out and f"runtime role {role} (created, can log in)" in out
    # Again: nothing pending, the role exists, the grants are applied again.
    assert f"runtime role {role} (exists" in _migrate(pg_dsn, schema, role)

    runtime = await EventStore.connect(_as(pg_dsn, role), schema, max_size=2)
    try:
        assert await runtime.migrate() == []  # a service's start-up check passes
        job = JobFinished(source="gitlab", project="1", pipeline_id="2", job_id="3",
                          job_name="build", status="failed")  # fmt: skip
        (result,) = await runtime.append_batch([NewEvent(stream="s-1", data=job, metadata=Metadata())])
        assert (await runtime.read_stream("s-1"))[0].event_id == result.event.event_id
        async with runtime.connection() as conn:
            assert await conn.fetchval("SELECT current_user") == role
            refused = {
                "UPDATE events SET type = 'X'": "permission denied for table events",
                "DELETE FROM events": "permission denied for table events",
                "TRUNCATE events": "permission denied for table events",
                "ALTER TABLE events DISABLE TRIGGER events_no_update_delete": "must be owner",
                "ALTER TABLE events DISABLE TRIGGER ALL": "must be owner",
                "DROP TRIGGER events_no_update_delete ON events": "must be owner",
                "DROP TABLE events": "must be owner",
                "CREATE TABLE shadow (x int)": "permission denied for schema",
                "INSERT INTO schema_migrations (name) VALUES ('9999_x.sql')": "permission denied",
            }
            for statement, message in refused.items():
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
                    await conn.execute(statement)
                assert message in str(caught.value), (statement, caught.value)
                assert "append-only" not in str(caught.value), statement
        assert len(await runtime.read_stream("s-1")) == 1
    finally:
        await runtime.close()


@pytest.mark.timeout(120)
async def test_a_runtime_role_with_migrations_pending_is_told_to_migrate_first(
    pg_dsn: str, nats_url: str, schema: str, role: str
) -> None:
    _migrate(pg_dsn, schema, role)
    owner = await asyncpg.connect(pg_dsn)
    try:  # as if a newer release brought a migration this database has not had yet
        await owner.execute(
            f"DELETE FROM \"{schema}\".schema_migrations WHERE name = '0007_runtime_role.sql'"
        )
    finally:
        await owner.close()
    runtime = await EventStore.connect(_as(pg_dsn, role), schema, max_size=1)
    try:
        with pytest.raises(MigrationsPending, match="run `ciretry migrate`"):
            await runtime.migrate()
    finally:
        await runtime.close()
    # A service started so stops at once, saying what to run (exit 1, no stack trace).
    res = run(
        [*CIRETRY, "serve", "act"],
        clean_env(
            CIRETRY_DATABASE_URL=_as(pg_dsn, role),
            CIRETRY_DATABASE_SCHEMA=schema,
            CIRETRY_NATS_URL=nats_url,
            CIRETRY_NATS_PREFIX=f"p{schema}",
            CIRETRY_NATS_STREAM=f"S{schema}".upper(),
            CIRETRY_CONNECT_ATTEMPTS="3",
        ),
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "run `ciretry migrate`" in res.stderr and "Traceback" not in res.stderr
    assert PASSWORD not in res.stderr + res.stdout


async def test_the_owner_or_a_superuser_is_no_runtime_role(store: EventStore) -> None:
    async with store.connection() as conn:
        for name in ("postgres",):  # the owner running the migration, a superuser
            with pytest.raises(asyncpg.InvalidParameterValueError):
                await grant_runtime(conn, store.schema, name)
