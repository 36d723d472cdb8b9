"""The database away for longer than the whole backoff schedule, then back (issue 13.1).

classify and act as their ``main`` wires them (a ``Consumer`` around the real handler, the
outbox sweeper, act's scheduler), each reaching PostgreSQL through a TCP proxy the test cuts,
on the shared NATS and a fake GitLab. Failing jobs are committed while both are cut off: classify
fails on each of them more often than JetStream used to deliver a message at all (our
max_deliver + 5, after which the server stopped delivering without a word, and the job was
never classified). Then classify's database comes back while act's stays away, for as long
again; then act's. Every job must end with exactly one verdict, one decision and one provider
call, whichever path (bus or log) brought it.

Two ways the bus can fail a follower, one test each: it keeps redelivering for as long as the
outage lasts (JetStream's own max_deliver is unlimited now), or it loses the messages outright
during the outage (the stream purged), when only the catch-up from the log can find them.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from ciretry.act.executors import GitLabExecutor
from ciretry.act.policy import parse_policy
from ciretry.act.service import ActHandler
from ciretry.classify.classifier import RuleClassifier
from ciretry.classify.logsource import LogSource, ProviderEndpoints
from ciretry.classify.rules import load_ruleset
from ciretry.classify.service import ClassifyHandler
from ciretry.common.bus import Bus, Consumer, ConsumerSettings, OutboxPublisher, Recorder
from ciretry.common.events import JobFinished, NewEvent, RecordedEvent, pipeline_stream
from ciretry.common.eventstore import EventStore
from ciretry.common.http import AiohttpTransport, HttpSettings
from tests.support.chaos.netfault import TcpProxy
from tests.support.providers import FakeGitLab
from tests.support.scenario import policy_without_backoff

#: A short backoff schedule (production: 0.5 s doubling to 30 s).
SCHEDULE = dict(max_deliver=3, backoff_base=0.02, backoff_cap=0.1, fetch_timeout=0.2)
#: Deliveries JetStream made of a message before issue 13 (our max_deliver + 5).
OLD_SERVER_LIMIT = 3 + 5
#: The outage lasts until every message was attempted this often: longer than the schedule.
OUTAGE_ATTEMPTS = OLD_SERVER_LIMIT + 3

NETWORK_LOG = (
    b"$ git fetch\nfatal: unable to access 'https://gitlab.example/x.git/': "
    b"Could not resolve host: gitlab.example\n"
)
FAILED_JOBS = 8
PASSED_JOBS = 2


def proxied(dsn: str, port: int) -> str:
    """``dsn`` with its host and port replaced by 127.0.0.1:``port``."""
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Follower:
    """One service's consumer, its database link, and what its handler was given."""

    name: str
    proxy: TcpProxy
    store: EventStore
    consumer: Consumer
    attempts: Counter[str] = field(default_factory=Counter)
    done: set[str] = field(default_factory=set)

    async def wait(self, predicate: Callable[[], bool], what: str, within: float = 60) -> None:
        try:
            await asyncio.wait_for(self.consumer.wait_until(predicate), within)
        except TimeoutError:
            pytest.fail(
                f"{self.name}: {what} did not happen within {within}s; attempts per event "
                f"{sorted(self.attempts.values())}, done {len(self.done)}"
            )


def counted(
    attempts: Counter[str], done: set[str], handler: Callable[[RecordedEvent], Awaitable[object]]
) -> Callable[[RecordedEvent], Awaitable[None]]:
    """``handler``, counting the attempts per event and remembering the ones it got through."""

    async def handle(event: RecordedEvent) -> None:
        attempts[str(event.event_id)] += 1
        await handler(event)
        done.add(str(event.event_id))

    return handle


@dataclass
class Deployment:
    classify: Follower
    act: Follower
    gitlab: FakeGitLab
    store: EventStore  # the test's own, direct link
    bus: Bus


@pytest.fixture
async def deployment(
    request: pytest.FixtureRequest, pg_dsn: str, store: EventStore, bus: Bus
) -> AsyncIterator[Deployment]:
    settings = ConsumerSettings(**SCHEDULE, **getattr(request, "param", {}))  # type: ignore[arg-type]
    host, port = urlsplit(pg_dsn).hostname or "127.0.0.1", urlsplit(pg_dsn).port or 5432
    gitlab = await FakeGitLab().started()
    session = aiohttp.ClientSession()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    closers: list[Callable[[], Awaitable[None]]] = [gitlab.close, session.close]
    followers: dict[str, Follower] = {}
    executor = GitLabExecutor(
        gitlab.url,
        "glpat-outage",
        settings=HttpSettings(timeout_s=2.0, max_attempts=2, backoff_base_s=0.01),
    )
    closers.append(executor.close)
    try:
        for name in ("classify", "act"):
            proxy = await TcpProxy(host, port).start()
            closers.append(proxy.close)
            own = await EventStore.connect(
                proxied(pg_dsn, proxy.port), store.schema, min_size=0, max_size=6
            )
            closers.append(own.close)
            outbox = OutboxPublisher(own, bus, grace=0.5)
            recorder = Recorder(own, outbox)
            attempts: Counter[str] = Counter()
            done: set[str] = set()
            if name == "classify":
                logs = LogSource(
                    AiohttpTransport(session),
                    ProviderEndpoints(gitlab_url=gitlab.url, gitlab_token="glpat-outage"),
                    settings=HttpSettings(backoff_base_s=0.01),
                )
                classify = ClassifyHandler(
                    own, recorder, logs, RuleClassifier(load_ruleset()), pod_grace=0.0
                )
                closers.append(classify.close)
                handler, topic = counted(attempts, done, classify.handle), "job"
            else:
                act = ActHandler(
                    own, recorder, parse_policy(policy_without_backoff()), {"gitlab": executor}
                )
                handler, topic = counted(attempts, done, act.handle_verdict), "verdict"
                tasks.append(asyncio.create_task(act.run_scheduler(stop, interval=0.5)))
            consumer = Consumer(
                bus, own, name=name, topic=topic, handler=handler, settings=settings
            )
            await consumer.setup()
            follower = Follower(name, proxy, own, consumer, attempts, done)
            tasks.append(asyncio.create_task(consumer.run(stop)))
            tasks.append(asyncio.create_task(outbox.run_sweeper(stop, interval=0.2)))
            followers[name] = follower
        yield Deployment(followers["classify"], followers["act"], gitlab, store, bus)
    finally:
        stop.set()
        for f in followers.values():  # let everything drain before the links close
            if not f.proxy.is_up:
                await f.proxy.restore()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for close in reversed(closers):
            await close()


async def commit_jobs(d: Deployment) -> list[RecordedEvent]:
    """Failing jobs (each in a pipeline of its own, so no budget interferes) and passing ones,
    committed and published as ingest does."""
    events = []
    for i in range(FAILED_JOBS + PASSED_JOBS):
        job_id, pipeline_id = 7000 + i, 900 + i
        d.gitlab.add_job(job_id, "build", pipeline_id)
        d.gitlab.traces[job_id] = NETWORK_LOG
        events.append(
            NewEvent(
                stream=pipeline_stream("gitlab", "42", str(pipeline_id)),
                data=JobFinished(
                    source="gitlab",
                    project="42",
                    pipeline_id=str(pipeline_id),
                    job_id=str(job_id),
                    job_name="build",
                    status="failed" if i < FAILED_JOBS else "success",
                    failure_reason="script_failure" if i < FAILED_JOBS else None,
                ),
            )
        )
    return await Recorder(d.store, OutboxPublisher(d.store, d.bus)).append(events)


async def bodies(store: EventStore, kind: str) -> list[dict[str, object]]:
    async with store.connection() as conn:
        rows = await conn.fetch(
            "SELECT convert_from(body, 'UTF8') FROM events WHERE type = $1 ORDER BY position",
            kind,
        )
    return [json.loads(r[0]) for r in rows]


async def outage_then_recovery(d: Deployment, *, lose_messages: bool) -> None:
    classify, act = d.classify, d.act
    await classify.proxy.cut()
    await act.proxy.cut()
    jobs = await commit_jobs(d)
    ids = [str(e.event_id) for e in jobs]
    await classify.wait(
        lambda: all(classify.attempts[i] >= OUTAGE_ATTEMPTS for i in ids),
        f"every job attempted {OUTAGE_ATTEMPTS} times while the database is away "
        f"(JetStream used to stop after {OLD_SERVER_LIMIT})",
    )
    if lose_messages:
        await d.bus.js.purge_stream(d.bus.stream)
    await classify.proxy.restore()
    await classify.wait(lambda: classify.done >= set(ids), "every job processed")
    await act.wait(
        lambda: len(act.attempts) == FAILED_JOBS and min(act.attempts.values()) >= OUTAGE_ATTEMPTS,
        f"every verdict attempted {OUTAGE_ATTEMPTS} times while act's database is away",
    )
    if lose_messages:
        await d.bus.js.purge_stream(d.bus.stream)
    await act.proxy.restore()
    await act.wait(lambda: len(act.done) == FAILED_JOBS, "every verdict processed")


async def assert_exactly_once(d: Deployment) -> None:
    verdicts = await bodies(d.store, "VerdictReached")
    requested = await bodies(d.store, "RetryRequested")
    skipped = await bodies(d.store, "RetrySkipped")
    issued = await bodies(d.store, "RetryIssued")
    failed_jobs = {str(7000 + i) for i in range(FAILED_JOBS)}
    assert Counter(str(v["job_id"]) for v in verdicts) == dict.fromkeys(failed_jobs, 1)
    assert skipped == []
    assert Counter(str(r["job_id"]) for r in requested) == dict.fromkeys(failed_jobs, 1)
    assert Counter(str(i["idempotency_key"]) for i in issued) == Counter(
        str(r["idempotency_key"]) for r in requested
    )
    retried = Counter(c.path for c in d.gitlab.posts("/retry"))
    assert sorted(retried) == sorted(f"/api/v4/projects/42/jobs/{j}/retry" for j in failed_jobs)
    assert set(retried.values()) == {1}
    for follower in (d.classify, d.act):
        assert await follower.consumer.oldest_unprocessed_age() == 0.0


@pytest.mark.parametrize("deployment", [{}], indirect=True)
async def test_database_away_longer_than_the_backoff_schedule(deployment: Deployment) -> None:
    """The bus alone: JetStream redelivers for as long as the outage lasts (the catch-up from
    the log, 60 s after an event was recorded by default, does not come into it)."""
    await outage_then_recovery(deployment, lose_messages=False)
    await assert_exactly_once(deployment)
    assert deployment.classify.consumer.caught_up == deployment.act.consumer.caught_up == 0


@pytest.mark.parametrize(
    "deployment", [{"catch_up_grace": 0.5, "catch_up_interval": 0.2}], indirect=True
)
async def test_database_away_and_the_bus_lost_the_messages(deployment: Deployment) -> None:
    """The stream is purged during each outage: only the log still has the events, and the
    catch-up brings every one of them to its follower."""
    await outage_then_recovery(deployment, lose_messages=True)
    await assert_exactly_once(deployment)
    assert deployment.classify.consumer.caught_up > 0 and deployment.act.consumer.caught_up > 0
