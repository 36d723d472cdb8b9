"""classify as a service: real PostgreSQL, real JetStream, a fake GitLab serving job logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ciretry.classify.classifier import RuleClassifier
from ciretry.classify.logsource import LogSource, ProviderEndpoints
from ciretry.classify.rules import load_ruleset
from ciretry.classify.service import ClassifyHandler
from ciretry.common.bus import Bus, Consumer, ConsumerSettings, OutboxPublisher, Recorder
from ciretry.common.eventlog import AlreadyProcessed, EventLog, Tracking
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    PodTerminated,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore
from ciretry.common.http import AiohttpTransport, HttpSettings
from tests.support.fakehttp import Call, Reply

from .fakes import TOKEN, FakeProvider

COMPILE_ERROR = b"$ make\ncc -c foo.c\nfoo.c:12:5: error: expected ';' before '}' token\nKilled\nmake: *** [Makefile:3: foo.o] Error 1\n"


def job(job_id: str, **kw: object) -> JobFinished:
    fields: dict[str, object] = dict(
        source="gitlab",
        project="42",
        pipeline_id="7",
        job_id=job_id,
        job_name="build",
        status="failed",
        failure_reason="script_failure",
        provider_failure_reason="script_failure",
    )
    fields.update(kw)
    return JobFinished(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def handler(log: EventLog, provider: FakeProvider) -> AsyncIterator[ClassifyHandler]:
    """The handler on each event log (PostgreSQL, the in-memory twin), appending to the log,
    fetching logs from the fake provider in-process."""
    logs = LogSource(
        provider.transport(),
        ProviderEndpoints(gitlab_url=provider.url, gitlab_token=TOKEN),
        settings=HttpSettings(backoff_base_s=0.01),
    )
    handler = ClassifyHandler(log, None, logs, RuleClassifier(load_ruleset()), pod_grace=0.0)
    yield handler
    await handler.close()


@pytest.fixture
async def bus_handler(
    store: EventStore, bus: Bus, provider: FakeProvider
) -> AsyncIterator[ClassifyHandler]:
    """The handler as the service wires it: PostgreSQL, and the recorder publishing to NATS."""
    async with aiohttp.ClientSession() as session:
        logs = LogSource(
            AiohttpTransport(session),
            ProviderEndpoints(gitlab_url=provider.url, gitlab_token=TOKEN),
            settings=HttpSettings(backoff_base_s=0.01),
        )
        handler = ClassifyHandler(
            store,
            Recorder(store, OutboxPublisher(store, bus)),
            logs,
            RuleClassifier(load_ruleset()),
            pod_grace=0.0,
        )
        yield handler
        await handler.close()


async def verdicts(store: EventLog, job_id: str) -> list[VerdictReached]:
    events = await store.read_stream(job_stream("gitlab", "42", job_id))
    return [e.data for e in events if isinstance(e.data, VerdictReached)]


async def test_consumer_turns_a_failed_job_into_one_verdict_with_evidence(
    store: EventStore, bus: Bus, provider: FakeProvider, bus_handler: ClassifyHandler
) -> None:
    handler = bus_handler
    provider.logs["1001"] = COMPILE_ERROR
    recorder = Recorder(store, OutboxPublisher(store, bus))
    consumer = Consumer(
        bus,
        store,
        name="classify",
        topic="job",
        handler=handler.handle,
        settings=ConsumerSettings(fetch_timeout=0.2),
    )
    await consumer.setup()
    (job_event,) = await recorder.append(
        [NewEvent(stream=pipeline_stream("gitlab", "42", "7"), data=job("1001"))]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(consumer.wait_until(lambda: consumer.processed == 1), 20)
    stop.set()
    await task
    (verdict,) = await verdicts(store, "1001")
    # A compile error that also prints "Killed" is not an OOM.
    assert verdict.category == "deterministic" and not verdict.retryable
    assert verdict.job_event_id == job_event.event_id
    assert any(e.line == 3 and e.text and "error:" in e.text for e in verdict.evidence)
    # Redelivered (e.g. ack lost): no second fetch, no second verdict.
    calls = len(provider.calls)
    await handler.handle(job_event)
    assert len(await verdicts(store, "1001")) == 1
    assert len(provider.calls) == calls


async def test_two_replicas_racing_on_one_event_store_one_verdict(
    log: EventLog, handler: ClassifyHandler
) -> None:
    (event,) = await log.append(pipeline_stream("gitlab", "42", "7"), [job("2002")])
    results = await asyncio.gather(
        handler.handle(event), handler.handle(event), return_exceptions=True
    )
    assert len(await verdicts(log, "2002")) == 1
    assert all(r is None or isinstance(r, AlreadyProcessed) for r in results)


async def test_concurrent_jobs_share_their_reads_and_verdict_commits(
    log: EventLog, provider: FakeProvider, handler: ClassifyHandler
) -> None:
    """Jobs handled at once (the consumer's concurrency) read their streams in one query and
    commit their verdicts, each with its tracking row, in one transaction: fewer round trips
    than jobs, one verdict and one tracking row each."""
    ids = [str(8000 + i) for i in range(12)]
    for job_id in ids:
        provider.logs[job_id] = COMPILE_ERROR
    events = await log.append(pipeline_stream("gitlab", "42", "7"), [job(i) for i in ids])
    await asyncio.gather(*(handler.handle(e) for e in events))
    for job_id, event in zip(ids, events, strict=True):
        (verdict,) = await verdicts(log, job_id)
        assert verdict.job_event_id == event.event_id and verdict.category == "deterministic"
        assert await log.is_processed("classify", event.event_id)
    assert handler.commits.stats.batches < len(ids)
    assert handler.reads.reads < len(ids)
    # All redelivered at once, after the commit: no log fetched, no second verdict.
    calls = len(provider.calls)
    await asyncio.gather(*(handler.handle(e) for e in events))
    assert len(provider.calls) == calls
    assert all([len(await verdicts(log, job_id)) == 1 for job_id in ids])


async def test_an_event_another_replica_processed_fails_alone_in_a_shared_commit(
    log: EventLog, provider: FakeProvider, handler: ClassifyHandler
) -> None:
    """A redelivery whose verdict this replica did not see yet (another replica's commit
    landed after the read) meets the tracking row: AlreadyProcessed (the consumer acks it),
    no second verdict, and the jobs it shared the transaction with get theirs."""
    ids = ["8101", "8102", "8103"]
    for job_id in ids:
        provider.logs[job_id] = COMPILE_ERROR
    events = await log.append(pipeline_stream("gitlab", "42", "7"), [job(i) for i in ids])
    await log.record_tracking(Tracking("classify", events[1].event_id))  # the other replica
    results = await asyncio.gather(*(handler.handle(e) for e in events), return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], AlreadyProcessed)
    assert [len(await verdicts(log, job_id)) for job_id in ids] == [1, 0, 1]


async def test_jobs_needing_no_verdict_share_their_tracking_commits(
    log: EventLog, handler: ClassifyHandler
) -> None:
    events = await log.append(
        pipeline_stream("gitlab", "42", "7"), [job(str(8200 + i), status="success") for i in range(8)]
    )
    await asyncio.gather(*(handler.handle(e) for e in events))
    assert all([await log.is_processed("classify", e.event_id) for e in events])
    assert handler.commits.stats.batches < len(events)
    with pytest.raises(AlreadyProcessed):  # redelivered: acked as a duplicate
        await handler.handle(events[0])


async def test_pod_oomkilled_signal_makes_an_oom_verdict(
    log: EventLog, provider: FakeProvider, handler: ClassifyHandler
) -> None:
    provider.logs["3003"] = b"Running tests...\n"
    await log.append(
        job_stream("gitlab", "42", "3003"),
        [
            PodTerminated(
                namespace="ci",
                pod="runner-abc",
                source="gitlab",
                project="42",
                job_id="3003",
                container_reason="OOMKilled",
                exit_code=137,
            )
        ],
    )
    (event,) = await log.append(
        pipeline_stream("gitlab", "42", "7"), [job("3003", failure_reason="script_failure")]
    )
    await handler.handle(event)
    (verdict,) = await verdicts(log, "3003")
    assert verdict.category == "oom"
    assert verdict.action == "rerun_with_resources"


async def test_unavailable_log_still_gets_a_verdict_that_says_so(
    log: EventLog, provider: FakeProvider, handler: ClassifyHandler
) -> None:
    provider.failures_left = 100
    (event,) = await log.append(
        pipeline_stream("gitlab", "42", "7"), [job("4004", failure_reason="runner_system_failure")]
    )
    await handler.handle(event)
    (verdict,) = await verdicts(log, "4004")
    assert not verdict.log_available
    assert verdict.log_note and "unavailable" in verdict.log_note
    assert verdict.category == "runner_system" and verdict.retryable


async def test_successful_jobs_get_no_verdict_and_count_as_processed(
    log: EventLog, handler: ClassifyHandler
) -> None:
    (event,) = await log.append(
        pipeline_stream("gitlab", "42", "7"), [job("5005", status="success")]
    )
    await handler.handle(event)
    assert await verdicts(log, "5005") == []
    # Processed, with nothing to show for it: the tracking row says so, or the catch-up from
    # the log would take the event up again and again.
    assert await log.is_processed("classify", event.event_id)


def oom_pod(job_id: str) -> PodTerminated:
    return PodTerminated(namespace="ci", pod="runner-abc", source="gitlab", project="42",
                         job_id=job_id, container_reason="OOMKilled", exit_code=137)  # fmt: skip


class PodDuringFetch(FakeProvider):
    """The job's PodTerminated lands while its log is fetched: after the handler first read
    the job's stream, so only waiting for it finds it."""

    def __init__(self, log: EventLog, job_id: str) -> None:
        super().__init__()
        self.log, self.job_id = log, job_id

    async def gitlab_trace(self, call: Call, match: dict[str, str]) -> Reply:  # type: ignore[override]
        await self.log.append(job_stream("gitlab", "42", self.job_id), [oom_pod(self.job_id)])
        return super().gitlab_trace(call, match)


def waiting_handler(log: EventLog, provider: FakeProvider, grace: float) -> ClassifyHandler:
    logs = LogSource(
        provider.transport(),
        ProviderEndpoints(gitlab_url=provider.url, gitlab_token=TOKEN),
        settings=HttpSettings(backoff_base_s=0.01),
    )
    return ClassifyHandler(
        log, None, logs, RuleClassifier(load_ruleset()), pod_grace=grace, pod_poll=0.01
    )


async def test_a_verdict_a_pod_can_change_waits_for_a_late_pod(log: EventLog) -> None:
    provider = PodDuringFetch(log, "6006")
    provider.logs["6006"] = b"Running tests...\n"  # no rule knows this: a pod could explain it
    handler = waiting_handler(log, provider, grace=30.0)
    (event,) = await log.append(pipeline_stream("gitlab", "42", "7"), [job("6006")])
    try:
        await handler.handle(event)
    finally:
        await handler.close()
    (verdict,) = await verdicts(log, "6006")
    assert verdict.category == "oom"
    assert verdict.action == "rerun_with_resources"


async def test_a_verdict_no_pod_can_change_does_not_wait(
    log: EventLog, provider: FakeProvider
) -> None:
    provider.logs["7007"] = COMPILE_ERROR
    # An hour of grace: waiting for a pod here would hang the test (the guard fails it).
    handler = waiting_handler(log, provider, grace=3600.0)
    (event,) = await log.append(pipeline_stream("gitlab", "42", "7"), [job("7007")])
    try:
        await asyncio.wait_for(handler.handle(event), 60)
    finally:
        await handler.close()
    (verdict,) = await verdicts(log, "7007")
    assert verdict.category == "deterministic"
