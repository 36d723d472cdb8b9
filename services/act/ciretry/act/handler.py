"""Deciding on verdicts: read the chain, fold, decide, append with the expected versions.

The decision commits with the versions of the chain's pipeline streams it was made from plus a
tracking row for the verdict, so racing replicas cannot both spend the last unit of budget and a
redelivered verdict decides nothing new. A chain (``chains``) is the origin pipeline and every
pipeline act created to rerun its jobs; its decisions are stored in the origin's stream, so it has
one budget. The decision itself is the pure ``budget.decide``; this module only gathers what it
reads and records what it says, then hands a due request to the runner.

Before spending budget on a GitLab pipeline that no link has tied to a chain yet, act asks GitLab
once where the pipeline came from (its ``CIRETRY_RETRY_OF`` variable): a pipeline act created
whose hooks are late must not start a fresh budget. No answer means no decision yet (the message
is retried), never a guess.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span

from ciretry.common.bus import Append, metadata_from_context
from ciretry.common.errors import DependencyUnavailable
from ciretry.common.eventlog import (
    AlreadyProcessed,
    EventLog,
    TrackedAppend,
    Tracking,
    WrongExpectedVersion,
)
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    PipelineLinked,
    RecordedEvent,
    RetryParked,
    RetryRequested,
    VerdictReached,
    link_key,
    pipeline_stream,
)
from ciretry.common.metrics import instruments
from ciretry.common.telemetry import current_span

from .breaker import ProviderBreaker
from .budget import (
    PIPELINE_ACTIONS,
    UNKNOWN,
    BudgetState,
    Decision,
    Unknown,
    decide,
    is_due,
)
from .chains import ChainLoader, find_job, prefetch_jobs
from .executors import Executors
from .policy import Policy
from .runner import RequestRunner
from .storms import StormWatch

log = logging.getLogger("ciretry.act.service")

Clock = Callable[[], dt.datetime]


PipelineKey = tuple[str, str, str]  # (source, project, pipeline id)
#: A decision, the job it is about, and the request to carry out now (None: nothing to do).
_Decided = tuple[Decision | None, JobFinished | None, RetryRequested | None]
#: Verdicts decided together at most (one append of their decisions).
BATCH = 64


@dataclass(slots=True)
class _Item:
    event: RecordedEvent
    verdict: VerdictReached
    result: asyncio.Future[_Decided | None]
    #: Decided again after its retry storm ended (``release``): its tracking row exists.
    release: bool = False


class TooMuchContention(Exception):
    """The chain kept moving while deciding; the message is retried later."""


class VerdictHandler:
    def __init__(
        self,
        store: EventLog,
        append: Append,
        chains: ChainLoader,
        runner: RequestRunner,
        policy: Policy,
        executors: Executors,
        consumer_name: str,
        *,
        clock: Clock,
        max_conflicts: int = 100,
        cache_size: int = 1024,
        storms: StormWatch | None = None,
    ) -> None:
        """``storms``: the retry-storm fold (``stormfollower``) whose open storms park retries;
        None: no breaker (nothing parks, and a verdict parked earlier is decided as usual)."""
        self.store = store
        self.storms = storms
        self.append = append
        self.chains = chains
        self.runner = runner
        self.policy = policy
        self.executors = executors
        self.consumer_name = consumer_name
        self.clock = clock
        self.max_conflicts = max_conflicts
        self.cache_size = cache_size
        self.conflicts = 0
        #: GitLab pipelines GitLab said act did not create (a link never appears later: the
        #: variables of a pipeline are fixed at creation). Bounded; forgetting costs one lookup.
        self._unlinked: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        #: Lookups at a provider that just failed to answer wait for a while (``breaker``).
        self._provider = ProviderBreaker().call
        #: Verdicts waiting for their pipeline's decider (see ``_decide``), by pipeline.
        self._waiting: dict[PipelineKey, list[_Item]] = {}

    async def handle_verdict(self, event: RecordedEvent) -> Decision | None:
        """Decide on one VerdictReached and, if a retry is due now, carry it out. Returns the
        decision (None when another consumer already decided on this verdict)."""
        verdict = event.data
        if not isinstance(verdict, VerdictReached):
            return None
        with current_span(
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

    async def release(self, event: RecordedEvent) -> Decision | None:
        """Decide again on a verdict a retry storm parked, now that the storm has ended: the
        usual budget rules, and a jittered ``not_before`` (``budget.decide``). Its message was
        tracked when it was parked; this adds no tracking row. A verdict decided meanwhile
        (a redelivery, another replica's release) is not decided twice."""
        verdict = event.data
        if not isinstance(verdict, VerdictReached):
            return None
        with current_span(
            "storm release", attributes={"ciretry.job.id": verdict.job_id}
        ) as span:
            decision = await self._decide(event, verdict, release=True)
            _describe(span, decision)
        return decision

    async def _decide(
        self, event: RecordedEvent, verdict: VerdictReached, *, release: bool = False
    ) -> Decision | None:
        """Decide through the verdict's pipeline's decider: one per pipeline in this process.

        Verdicts of one pipeline arrive together (a bad push fails hundreds of jobs at once).
        Decided one by one, each would read the chain, decide and append on its own; at once,
        they would conflict on the chain's version and decide again, O(n²). So the first verdict
        of a pipeline becomes its decider: it decides every verdict of the pipeline that
        arrives meanwhile, in batches, each batch on one read of the chain with one append. The
        provider calls are made afterwards by each verdict's own task, concurrently."""
        key = (verdict.source, verdict.project, verdict.pipeline_id)
        item = _Item(event, verdict, asyncio.get_running_loop().create_future(), release)
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(item)
        else:
            self._waiting[key] = [item]
            await self._run_decider(key)
        decided = await item.result
        if decided is None:
            return None
        decision, job, follow_up = decided
        if follow_up is not None:
            await self._follow_up(follow_up, job)
        return decision

    async def _run_decider(self, key: PipelineKey) -> None:
        waiting = self._waiting[key]
        batch: list[_Item] = []
        try:
            while waiting:
                batch = waiting[:BATCH]
                del waiting[:BATCH]
                await self._settle(batch)
        finally:
            del self._waiting[key]
            for item in batch + waiting:  # the decider was stopped: the messages come back
                if not item.result.done():
                    item.result.set_exception(DependencyUnavailable("act's decider stopped"))

    async def _settle(self, batch: list[_Item]) -> None:
        """Decide ``batch`` and hand each verdict its result. Should the batch fail, each
        verdict is decided alone, so that one bad verdict fails only its own message."""
        try:
            results = await self._decide_batch(batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].result.set_exception(exc)
                return
            for item in batch:
                await self._settle([item])
            return
        for item, result in zip(batch, results, strict=True):
            item.result.set_result(result)

    async def _decide_batch(self, batch: list[_Item]) -> list[_Decided | None]:
        """Decide every verdict of ``batch`` (one pipeline) on one read of its chain, each
        seeing the decisions before it, and append the decisions together, with the chain's
        pipeline versions as expected."""
        first = batch[0].verdict
        job_stream = pipeline_stream(first.source, first.project, first.pipeline_id)
        heads: dict[str, str | None | Unknown] = {}
        jobs = [i.verdict.job_event_id for i in batch if i.verdict.job_event_id is not None]
        for attempt in range(self.max_conflicts):
            # The batch's jobs: read with the chain's catching up when it is cached, else
            # together after its cold load; into the cached state (before the fork below), so
            # that they stay for the next batch.
            chain = await self.chains.load(first.source, first.project, first.pipeline_id,
                                           jobs=jobs)  # fmt: skip
            await prefetch_jobs(self.store, job_stream, chain.state, jobs)
            expected = chain.expected()
            # Several verdicts: each is decided with the ones before it counted, on a fork of
            # the cached state (which keeps only what the log holds, whatever the append does).
            state = chain.state.fork() if len(batch) > 1 else chain.state
            results: list[_Decided | None] = []
            news: list[NewEvent] = []
            again: set[Any] = set()  # verdicts decided in this batch (a verdict delivered twice)
            relinked = False
            for event, verdict in ((i.event, i.verdict) for i in batch):
                job = await find_job(
                    self.store, job_stream, state, verdict.job_id, verdict.job_event_id
                )
                if event.event_id in state.decided_verdicts:
                    # Decided before (a redelivery after a crash): finish what may be unfinished,
                    # unless it is decided in this very batch (its own task carries it out) or
                    # its call already failed (run_due tries again after the failure backoff,
                    # and counts the failures; an immediate call here would do neither).
                    earlier = _decision_for(state, event.event_id)
                    follow = (
                        earlier
                        if isinstance(earlier, RetryRequested)
                        and earlier.idempotency_key not in state.failing
                        and event.event_id not in again
                        else None
                    )
                    results.append((earlier, job, follow))
                    continue
                parked = state.parked.get(event.event_id)
                if parked is not None and not self._storm_ended(parked):
                    results.append((parked, job, None))  # its storm is still on: parked it stays
                    continue
                await self.chains.ensure_review(chain, job.ref if job else None)
                head: str | None | Unknown = UNKNOWN
                if verdict.retryable:
                    ref = job.ref if job is not None and job.ref else ""
                    if ref not in heads:
                        heads[ref] = await self._ref_head(verdict, job)
                    head = heads[ref]
                decision = decide(
                    state,
                    verdict,
                    self.policy,
                    job,
                    self.clock(),
                    verdict_event_id=event.event_id,
                    ref_head=head,
                    storm=self.storms.open_for(verdict) if self.storms is not None else None,
                )
                if (
                    isinstance(decision, RetryRequested)
                    and not decision.dry_run  # dry-run creates no pipelines: none can be linked
                    and chain.origin == verdict.pipeline_id
                    and verdict.pipeline_id not in state.links
                    and await self._linked_now(verdict)
                ):
                    relinked = True  # the pipeline is a rerun after all: its chain's budget
                    break
                if len(batch) > 1:
                    state.feed([decision])  # the next verdict sees it (budgets, broken stop)
                again.add(event.event_id)
                if isinstance(decision, RetryRequested):
                    key = decision.idempotency_key
                elif isinstance(decision, RetryParked):
                    key = f"act:park:{event.event_id}:{decision.storm_id}"
                else:
                    key = f"act:skip:{event.event_id}"
                news.append(
                    NewEvent(
                        stream=chain.stream,
                        data=decision,
                        metadata=metadata_from_context(causation=event, idempotency_key=key),
                    )
                )
                results.append(
                    (decision, job, decision if isinstance(decision, RetryRequested) else None)
                )
            if relinked:
                continue
            # Released verdicts were tracked when they were parked.
            trackings = [
                Tracking(self.consumer_name, i.event.event_id) for i in batch if not i.release
            ]
            if not news:
                await self._track(trackings)
                return results
            try:
                # One verdict: its tracking row commits with its decision. Several: the rows
                # follow the append; a crash between the two leaves decided verdicts that a
                # redelivery recognizes (``decided_verdicts``) and only tracks.
                await self.append(
                    news,
                    expected=expected,
                    tracking=trackings[0] if len(batch) == 1 and trackings else None,
                )
            except WrongExpectedVersion:
                # Someone appended to the chain since we read it: our numbers are stale.
                self.conflicts += 1
                # Jittered backoff keeps replicas racing on one hot chain from starving.
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
                continue
            except AlreadyProcessed:
                return [None]
            if len(batch) > 1:
                await self._track(trackings)
            for item, decided in zip(batch, results, strict=True):
                if item.event.event_id in again and decided is not None and decided[0] is not None:
                    _count(decided[0])
                    _log_decision(decided[0], item.verdict)
            return results
        raise TooMuchContention(f"{job_stream}: {self.max_conflicts} conflicting appends")

    def _storm_ended(self, parked: RetryParked) -> bool:
        """Whether the storm that parked a verdict has ended, as this replica has read the log
        (no breaker: nothing holds it any more)."""
        return self.storms is None or self.storms.has_ended(parked.storm_id)

    async def _track(self, trackings: list[Tracking]) -> None:
        """The batch's tracking rows in one round trip. A row that exists already (a
        redelivery, another replica) comes back as ``AlreadyProcessed``: tracked all the same."""
        if trackings:
            await self.store.append_tracked([TrackedAppend((), t) for t in trackings])

    async def _ref_head(
        self, verdict: VerdictReached, job: JobFinished | None
    ) -> str | None | Unknown:
        """Where the job's ref points now, for an action that creates a pipeline on its tip
        (GitLab): a rerun of a commit the branch has moved past is a different thing."""
        links = self.executors.links(verdict.source)
        if links is None or verdict.action not in PIPELINE_ACTIONS or job is None or not job.ref:
            return UNKNOWN
        async with self._provider(verdict.source):
            return await links.ref_head(verdict.project, job.ref)

    async def _linked_now(self, verdict: VerdictReached) -> bool:
        """Ask the provider whether act created the verdict's pipeline (once per pipeline);
        record the link when it did. True when a link was found (the chain must be reloaded)."""
        links = self.executors.links(verdict.source)
        key = (verdict.source, verdict.project, verdict.pipeline_id)
        if links is None or key in self._unlinked:
            return False
        async with self._provider(verdict.source):
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
        await self.append(
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
            await self.runner.close_dry_run(request)
        elif is_due(request, self.clock()):
            await self.runner.execute(request, job)
        # else: scheduled; run_due carries it out when not_before has passed.

def _decision_for(state: BudgetState, verdict_event_id: Any) -> RetryRequested | None:
    for request in state.requests.values():
        if request.verdict_event_id == verdict_event_id:
            return request
    return None




def _describe(span: Span, decision: Decision | None) -> None:
    """Decision and budget numbers on the span (no secrets, no log text)."""
    if decision is None:
        span.set_attribute("ciretry.decision", "already_decided")
        return
    snap = decision.snapshot
    what: str
    if isinstance(decision, RetryRequested):
        what = decision.action
    elif isinstance(decision, RetryParked):
        what = f"parked:{decision.storm_id}"
    else:
        what = f"skip:{decision.reason}"
    span.set_attribute("ciretry.decision", what)
    span.set_attribute("ciretry.budget.job_attempts", snap.job_attempts)
    span.set_attribute("ciretry.budget.job_limit", snap.job_limit)
    span.set_attribute("ciretry.budget.pipeline_retries", snap.pipeline_retries)
    span.set_attribute("ciretry.budget.pipeline_limit", snap.pipeline_limit)


def _count(decision: Decision) -> None:
    inst = instruments()
    if isinstance(decision, RetryRequested):
        inst.retries.add(1, {"outcome": "requested", "source": decision.source})
    elif isinstance(decision, RetryParked):
        inst.retries.add(1, {"outcome": "parked", "source": decision.source})
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
    elif isinstance(decision, RetryParked):
        fields |= {"decision": "parked", "storm": decision.storm_id, "detail": decision.detail}
        log.info(
            "act: parking the retry of job %s (%s) of %s: %s",
            decision.job_id,
            decision.job_name,
            decision.project,
            decision.detail,
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


__all__ = ["TooMuchContention", "VerdictHandler"]
