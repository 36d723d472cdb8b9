"""The check-then-call loop every executor runs, and what it returns.

Look at the provider for a newer attempt of the job (if there is one, the retry already happened
— maybe by us before a crash — and nothing is called), then call; on 429/5xx/timeouts of the
check, and on a call the provider refused to start (429, 503, no connection), wait (Retry-After
when given, else jittered exponential backoff: ``HttpClient.retrying``) and go round again,
check included. A call that may have been carried out without an answer coming back (a timeout
or a dropped connection once the request went out, a 500, 502 or 504: ``may_have_acted``) ends
the execution instead (``will_retry``): a provider slow enough to miss the timeout may still be
carrying it out, and a check a second later would not see it yet and call again. The next
execution, after the request's failure backoff, checks first. The result is an ``Outcome``
value; the service turns it into RetryIssued / RetryFailed.

Just before it calls (after the check), the executor asks whether it still holds the request
(``confirm``: ``Claim.held``): a claim dies with its database connection, and a replica that
has meanwhile taken the request over may already have checked and called; calling now too would
retry twice. A lost claim stops the executor (``ClaimLost``) without a call or an outcome: the
request is the new holder's.

The check is made while the request is held, so that it sees every retry made before the
claim was taken (by us before a crash, or by a person). Requests of one pipeline checked at
once may share one listing of its jobs (``listings``), but only a listing sent after each
sharer's claim was taken.

The check fails closed: when the provider does not answer it with 200 (a 403 after a token
rotation, a 400 from a proxy), nothing is called (``CannotCheck``): the request stays pending and
is tried again after its failure backoff (``will_retry``), because calling without knowing could
retry twice. A 404 (the pipeline or task is gone) is final: there is nothing left to retry.

Tokens go only into request headers; nothing here logs headers, and provider text copied into an
outcome is scrubbed of the token (``HttpClient``) in case a provider echoes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from ciretry.common.events import JobFinished, Resources, RetryRequested
from ciretry.common.http import (
    DEFAULT_SETTINGS,
    AiohttpTransport,
    ApiResponse,
    HttpClient,
    HttpSettings,
    Sleep,
    TransientError,
    Transport,
    TransportError,
)
from ciretry.common.providers import ProviderApi


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    issued: bool
    new_job_id: str | None = None
    new_pipeline_id: str | None = None
    found_existing: bool = False
    status: int | None = None
    detail: str = ""
    #: A failure worth trying again later (the provider was down or rate-limited us).
    will_retry: bool = False


#: Whether the caller still holds the request (``Claim.held``), asked just before each call.
Confirm = Callable[[], Awaitable[bool]]


async def unclaimed() -> bool:
    """``Confirm`` for a caller that holds nothing (a tool, a test of the executor alone)."""
    return True


class ClaimLost(Exception):
    """The request was no longer held (or its outcome was recorded meanwhile) when the executor
    was about to call: nothing was called."""


#: Answers after which a call may have been carried out (the provider, or a gateway in front of
#: it, gave up on a request it may have finished).
MAY_HAVE_ACTED = frozenset({500, 502, 504})


def may_have_acted(exc: TransientError) -> bool:
    """Whether the call that failed with ``exc`` may have been carried out all the same."""
    if isinstance(exc, TransportError):
        return exc.sent
    return exc.status in MAY_HAVE_ACTED


class _Unanswered(Exception):
    """A call that may have been carried out got no answer (``may_have_acted``)."""

    def __init__(self, cause: TransientError) -> None:
        super().__init__(str(cause))
        self.status = cause.status


class Executor(Protocol):
    source: str

    async def execute(
        self, request: RetryRequested, job: JobFinished | None, *, confirm: Confirm = unclaimed
    ) -> Outcome:
        """Check, then call unless the check found the retry done or ``confirm`` says the
        request is no longer held (``ClaimLost``: nothing called)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PipelineOrigin:
    """How a provider says a pipeline was created by act: the request's key and the size the
    pipeline asked for."""

    retry_of: str
    resources: Resources | None = None


class PipelineLinks(Protocol):
    """Providers whose retries can leave their pipeline (GitLab creates new ones) answer where a
    pipeline came from, and where a ref's tip is (where a new pipeline would run)."""

    async def pipeline_link(self, project: str, pipeline_id: str) -> PipelineOrigin | None: ...

    async def ref_head(self, project: str, ref: str) -> str | None: ...


class CannotCheck(Exception):
    """The check before acting got an answer other than 200: act must not call (fail closed)."""

    def __init__(self, what: str, resp: ApiResponse) -> None:
        super().__init__(f"cannot {what}: HTTP {resp.status}: {resp.text[:200]}")
        self.status = resp.status


class CheckingExecutor:
    """The check-then-call loop (module doc) over one provider's ``HttpClient``, built from the
    provider's API conventions (``api``) for the instance at ``base_url`` with ``token``. A
    provider says how to find a newer attempt (``find_newer``), how to call (``call``) and which
    requests it cannot serve at all (``unsupported``). Without a ``transport``, the executor
    makes its own aiohttp one (its calls traced as ``source``) and ``close`` closes it."""

    source = ""
    api: ProviderApi

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        settings: HttpSettings = DEFAULT_SETTINGS,
        transport: Transport | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self._owns_transport = transport is None
        self.http: HttpClient = self.api.client(
            transport or AiohttpTransport(peer=self.source),
            base_url,
            token,
            settings=settings,
            sleep=sleep,
        )

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        raise NotImplementedError

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        raise NotImplementedError

    def unsupported(self, request: RetryRequested) -> str | None:
        return None

    async def _round(
        self, request: RetryRequested, job: JobFinished | None, confirm: Confirm
    ) -> Outcome:
        found = await self.find_newer(request, job)
        if found is not None:
            return found
        if not await confirm():
            raise ClaimLost(
                f"{request.idempotency_key}: no longer held, or done meanwhile; not calling"
            )
        try:
            return await self.call(request, job)
        except TransientError as exc:
            if may_have_acted(exc):
                raise _Unanswered(exc) from None
            raise

    async def execute(
        self, request: RetryRequested, job: JobFinished | None, *, confirm: Confirm = unclaimed
    ) -> Outcome:
        why = self.unsupported(request)
        if why is not None:
            return Outcome(issued=False, detail=why, will_retry=False)
        try:
            return await self.http.retrying(
                lambda: self._round(request, job, confirm),
                f"{self.source} {request.idempotency_key}",
            )
        except _Unanswered as exc:
            detail = (
                f"no answer to the call, which may have been carried out: checked again after "
                f"the failure backoff, not called again now: {exc}"
            )
            return Outcome(issued=False, status=exc.status, detail=detail[:500], will_retry=True)
        except CannotCheck as exc:
            gone = exc.status == 404
            return Outcome(
                issued=False,
                status=exc.status,
                detail=f"check before acting failed, not calling: {exc}"[:500],
                will_retry=not gone,
            )
        except TransientError as exc:
            return Outcome(issued=False, status=exc.status, detail=str(exc)[:500], will_retry=True)

    async def close(self) -> None:
        if self._owns_transport:
            await self.http.transport.aclose()

    @staticmethod
    def refused(resp: ApiResponse, what: str) -> Outcome:
        return Outcome(
            issued=False,
            status=resp.status,
            detail=f"{what}: HTTP {resp.status}: {resp.text[:300]}",
            will_retry=False,
        )


def newer_id(a: str, b: str) -> bool:
    """``a`` is a later id than ``b``: numerically when both are numbers, else as text."""
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a > b
