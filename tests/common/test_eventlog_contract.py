"""The ``EventLog`` contract: what every adapter of the port promises, checked on each of them.

Every test runs three times: on the PostgreSQL store, on the in-memory twin (as pyeventsourcing's
recorder test cases run on every recorder: the twin is only worth its speed if it keeps the
same promises), and on the PostgreSQL store connected as the runtime role ``ciretry migrate``
creates (migration 0007: the services' privileges are enough for everything the port does). What only PostgreSQL can show (the database refusing to change the log, roles,
the pool's resets) is in test_eventstore.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest

from ciretry.common.eventlog import (
    AlreadyProcessed,
    AppendResult,
    EventLog,
    TrackedAppend,
    Tracking,
    WrongExpectedVersion,
)
from ciretry.common.events import (
    BudgetSnapshot,
    FailureSignature,
    JobFinished,
    Metadata,
    NewEvent,
    PipelineFinished,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    VerdictReached,
)
from tests.support.claims import lose_claim

STREAM = "pipeline-gitlab-42-7"


@pytest.fixture(params=["postgres", "memory", "runtime_role"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    """The conftest's two adapters, and PostgreSQL as the runtime role (issue 18)."""
    from ciretry.common.eventstore import EventStore
    from ciretry.common.memory import MemoryEventLog

    if request.param == "memory":
        yield MemoryEventLog()
        return
    pg_dsn: str = request.getfixturevalue("pg_dsn")
    name = f"c_{uuid.uuid4().hex[:12]}"
    role = f"ciretry_rt_{name}"
    owner = await EventStore.connect(pg_dsn, name, max_size=8)
    store = owner
    try:
        await owner.migrate()
        if request.param == "runtime_role":
            await owner.grant_runtime(role, "contract-password")
            scheme, _, rest = pg_dsn.partition("://")
            host = rest.split("@", 1)[1] if "@" in rest else rest
            store = await EventStore.connect(
                f"{scheme}://{role}:contract-password@{host}", name, max_size=8
            )
        yield store
    finally:
        if store is not owner:
            await store.close()
        await owner.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            if request.param == "runtime_role":
                await conn.execute(f"DROP OWNED BY {role}")
                await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()


def job(job_id: str = "1", status: str = "failed") -> JobFinished:
    return JobFinished(
        source="gitlab",
        project="42",
        pipeline_id="7",
        job_id=job_id,
        job_name="build",
        status=status,
    )


def new(job_id: str = "1", key: str | None = None, stream: str = STREAM) -> NewEvent:
    return NewEvent(stream=stream, data=job(job_id), metadata=Metadata(idempotency_key=key))


async def test_append_and_read_stream_in_order(log: EventLog) -> None:
    recorded = await log.append(STREAM, [job("1"), job("2")], expected_version=0)
    assert [r.stream_version for r in recorded] == [1, 2]
    assert recorded[0].position < recorded[1].position
    more = await log.append(STREAM, [job("3")], expected_version=2)
    assert more[0].stream_version == 3
    read = await log.read_stream(STREAM)
    assert [r.data for r in read] == [job("1"), job("2"), job("3")]
    assert read[0].event_id == recorded[0].event_id
    assert await log.stream_version(STREAM) == 3


async def test_wrong_expected_version_is_typed(log: EventLog) -> None:
    await log.append(STREAM, [job("1")], expected_version=0)
    with pytest.raises(WrongExpectedVersion) as info:
        await log.append(STREAM, [job("2")], expected_version=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert await log.stream_version(STREAM) == 1


async def test_concurrent_appends_at_same_expected_version_exactly_one_wins(
    log: EventLog,
) -> None:
    await log.append(STREAM, [job("0")], expected_version=0)

    async def attempt(i: int) -> str:
        try:
            await log.append(STREAM, [job(f"racer-{i}")], expected_version=1)
            return "won"
        except WrongExpectedVersion:
            return "lost"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert outcomes.count("won") == 1
    assert outcomes.count("lost") == 7
    assert await log.stream_version(STREAM) == 2


async def test_duplicate_idempotency_key_stores_one_event(log: EventLog) -> None:
    (first,) = await log.append_batch([new("1", key="gitlab:uuid-1")])
    (second,) = await log.append_batch([new("1", key="gitlab:uuid-1")])
    assert not first.duplicate and second.duplicate
    assert second.event.event_id == first.event.event_id
    assert len(await log.read_stream(STREAM)) == 1


async def test_batch_dedupes_within_itself_and_against_the_log(log: EventLog) -> None:
    await log.append_batch([new("1", key="k1")])
    results = await log.append_batch(
        [new("1", key="k1"), new("2", key="k2"), new("2", key="k2"), new("3", stream="other")]
    )
    assert [r.duplicate for r in results] == [True, False, True, False]
    assert results[1].event.event_id == results[2].event.event_id
    assert [e.stream_version for e in await log.read_stream(STREAM)] == [1, 2]
    assert len(await log.read_stream("other")) == 1


async def test_read_all_is_in_global_order_across_batches(log: EventLog) -> None:
    events = [new(str(i), stream=f"s-{i % 7}") for i in range(250)]
    await log.append_batch(events)
    seen = [e async for e in log.read_all(0, batch=40)]
    assert [e.event_id for e in seen] == [e.event_id for e in events]
    positions = [e.position for e in seen]
    assert positions == sorted(positions)
    tail = [e async for e in log.read_all(seen[199].position, batch=40)]
    assert len(tail) == 50
    only_pipelines = [e async for e in log.read_all(0, types=["PipelineFinished"])]
    assert only_pipelines == []


async def test_every_append_writes_an_outbox_row(log: EventLog) -> None:
    await log.append_batch([new(str(i)) for i in range(5)])
    assert await log.outbox_depth() == 5


async def test_tracking_makes_a_second_processing_a_noop(log: EventLog) -> None:
    cause = uuid.uuid4()
    tracking = Tracking("classify", cause)
    await log.append("job-x", [job("1")], tracking=tracking)
    with pytest.raises(AlreadyProcessed):
        await log.append("job-x", [job("1")], tracking=tracking)
    assert len(await log.read_stream("job-x")) == 1
    assert await log.is_processed("classify", cause)
    # Another consumer processing the same event is independent.
    await log.append("job-y", [job("1")], tracking=Tracking("act", cause))


async def test_failed_append_leaves_no_tracking_row(log: EventLog) -> None:
    await log.append(STREAM, [job("1")])
    cause = uuid.uuid4()
    with pytest.raises(WrongExpectedVersion):
        await log.append(STREAM, [job("2")], expected_version=0, tracking=Tracking("act", cause))
    assert not await log.is_processed("act", cause)


async def test_different_event_types_in_one_stream(log: EventLog) -> None:
    p = PipelineFinished(source="gitlab", project="42", pipeline_id="7", status="failed")
    await log.append(STREAM, [job("1"), p])
    assert [e.type for e in await log.read_stream(STREAM)] == ["JobFinished", "PipelineFinished"]


async def test_a_key_repeated_in_a_batch_after_a_stored_one_resolves_to_the_stored_event(
    log: EventLog,
) -> None:
    (first,) = await log.append_batch([new("1", key="k")])
    results = await log.append_batch([new("2", key="k"), new("3"), new("4", key="k")])
    assert [r.duplicate for r in results] == [True, False, True]
    assert results[0].event == first.event and results[2].event == first.event
    assert results[1].event.stream_version == 2


async def test_expected_versions_of_several_streams_are_checked_together(
    log: EventLog,
) -> None:
    await log.append("a", [job("1")])
    await log.append("b", [job("2"), job("3")])
    events = [NewEvent(stream="a", data=job("4")), NewEvent(stream="b", data=job("5"))]
    with pytest.raises(WrongExpectedVersion) as info:
        await log.append_batch(events, expected={"a": 1, "b": 1})
    assert (info.value.stream, info.value.expected, info.value.actual) == ("b", 1, 2)
    results = await log.append_batch(events, expected={"a": 1, "b": 2})
    assert [r.event.stream_version for r in results] == [2, 3]


async def test_outbox_delete(log: EventLog) -> None:
    results = await log.append_batch([new("1"), new("2")])
    await log.outbox_delete([results[0].event.position])
    assert await log.outbox_depth() == 1


async def test_large_batches_keep_the_same_guarantees(log: EventLog) -> None:
    """Above LARGE_BATCH events the append takes its multi-statement path: same semantics."""
    from ciretry.common.eventstore import LARGE_BATCH

    await log.append_batch([new("0", key="dup-0")])
    batch = [new(str(i), key=f"dup-{i % (LARGE_BATCH // 2)}") for i in range(LARGE_BATCH + 50)]
    results = await log.append_batch(batch)
    assert len(results) == len(batch)
    assert sum(not r.duplicate for r in results) == LARGE_BATCH // 2 - 1
    versions = [e.stream_version for e in await log.read_stream(STREAM)]
    assert versions == list(range(1, LARGE_BATCH // 2 + 1))
    with pytest.raises(WrongExpectedVersion):
        await log.append_batch(
            [new(f"x{i}") for i in range(LARGE_BATCH + 1)], expected={STREAM: 0}
        )
    cause = uuid.uuid4()
    await log.append_batch(
        [new(f"y{i}", stream="other") for i in range(LARGE_BATCH + 1)],
        tracking=Tracking("act", cause),
    )
    with pytest.raises(AlreadyProcessed):
        await log.append_batch(
            [new(f"z{i}", stream="other") for i in range(LARGE_BATCH + 1)],
            tracking=Tracking("act", cause),
        )
    assert len(await log.read_stream("other")) == LARGE_BATCH + 1
    assert await log.outbox_depth() == LARGE_BATCH // 2 + LARGE_BATCH + 1



def stored(result: list[AppendResult] | AlreadyProcessed) -> list[AppendResult]:
    assert not isinstance(result, AlreadyProcessed), result
    return result


async def test_a_group_commit_stores_each_unit_with_its_tracking_row(log: EventLog) -> None:
    """Several consumed events' outputs at once: a unit whose tracking row exists already (a
    redelivery) learns so and stores nothing; the others commit, tracking rows included."""
    causes = [uuid.uuid4() for _ in range(4)]
    await log.record_tracking(Tracking("classify", causes[1]))
    results = await log.append_tracked(
        [
            TrackedAppend([new("1", key="v:0", stream="job-0")], Tracking("classify", causes[0])),
            TrackedAppend([new("1", key="v:1", stream="job-1")], Tracking("classify", causes[1])),
            TrackedAppend(
                [new("1", key="v:2", stream="job-2"), new("2", stream="job-2")],
                Tracking("classify", causes[2]),
            ),
            TrackedAppend([], Tracking("classify", causes[3])),  # a bare tracking row
        ]
    )
    first, again, pair, bare = results
    assert isinstance(again, AlreadyProcessed) and again.event_id == causes[1]
    assert [r.duplicate for r in stored(first)] == [False]
    assert [r.event.stream_version for r in stored(pair)] == [1, 2]
    assert stored(bare) == []
    assert stored(first)[0].body is not None  # for the outbox fast path, as append_batch's
    assert await log.read_stream("job-1") == []
    assert len(await log.read_stream("job-2")) == 2
    assert await log.get_by_key("v:1") is None
    for cause in causes:
        assert await log.is_processed("classify", cause)
    assert await log.outbox_depth() == 3
    # Redelivered after the commit: nothing stored twice, each unit told so.
    redelivered = await log.append_tracked(
        [TrackedAppend([new("1", key="v:0", stream="job-0")], Tracking("classify", causes[0]))]
    )
    assert [type(r) for r in redelivered] == [AlreadyProcessed]
    assert len(await log.read_stream("job-0")) == 1


async def test_units_repeating_a_tracking_row_or_key_meet_the_earlier_units_outcome(
    log: EventLog,
) -> None:
    """Within one call, a unit repeating an earlier unit's tracking row is a redelivery of it;
    a key already stored by an earlier unit is a duplicate of that event; a key of an earlier
    unit that turned out processed (nothing of it stored) is stored by the later unit."""
    done, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await log.record_tracking(Tracking("classify", done))
    results = await log.append_tracked(
        [
            TrackedAppend([new("1", key="k-skipped", stream="s")], Tracking("classify", done)),
            TrackedAppend([new("2", key="k-skipped", stream="s")], Tracking("classify", a)),
            TrackedAppend([new("3", key="k-a", stream="s")], Tracking("act", a)),
            TrackedAppend([new("4", key="k-a", stream="s")], Tracking("act", a)),
            TrackedAppend([new("5", key="k-plain", stream="s")]),
            TrackedAppend([new("6", key="k-plain", stream="s")], Tracking("classify", b)),
        ]
    )
    skipped, took_over, first_a, repeat_a, plain, after_plain = results
    assert isinstance(skipped, AlreadyProcessed)
    (took,) = stored(took_over)
    assert not took.duplicate and took.event.data == job("2")
    assert not stored(first_a)[0].duplicate
    assert isinstance(repeat_a, AlreadyProcessed)
    (p,) = stored(plain)
    (dup,) = stored(after_plain)
    assert dup.duplicate and dup.event.event_id == p.event.event_id
    assert [e.data for e in await log.read_stream("s")] == [job("2"), job("3"), job("5")]
    assert await log.is_processed("classify", a) and await log.is_processed("classify", b)


async def test_a_group_commit_without_tracking_rows_is_one_batch(log: EventLog) -> None:
    """Ingest's group commit: units without tracking rows append as one ``append_batch`` of
    all their events, keys repeated across units resolved to their first occurrence."""
    results = await log.append_tracked(
        [TrackedAppend([new("1", key="w-1")]), TrackedAppend([new("2"), new("1", key="w-1")])]
    )
    first, second = (stored(r) for r in results)
    assert [r.duplicate for r in first + second] == [False, False, True]
    assert second[1].event.event_id == first[0].event.event_id
    assert [e.stream_version for e in await log.read_stream(STREAM)] == [1, 2]


async def test_a_large_group_commit_keeps_the_same_guarantees(log: EventLog) -> None:
    """Above LARGE_BATCH events a round takes the multi-statement path: same semantics."""
    from ciretry.common.eventstore import LARGE_BATCH

    done = uuid.uuid4()
    await log.record_tracking(Tracking("classify", done))
    per_unit = 10
    causes = [uuid.uuid4() for _ in range(LARGE_BATCH // per_unit + 2)]
    units = [
        TrackedAppend(
            [new(f"{u}-{i}", key=f"big-{u}-{i}", stream=f"job-{u}") for i in range(per_unit)],
            Tracking("classify", cause),
        )
        for u, cause in enumerate(causes)
    ]
    units.insert(3, TrackedAppend([new("x", stream="job-x")], Tracking("classify", done)))
    results = await log.append_tracked(units)
    assert isinstance(results[3], AlreadyProcessed)
    fresh = [r for i, result in enumerate(results) if i != 3 for r in stored(result)]
    assert len(fresh) == per_unit * len(causes) and not any(r.duplicate for r in fresh)
    assert await log.read_stream("job-x") == []
    assert [e.stream_version for e in await log.read_stream("job-5")] == list(range(1, 11))
    assert all([await log.is_processed("classify", c) for c in causes])
    assert await log.outbox_depth() == per_unit * len(causes)


async def test_reads_by_id_key_position_and_version(log: EventLog) -> None:
    results = await log.append_batch([new("1", key="k1"), new("2"), new("3", stream="other")])
    first, second, other = (r.event for r in results)
    assert await log.get(second.event_id) == second
    assert await log.get(uuid.uuid4()) is None
    assert await log.get_by_key("k1") == first and await log.get_by_key("nope") is None
    assert await log.read_event(STREAM, 2) == second
    assert await log.read_event(STREAM, 3) is None
    assert await log.read_positions([other.position, first.position, 10_000]) == [first, other]
    assert await log.last_position() == other.position
    both = await log.read_streams([STREAM, "other", "none"])
    assert both == {STREAM: [first, second], "other": [other], "none": []}


async def test_read_streams_after_gives_what_was_appended_since(log: EventLog) -> None:
    await log.append_batch([new("1"), new("2"), new("3", stream="other")])
    later = await log.append_batch([new("4"), new("5", stream="other")])
    after = await log.read_streams_after({STREAM: 2, "other": 1, "empty": 0})
    assert after == [later[1].event, later[0].event]  # by stream ("other" first), then version
    assert await log.read_streams_after({}) == []
    # Together with events by id, in one round trip: the same two answers.
    first = (await log.read_stream(STREAM))[0]
    assert await log.read_streams_after_and_get(
        {STREAM: 2, "other": 1}, [first.event_id, uuid.uuid4()]
    ) == (after, [first])
    assert await log.read_streams_after_and_get({}, []) == ([], [])


async def test_an_outbox_claim_is_exclusive_and_deletes_only_on_success(log: EventLog) -> None:
    await log.append_batch([new(str(i)) for i in range(5)])
    async with log.outbox_claim(0.0, 3) as first:
        async with log.outbox_claim(0.0, 10) as second:
            # Rows held by the first claim are not handed out again.
            assert len(first) == 3 and len(second) == 2
            assert {e.position for e in first}.isdisjoint(e.position for e in second)
    assert await log.outbox_depth() == 0
    await log.append_batch([new("x")])
    with pytest.raises(RuntimeError):
        async with log.outbox_claim(0.0, 10) as claimed:
            assert len(claimed) == 1
            raise RuntimeError("publishing failed")
    assert await log.outbox_depth() == 1  # kept for the next sweep
    async with log.outbox_claim(3600.0, 10) as young:
        assert young == []  # younger than the grace: the fast path may still publish it


async def test_a_followers_lease_mark_and_scan(log: EventLog) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    assert await log.follower_claim("classify", me, 60)
    assert await log.follower_claim("classify", me, 60)  # renewed by its owner
    assert not await log.follower_claim("classify", other, 60)
    await log.follower_release("classify", me)
    assert await log.follower_claim("classify", other, 60)
    assert await log.follower_claim("act", me, 60)  # leases are per follower

    results = await log.append_batch(
        [new("1"), NewEvent(stream="p", data=PipelineFinished(
            source="gitlab", project="42", pipeline_id="7", status="failed")), new("2")]
    )  # fmt: skip
    jobs = [results[0].event, results[2].event]
    await log.record_tracking(Tracking("classify", jobs[0].event_id))
    scanned = await log.follower_scan("classify", ["JobFinished"], 0, 10)
    assert [(s.position, s.event_id, s.tracked) for s in scanned] == [
        (jobs[0].position, jobs[0].event_id, True),
        (jobs[1].position, jobs[1].event_id, False),
    ]
    assert scanned[0].recorded_at == jobs[0].recorded_at
    assert [s.position for s in await log.follower_scan("classify", ["JobFinished"], 0, 1)] == [
        jobs[0].position
    ]
    assert await log.follower_scan("classify", ["JobFinished"], jobs[1].position, 10) == []
    tracked = await log.follower_tracked("classify", [e.event_id for e in jobs])
    assert tracked == {jobs[0].event_id}
    assert await log.follower_oldest("classify", ["JobFinished"]) == jobs[1].recorded_at
    assert await log.follower_mark("classify") == 0
    await log.follower_save_mark("classify", jobs[1].position)
    await log.follower_save_mark("classify", 1)  # a mark never goes down
    assert await log.follower_mark("classify") == jobs[1].position
    assert await log.follower_oldest("classify", ["JobFinished"]) is None  # all below the mark


def request(key: str, **kw: object) -> RetryRequested:
    fields: dict[str, object] = {
        "source": "gitlab", "project": "42", "pipeline_id": "7", "job_id": "1",
        "job_name": "build", "action": "retry_job", "idempotency_key": key,
        "category": "preempted", "budget": "system", "snapshot": BudgetSnapshot(),
    }  # fmt: skip
    fields.update(kw)
    return RetryRequested(**fields)  # type: ignore[arg-type]


def keyed(data: object, key: str) -> NewEvent:
    return NewEvent(stream=STREAM, data=data, metadata=Metadata(idempotency_key=key))  # type: ignore[arg-type]


async def test_open_requests_follow_their_outcomes(log: EventLog) -> None:
    a, b = request("act:a"), request("act:b")
    await log.append_batch([keyed(a, "act:a"), keyed(b, "act:b")])
    pending = await log.pending_requests(0, 10)
    assert [(p.request, p.failures, p.last_failure) for p in pending] == [
        (a, 0, None), (b, 0, None)
    ]  # fmt: skip
    failed = RetryFailed(source="gitlab", project="42", pipeline_id="7", job_id="1",
                         idempotency_key="act:a", status=503, detail="down", will_retry=True)
    (f,) = await log.append_batch([keyed(failed, "act:a:failed:1")])
    (p_a, p_b) = await log.pending_requests(0, 10)
    assert (p_a.failures, p_a.last_failure) == (1, f.event.recorded_at)
    assert await log.pending_requests(p_a.position, 10) == [p_b]
    assert await log.pending_requests(0, 1) == [p_a]
    issued = RetryIssued(source="gitlab", project="42", pipeline_id="7", job_id="1",
                         idempotency_key="act:a")
    await log.append_batch([keyed(issued, "act:a:outcome")])
    assert [p.request for p in await log.pending_requests(0, 10)] == [b]


async def test_a_claim_is_exclusive_until_released(log: EventLog) -> None:
    async with log.exclusive("act:a") as got:
        assert got
        async with log.exclusive("act:a") as again, log.exclusive("act:b") as other:
            assert not again and other
    async with log.exclusive("act:a") as after:
        assert after


async def test_a_claim_is_not_taken_once_the_work_is_done(log: EventLog) -> None:
    async with log.exclusive("act:a", unless="act:a:outcome") as got:
        assert got  # no outcome yet
    issued = RetryIssued(source="gitlab", project="42", pipeline_id="7", job_id="1",
                         idempotency_key="act:a")
    await log.append_batch([keyed(issued, "act:a:outcome")])
    async with log.exclusive("act:a", unless="act:a:outcome") as got:
        assert not got
    # Not taken means nothing to release: the key is free for a claim without the condition.
    async with log.exclusive("act:a") as free:
        assert free


async def test_a_claim_whose_work_is_recorded_meanwhile_is_no_longer_held(log: EventLog) -> None:
    """The claiming statement's snapshot can miss an outcome recorded just as the previous
    holder released the key; ``held``, asked just before the work, must not."""
    async with log.exclusive("act:a", unless="act:a:outcome") as got:
        assert got and await got.held()
        issued = RetryIssued(source="gitlab", project="42", pipeline_id="7", job_id="1",
                             idempotency_key="act:a")
        await log.append_batch([keyed(issued, "act:a:outcome")])
        assert got and not await got.held()
    async with log.exclusive("act:b") as plain:  # without ``unless``: held while held
        await log.append_batch([keyed(issued, "act:b:outcome")])
        assert await plain.held()


async def test_a_done_claim_leaves_its_work_to_no_one_and_other_keys_free(log: EventLog) -> None:
    issued = RetryIssued(source="gitlab", project="42", pipeline_id="7", job_id="1",
                         idempotency_key="act:a")
    async with log.exclusive("act:a", unless="act:a:outcome") as got:
        assert got
        await log.append_batch([keyed(issued, "act:a:outcome")])
        got.done()
    for _ in range(3):  # on whichever connection
        async with log.exclusive("act:a", unless="act:a:outcome") as again:
            assert not again
        async with log.exclusive("act:b", unless="act:b:outcome") as other:
            assert other and await other.held()


async def test_get_many_returns_the_events_that_exist_in_log_order(log: EventLog) -> None:
    first, second, third = (
        r.event for r in await log.append_batch([NewEvent(stream=STREAM, data=job(str(i)))
                                                 for i in range(3)])
    )
    missing = uuid.uuid4()
    got = await log.get_many([third.event_id, missing, first.event_id, third.event_id])
    assert got == [first, third]
    assert await log.get_many([]) == []
    assert await log.get_many([missing]) == []
    assert second not in got


async def test_a_lost_claim_says_so_and_leaves_the_key_to_another(log: EventLog) -> None:
    """A claim ends with its connection (a PostgreSQL restart, a killed backend), and its holder
    learns it only by asking: ``held`` is what act asks just before a provider call."""
    first_block = contextlib.AsyncExitStack()
    first = await first_block.enter_async_context(log.exclusive("act:a"))
    assert first and await first.held()
    await lose_claim(log, "act:a")
    assert not await first.held()
    async with log.exclusive("act:a") as second:  # another replica takes the request over
        assert second and await second.held()
        await first_block.aclose()  # the first holder's block ends quietly...
        assert await second.held()
        async with log.exclusive("act:a") as third:
            assert not third and not await third.held()  # ...and frees nothing of the second's
    async with log.exclusive("act:a") as after:
        assert after


async def test_verdict_signature_counts_count_other_pipelines_since_a_time(
    log: EventLog,
) -> None:
    def v(pipeline: str, job: str, signature: str | None) -> NewEvent:
        sig = FailureSignature(id=signature, algorithm="sig-v1", text="x") if signature else None
        data = VerdictReached(source="gitlab", project="42", pipeline_id=pipeline, job_id=job,
                              job_name="build", category="infra_network", retryable=True,
                              budget="system", action="retry_job", confidence=0.9,
                              signature=sig)  # fmt: skip
        return NewEvent(stream=f"job-gitlab-42-{job}", data=data)

    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await log.append_batch([
        v("7", "1", "sig-v1:dns"), v("8", "2", "sig-v1:dns"), v("9", "3", "sig-v1:dns"),
        v("9", "4", "sig-v1:reset"), v("9", "5", None),
    ])  # fmt: skip
    counts = await log.verdict_signature_counts(
        ["sig-v1:dns", "sig-v1:reset", "sig-v1:none"], before, other_than_pipeline="7"
    )
    assert counts == {"sig-v1:dns": 2, "sig-v1:reset": 1}
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    assert await log.verdict_signature_counts(["sig-v1:dns"], later, other_than_pipeline="7") == {}
    assert await log.verdict_signature_counts([], before, other_than_pipeline="7") == {}


async def test_body_groups_cover_every_version_and_carry_the_bodies(log: EventLog) -> None:
    v = VerdictReached(source="gitlab", project="42", pipeline_id="7", job_id="1",
                       job_name="build", category="oom", retryable=True, budget="system",
                       action="rerun_with_resources", confidence=0.9)  # fmt: skip
    events = [new(str(i)) for i in range(450)] + [NewEvent(stream=STREAM, data=v)]
    await log.append_batch(events)
    groups = [g async for g in log.body_groups(STREAM, ["JobFinished"], 1)]
    assert [g.upto for g in groups][-1] == 451  # the stream's version, the verdict included
    versions = [n for g in groups for n in g.versions]
    assert versions == list(range(1, 451)) and not any(g.foreign for g in groups)
    decoded = [j for g in groups if g.body for j in msgspec.json.decode(g.body, type=list[JobFinished])]
    assert decoded == [e.data for e in events[:450]]
    foreign = [g async for g in log.body_groups(STREAM, ["JobFinished"], 2)]
    assert foreign and all(g.foreign for g in foreign if g.versions)
    assert [g async for g in log.body_groups("nothing", ["JobFinished"], 1)] == []


async def test_stream_bodies_give_every_stream_of_a_prefix(log: EventLog) -> None:
    await log.append_batch(
        [new("1", stream="pipeline-a"), new("2", stream="job-x"), new("3", stream="pipeline-b"),
         new("4", stream="pipeline-a")]
    )  # fmt: skip
    got = {s: msgspec.json.decode(b, type=list[JobFinished])
           async for s, b in log.stream_bodies("pipeline-", ["JobFinished"], 1)}  # fmt: skip
    assert {s: [j.job_id for j in jobs] for s, jobs in got.items()} == {
        "pipeline-a": ["1", "4"], "pipeline-b": ["3"]
    }  # fmt: skip
    assert [s async for s, _ in log.stream_bodies("pipeline-", ["PipelineFinished"], 1)] == []


async def test_concurrent_writers_never_share_a_version(log: EventLog) -> None:
    async def writer(i: int) -> None:
        for j in range(10):
            await log.append_batch([new(f"{i}-{j}")])

    await asyncio.gather(*(writer(i) for i in range(5)))
    read = await log.read_stream(STREAM)
    assert [e.stream_version for e in read] == list(range(1, 51))
    positions = [e.position for e in read]
    assert positions == sorted(positions) and len(set(positions)) == 50
    assert dt.datetime.now(dt.UTC) >= read[-1].recorded_at
