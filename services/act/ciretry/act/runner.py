"""Carrying out retry requests: the side effect after the decision, once per request.

``RequestRunner.execute`` holds the request exclusively (``EventLog.exclusive``) for the length of
the provider call, checks that no outcome is recorded yet, calls the executor (which checks the
provider for an earlier retry before calling) and records the outcome under
``outcome_key(request)``, whose unique index makes "one outcome per request" a database fact. A
crash between the call and the outcome leaves the request open; whoever picks it up next
(redelivery or the scheduler, on any replica) finds the newer attempt at the provider and records
that instead of calling again (DESIGN 5).

The claim can be lost while the executor waits on the provider (it is a session lock: a database
restart or a dropped connection ends it, and nothing tells the holder). Another replica may then
take the request, check and call; this one's check, answered before that call, would say "not
done yet". So the executor asks whether the claim is still held after its check and before its
call (``Claim.held``), and a holder that lost it stops there: no call, no outcome
(``ClaimLost``). The same question (one round trip) also asks whether the outcome has been
recorded since the claim was taken: the claiming statement's snapshot can miss an outcome
recorded by a holder that released the request just as it was taken (``EventLog.exclusive``).

An outcome the database could not take (it restarted just after the call) is appended again
until it is taken (``RECORD_ATTEMPTS``, 0.5 s doubling to 5 s apart): this process is the only one
that knows the call was made. Dropped, the request stayed open, and its next executions had to
find the call at the provider; a provider outage then left them failing on the check until the
request was given up, recorded as failed although the job had been retried (the chaos run's
"provider calls = RetryIssued" with one call more than RetryIssued). Appending again is safe:
the outcome's key is unique, so whichever of this and a later holder's record comes first
stands.

Outcomes go through a group commit (``AppendBatcher``): the outcomes of requests running at once
share one transaction instead of one each. A transaction that fails fails each of its outcomes,
and each is appended again as above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ciretry.common.bus import Append, metadata_from_context
from ciretry.common.errors import is_transient
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    decision_stream,
)
from ciretry.common.groupcommit import AppendBatcher
from ciretry.common.metrics import instruments

from .budget import dry_run_outcome, outcome_key
from .executors import ClaimLost, Executors, Outcome

log = logging.getLogger("ciretry.act.service")

#: Appends of one outcome before giving up on the database (about two minutes in all).
RECORD_ATTEMPTS = 30

Sleep = Callable[[float], Awaitable[None]]


class RequestRunner:
    def __init__(
        self,
        store: EventLog,
        append: Append,
        executors: Executors,
        *,
        outcomes: AppendBatcher | None = None,
        max_failures: int = 5,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``outcomes``: the group commit the outcomes are appended through (the service's
        publishes them on the outbox fast path); None: one over the log alone (tests, tools:
        the outbox keeps the events for a sweeper). ``max_failures``: transient provider
        failures after which a request is given up (final RetryFailed). ``sleep``: the wait
        between appends of an outcome."""
        self.store = store
        self.append = append
        self.outcomes = outcomes if outcomes is not None else AppendBatcher(store, name="act")
        self.executors = executors
        self.max_failures = max_failures
        self.sleep = sleep

    async def execute(
        self, request: RetryRequested, job: JobFinished | None, *, failures: int = 0
    ) -> Outcome | None:
        """Carry out one request unless another replica is on it or it already has an outcome.
        Returns the provider outcome, or None when nothing was done here."""
        key = request.idempotency_key
        async with self.store.exclusive(key, unless=outcome_key(key)) as got:
            if not got:  # another replica holds it, or it has its outcome already
                return None
            executor = self.executors.get(request.source)
            started = time.monotonic()
            if executor is None:
                outcome = Outcome(issued=False, detail=f"no executor for {request.source}")
            else:
                try:
                    outcome = await executor.execute(request, job, confirm=got.held)
                except ClaimLost as exc:
                    log.warning("act: %s", exc, extra={"fields": {"idempotency_key": key}})
                    return None
            _log_call(request, outcome, time.monotonic() - started, failures)
            if await self._record_outcome(request, outcome, failures):
                got.done()  # its unlock may wait (``EventLog.exclusive``): a round trip saved
            return outcome

    async def close_dry_run(self, request: RetryRequested) -> None:
        """Record the call a dry-run request would have made (its outcome), and nothing else."""
        await self.append(
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

    async def _record_outcome(
        self, request: RetryRequested, outcome: Outcome, failures: int
    ) -> bool:
        """Append the outcome; True when it is the request's final one (``outcome_key``)."""
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
        event = NewEvent(
            stream=decision_stream(request),
            data=data,
            metadata=metadata_from_context(idempotency_key=meta_key),
        )
        for attempt in range(RECORD_ATTEMPTS):
            try:
                await self.outcomes.append([event])
                break
            except Exception as exc:
                if not is_transient(exc) or attempt + 1 == RECORD_ATTEMPTS:
                    raise
                delay = min(5.0, 0.5 * 2**attempt)
                log.warning("act: recording the outcome of %s: %s; again in %.1fs",
                            key, exc, delay)  # fmt: skip
                await self.sleep(delay)
        outcome_name = "issued" if isinstance(data, RetryIssued) else "failed"
        instruments().retries.add(1, {"outcome": outcome_name, "source": request.source})
        return meta_key == outcome_key(key)


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


__all__ = ["RequestRunner"]
