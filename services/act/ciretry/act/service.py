"""The act handler: read the chain, fold, decide, append with the expected versions, then act.

The decision and the side effect are two steps on purpose (DESIGN 5). The decision commits with
the versions of the chain's pipeline streams it was made from plus a tracking row for the verdict,
so racing replicas cannot both spend the last unit of budget and a redelivered verdict decides
nothing new. A chain (``chains``) is the origin pipeline and every pipeline act created to rerun
its jobs; its decisions are stored in the origin's stream, so it has one budget.

Before spending budget on a GitLab pipeline that no link has tied to a chain yet, act asks GitLab
once where the pipeline came from (its ``CIRETRY_RETRY_OF`` variable): a pipeline act created
whose hooks are late must not start a fresh budget. No answer means no decision yet (the message
is retried), never a guess.
The provider call comes after, under a per-request advisory lock, with the executor's
check-before-acting; its outcome is stored under ``outcome_key(request)``, whose unique index makes
"one outcome per request" a database fact. A crash between the call and the outcome leaves the
request pending; whoever picks it up next (redelivery or ``run_due`` on any replica) finds the newer
attempt at the provider and records it instead of calling again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from opentelemetry.trace import Span

from ciretry.common.bus import Recorder, metadata_from_context
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    PipelineLinked,
    RecordedEvent,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    VerdictReached,
    decision_stream,
    decode_event,
    link_key,
    pipeline_stream,
)
from ciretry.common.eventstore import (
    AlreadyProcessed,
    EventStore,
    Tracking,
    WrongExpectedVersion,
    needs_reset,
)
from ciretry.common.metrics import instruments
from ciretry.common.telemetry import tracer

from .budget import (
    PIPELINE_ACTIONS,
    UNKNOWN,
    BudgetState,
    Decision,
    Unknown,
    decide,
    dry_run_outcome,
    is_due,
    outcome_key,
)
from .chains import ChainLoader
from .executors import Executor, Executors, Outcome
from .policy import Policy
from .views import find_job

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TooMuchContention(Exception):
    """The pipeline stream kept moving while deciding; the message is retried later."""


#: Open requests (no final outcome yet) after position $1, from the ``pending_requests`` read
#: model (migration 0004, kept in the appending transaction): cost follows the open requests,
#: not every request ever made. Failures and the last one's time come with the row.
_PENDING = """
SELECT p.position, r.type, r.schema_version, r.body, p.failures, p.last_failure
FROM pending_requests p JOIN events r ON r.position = p.position
WHERE p.position > $1
ORDER BY p.position
LIMIT $2
"""


class ActHandler:
    def __init__(
        self,
        store: EventStore,
        recorder: Recorder | None,
        policy: Policy,
        executors: Executors | Mapping[str, Executor],
        consumer_name: str = "act",
        *,
        clock: Clock = utcnow,
        max_conflicts: int = 100,
        max_failures: int = 5,
        failure_backoff_s: float = 60.0,
        cache_size: int = 1024,
    ) -> None:
        """``recorder``: append-then-publish (production); None appends to the store only
        (tests, replay tools). ``max_failures``: transient provider failures after which a
        request is given up (final RetryFailed)."""
        self.store = store
        self.recorder = recorder
        self.policy = policy
        self.executors = (
            executors if isinstance(executors, Executors) else Executors(dict(executors))
        )
        self.consumer_name = consumer_name
        self.clock = clock
        self.max_conflicts = max_conflicts
        self.max_failures = max_failures
        self.failure_backoff_s = failure_backoff_s
        self.conflicts = 0
        self.chains = ChainLoader(store, cache_size=cache_size)
        #: GitLab pipelines GitLab said act did not create (a link never appears later: the
        #: variables of a pipeline are fixed at creation). Bounded; forgetting costs one lookup.
        self._unlinked: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self.cache_size = cache_size
        self._claims = asyncio.Semaphore(max(1, store.pool.get_max_size() - 1))

    # --- appending ------------------------------------------------------------------------

    async def _append(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> None:
        if self.recorder is not None:
            await self.recorder.append(events, expected=expected, tracking=tracking)
        else:
            await self.store.append_batch(events, expected=expected, tracking=tracking)

    # --- deciding -------------------------------------------------------------------------

    async def handle_verdict(self, event: RecordedEvent) -> Decision | None:
        """Decide on one VerdictReached and, if a retry is due now, carry it out. Returns the
        decision (None when another consumer already decided on this verdict)."""
        verdict = event.data
        if not isinstance(verdict, VerdictReached):
            return None
        with tracer().start_as_current_span(
            "budget decide",
            attributes={
                "ciretry.job.id": verdict.job_id,
                "ciretry.pipeline.id": verdict.pipeline_id,
                "ciretry.verdict.category": verdict.category,
            },
        ) as span:
            decision = await self._decide(event, verdict)
            _describe(span, decision)
        return decision

    async def _decide(self, event: RecordedEvent, verdict: VerdictReached) -> Decision | None:
        job_stream = pipeline_stream(verdict.source, verdict.project, verdict.pipeline_id)
        tracking = Tracking(self.consumer_name, event.event_id)
        head: str | None | Unknown = UNKNOWN
        for attempt in range(self.max_conflicts):
            chain = await self.chains.load(verdict.source, verdict.project, verdict.pipeline_id)
            state = chain.state
            job = await find_job(self.store, job_stream, state, verdict.job_id, verdict.job_event_id)
            if event.event_id in state.decided_verdicts:
                # Decided before (a redelivery after a crash): finish what may be unfinished.
                earlier = _decision_for(state, event.event_id)
                # Not when its call already failed: run_due tries again after the failure
                # backoff, and counts the failures (an immediate call here would do neither).
                if (
                    isinstance(earlier, RetryRequested)
                    and earlier.idempotency_key not in state.failing
                ):
                    await self._follow_up(earlier, job)
                await self.store.record_tracking(tracking)
                return earlier
            await self.chains.ensure_review(chain, job.ref if job else None)
            if isinstance(head, Unknown) and verdict.retryable:
                head = await self._ref_head(verdict, job)
            decision = decide(
                state,
                verdict,
                self.policy,
                job,
                self.clock(),
                verdict_event_id=event.event_id,
                ref_head=head,
            )
            if (
                isinstance(decision, RetryRequested)
                and not decision.dry_run  # dry-run creates no pipelines: none can be linked
                and chain.origin == verdict.pipeline_id
                and verdict.pipeline_id not in state.links
                and await self._linked_now(verdict)
            ):
                continue  # the pipeline is a rerun after all: decide on its chain's budget
            key = (
                decision.idempotency_key
                if isinstance(decision, RetryRequested)
                else f"act:skip:{event.event_id}"
            )
            new = NewEvent(
                stream=chain.stream,
                data=decision,
                metadata=metadata_from_context(causation=event, idempotency_key=key),
            )
            try:
                await self._append([new], expected=chain.expected(), tracking=tracking)
            except WrongExpectedVersion:
                # Someone appended to the chain since we read it: our numbers are stale.
                # Jittered backoff keeps replicas racing on one hot chain from starving.
                self.conflicts += 1
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
                continue
            except AlreadyProcessed:
                return None
            break
        else:
            raise TooMuchContention(f"{job_stream}: {self.max_conflicts} conflicting appends")
        _count(decision)
        _log_decision(decision, verdict)
        if isinstance(decision, RetryRequested):
            await self._follow_up(decision, job)
        return decision

    async def _ref_head(
        self, verdict: VerdictReached, job: JobFinished | None
    ) -> str | None | Unknown:
        """Where the job's ref points now, for an action that creates a pipeline on its tip
        (GitLab): a rerun of a commit the branch has moved past is a different thing."""
        links = self.executors.links(verdict.source)
        if links is None or verdict.action not in PIPELINE_ACTIONS or job is None or not job.ref:
            return UNKNOWN
        return await links.ref_head(verdict.project, job.ref)

    async def _linked_now(self, verdict: VerdictReached) -> bool:
        """Ask the provider whether act created the verdict's pipeline (once per pipeline);
        record the link when it did. True when a link was found (the chain must be reloaded)."""
        links = self.executors.links(verdict.source)
        key = (verdict.source, verdict.project, verdict.pipeline_id)
        if links is None or key in self._unlinked:
            return False
        origin = await links.pipeline_link(verdict.project, verdict.pipeline_id)
        if origin is None:
            self._unlinked[key] = None
            while len(self._unlinked) > 16 * self.cache_size:
                self._unlinked.popitem(last=False)
            return False
        link = PipelineLinked(
            source=verdict.source,
            project=verdict.project,
            pipeline_id=verdict.pipeline_id,
            retry_of=origin.retry_of,
            resources=origin.resources,
        )
        await self._append(
            [
                NewEvent(
                    stream=pipeline_stream(verdict.source, verdict.project, verdict.pipeline_id),
                    data=link,
                    metadata=metadata_from_context(
                        idempotency_key=link_key(verdict.source, verdict.project, verdict.pipeline_id)
                    ),
                )
            ]
        )
        log.info(
            "act: pipeline %s of %s was created by %s; deciding on its chain",
            verdict.pipeline_id,
            verdict.project,
            origin.retry_of,
        )
        return True

    async def _follow_up(self, request: RetryRequested, job: JobFinished | None) -> None:
        if request.dry_run:
            await self._close_dry_run(request)
        elif is_due(request, self.clock()):
            await self.execute(request, job)
        # else: scheduled; run_due carries it out when not_before has passed.

    async def _close_dry_run(self, request: RetryRequested) -> None:
        await self._append(
            [
                NewEvent(
                    stream=decision_stream(request),
                    data=dry_run_outcome(request),
                    metadata=metadata_from_context(
                        idempotency_key=outcome_key(request.idempotency_key)
                    ),
                )
            ]
        )

    # --- acting ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _claim(self, key: str) -> AsyncIterator[bool]:
        """A session advisory lock on the request for the length of the provider call: a second
        replica holding the same request skips it; a crash releases it with the connection."""
        lock = int.from_bytes(
            hashlib.blake2b(f"{self.store.schema}:{key}".encode(), digest_size=8).digest(),
            "big",
            signed=True,
        )
        # The claim holds a pooled connection while the outcome is appended on another one: at
        # most (pool size - 1) claims at once, or they could hold every connection and wait for
        # one more forever.
        async with self._claims, self.store.pool.acquire() as conn:
            # A session lock: should the unlock below not run (cancelled twice, say), the
            # pool's reset releases it rather than a pooled connection keeping it forever.
            needs_reset(conn)
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock))
            try:
                yield got
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock)
                needs_reset(conn, False)  # nothing held any more

    async def execute(
        self, request: RetryRequested, job: JobFinished | None, *, failures: int = 0
    ) -> Outcome | None:
        """Carry out one request unless another replica is on it or it already has an outcome.
        Returns the provider outcome, or None when nothing was done here."""
        key = request.idempotency_key
        async with self._claim(key) as got:
            if not got:
                return None
            if await self.store.get_by_key(outcome_key(key)) is not None:
                return None
            executor = self.executors.get(request.source)
            started = time.monotonic()
            if executor is None:
                outcome = Outcome(issued=False, detail=f"no executor for {request.source}")
            else:
                outcome = await executor.execute(request, job)
            _log_call(request, outcome, time.monotonic() - started, failures)
            await self._record_outcome(request, outcome, failures)
            return outcome

    async def _record_outcome(
        self, request: RetryRequested, outcome: Outcome, failures: int
    ) -> None:
        stream = decision_stream(request)
        key = request.idempotency_key
        data: RetryIssued | RetryFailed
        if outcome.issued:
            data = RetryIssued(
                source=request.source,
                project=request.project,
                pipeline_id=request.pipeline_id,
                job_id=request.job_id,
                idempotency_key=key,
                new_job_id=outcome.new_job_id,
                new_pipeline_id=outcome.new_pipeline_id,
                found_existing=outcome.found_existing,
                origin_pipeline_id=request.origin_pipeline_id,
            )
            meta_key = outcome_key(key)
        else:
            will_retry = outcome.will_retry and failures + 1 < self.max_failures
            data = RetryFailed(
                source=request.source,
                project=request.project,
                pipeline_id=request.pipeline_id,
                job_id=request.job_id,
                idempotency_key=key,
                status=outcome.status,
                detail=outcome.detail[:1000],
                will_retry=will_retry,
                origin_pipeline_id=request.origin_pipeline_id,
            )
            meta_key = f"{key}:failed:{failures + 1}" if will_retry else outcome_key(key)
        await self._append(
            [
                NewEvent(
                    stream=stream,
                    data=data,
                    metadata=metadata_from_context(idempotency_key=meta_key),
                )
            ]
        )
        outcome_name = "issued" if isinstance(data, RetryIssued) else "failed"
        instruments().retries.add(1, {"outcome": outcome_name, "source": request.source})

    async def run_due(self, now: dt.datetime | None = None, *, limit: int = 500) -> int:
        """Carry out every request whose time has come and that has no outcome: scheduled
        backoffs, transient failures to try again, and requests a crash interrupted. Safe on any
        number of replicas at once (the claim lock). Returns how many were attempted."""
        now = now or self.clock()
        done = 0
        position = 0
        while True:
            async with self.store.pool.acquire() as conn:
                rows = await conn.fetch(_PENDING, position, limit)
            if not rows:
                return done
            for row in rows:
                request = decode_event(row[1], row[2], row[3])
                assert isinstance(request, RetryRequested)
                failures, last_failure = int(row[4]), row[5]
                if request.dry_run:
                    await self._close_dry_run(request)
                    continue
                if not is_due(request, now):
                    continue
                if last_failure is not None and now < last_failure + dt.timedelta(
                    seconds=self.failure_backoff_s * 2 ** (failures - 1)
                ):
                    continue
                job = await self._job(request)
                if await self.execute(request, job, failures=failures) is not None:
                    done += 1
            if len(rows) < limit:
                return done
            position = int(rows[-1][0])

    async def _job(self, request: RetryRequested) -> JobFinished | None:
        origin = request.origin_pipeline_id or request.pipeline_id
        chain = await self.chains.load_origin(
            request.source, request.project, origin, request.pipeline_id
        )
        stream = pipeline_stream(request.source, request.project, request.pipeline_id)
        return await find_job(self.store, stream, chain.state, request.job_id)

    async def run_scheduler(self, stop: asyncio.Event, *, interval: float = 5.0) -> None:
        """run_due every ``interval`` seconds until ``stop`` is set (one per replica)."""
        while not stop.is_set():
            try:
                await self.run_due()
            except Exception as exc:  # noqa: BLE001 - keep the scheduler alive through outages
                log.warning("act scheduler: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass


def _decision_for(state: BudgetState, verdict_event_id: Any) -> RetryRequested | None:
    for request in state.requests.values():
        if request.verdict_event_id == verdict_event_id:
            return request
    return None


__all__ = ["ActHandler", "TooMuchContention", "utcnow"]


def _describe(span: Span, decision: Decision | None) -> None:
    """Decision and budget numbers on the span (no secrets, no log text)."""
    if decision is None:
        span.set_attribute("ciretry.decision", "already_decided")
        return
    snap = decision.snapshot
    span.set_attribute(
        "ciretry.decision",
        decision.action if isinstance(decision, RetryRequested) else f"skip:{decision.reason}",
    )
    span.set_attribute("ciretry.budget.job_attempts", snap.job_attempts)
    span.set_attribute("ciretry.budget.job_limit", snap.job_limit)
    span.set_attribute("ciretry.budget.pipeline_retries", snap.pipeline_retries)
    span.set_attribute("ciretry.budget.pipeline_limit", snap.pipeline_limit)


def _count(decision: Decision) -> None:
    inst = instruments()
    if isinstance(decision, RetryRequested):
        inst.retries.add(1, {"outcome": "requested", "source": decision.source})
    else:
        inst.retries.add(1, {"outcome": "skipped", "reason": decision.reason})
        if decision.reason in ("job_budget_exhausted", "pipeline_budget_exhausted"):
            inst.budget_exhausted.add(1, {"reason": decision.reason})


def _log_decision(decision: Decision, verdict: VerdictReached) -> None:
    """One line per decision, with the numbers it was made with (no log text, no secrets)."""
    snap = decision.snapshot
    fields: dict[str, Any] = {
        "source": decision.source,
        "project": decision.project,
        "pipeline_id": decision.pipeline_id,
        "origin_pipeline_id": decision.origin_pipeline_id,
        "job_id": decision.job_id,
        "job_name": decision.job_name,
        "category": verdict.category,
        "job_retries": f"{snap.job_attempts}/{snap.job_limit}",
        "chain_retries": f"{snap.pipeline_retries}/{snap.pipeline_limit}",
    }
    if isinstance(decision, RetryRequested):
        fields |= {"decision": "requested", "action": decision.action, "detail": decision.detail}
        if decision.not_before is not None:
            fields["not_before"] = decision.not_before.isoformat()
        log.info(
            "act: %s job %s (%s) of %s: %s%s",
            decision.action,
            decision.job_id,
            decision.job_name,
            decision.project,
            verdict.category,
            f"; {decision.detail}" if decision.detail else "",
            extra={"fields": fields},
        )
    else:
        fields |= {"decision": "skipped", "reason": decision.reason, "detail": decision.detail}
        log.info(
            "act: not retrying job %s (%s) of %s: %s: %s",
            decision.job_id,
            decision.job_name,
            decision.project,
            decision.reason,
            decision.detail,
            extra={"fields": fields},
        )


def _log_call(request: RetryRequested, outcome: Outcome, seconds: float, failures: int) -> None:
    """One line per provider call: what was asked, what came of it, how long it took. Provider
    text in ``outcome.detail`` has the token scrubbed (executors)."""
    fields: dict[str, Any] = {
        "source": request.source,
        "project": request.project,
        "job_id": request.job_id,
        "action": request.action,
        "idempotency_key": request.idempotency_key,
        "latency_ms": round(seconds * 1000, 1),
        "status": outcome.status,
    }
    if outcome.issued:
        fields |= {
            "outcome": "found_existing" if outcome.found_existing else "issued",
            "new_job_id": outcome.new_job_id,
            "new_pipeline_id": outcome.new_pipeline_id,
        }
        log.info(
            "act: %s for job %s %s (%s) in %.0f ms",
            request.action,
            request.job_id,
            "found already done" if outcome.found_existing else "issued",
            outcome.new_pipeline_id or outcome.new_job_id or "",
            seconds * 1000,
            extra={"fields": fields},
        )
    else:
        fields |= {
            "outcome": "failed",
            "will_retry": outcome.will_retry,
            "failures": failures + 1,
            "detail": outcome.detail[:300],
        }
        log.warning(
            "act: %s for job %s failed (HTTP %s%s) in %.0f ms: %s",
            request.action,
            request.job_id,
            outcome.status if outcome.status is not None else "-",
            ", will retry" if outcome.will_retry else "",
            seconds * 1000,
            outcome.detail[:300],
            extra={"fields": fields},
        )
