"""One listing of a pipeline's jobs for the requests of that pipeline running at once.

Before each retry call the executor lists the pipeline's jobs, looking for a newer attempt
(``base``). The failed jobs of a pipeline arrive together, are decided in one batch and carried
out concurrently, each request under its own claim: each listed the same pipeline, every page,
a moment apart (the end-to-end bench: a fifth of act's CPU, and of the fake provider's). Here
they share one listing (``SharedListings``): a request joins its pipeline's listing that has not
been sent yet, or else opens one, which waits a couple of milliseconds (``WINDOW_S``) for others
to join, and for the pipeline's listing already on its way, if any, to come back (one on its
way per pipeline: a pipeline of many pages is not listed again every window), and is then
fetched once, every page. Each request then looks in it for its own job's newer attempt.

Why that is as safe as a listing of its own: the check must see every retry made before the
request's claim was taken (``base``). The executor asks for a listing only while its caller
holds the claim, and a request joins only a listing whose first request has not been sent yet
(it stops taking joiners just before it is sent), so every listing a request uses was sent
after its claim was taken. A listing already on its way is never joined, however fresh, and a
request that goes round again after a transient failure (``HttpClient.retrying``) asks again: it
gets a listing sent after its earlier one failed.

What one fetch saw reaches each request that shared it as a value (``Listing``): the pages that
came back, in order, then what ended the listing early (an answer other than 200, a transient
error). A request looks through the pages and meets the failure only after them, as it would
have listing alone (it stops at the first page holding a newer attempt of its job); each meets a
failure of its own (``CannotCheck`` built for it, a copy of the transient error).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ciretry.common.http import ApiResponse, TransientError

from .base import CannotCheck

#: How long a new listing waits for the other requests of its pipeline (their claims are taken
#: a moment apart) before it is sent: a couple of milliseconds on a retry call.
WINDOW_S = 0.002

K = TypeVar("K", bound=Hashable)


async def _window() -> None:
    await asyncio.sleep(WINDOW_S)


@dataclass(frozen=True, slots=True)
class Listing:
    """What one fetch of a listing got: the rows (jobs) of each page that came back, first to
    last, and what ended it early, if anything: an answer other than 200 (``refused``) or a
    transient error (``failed``). Each page's rows are indexed by name once, for all who share
    it (a pipeline of thousands of jobs is not scanned once per request)."""

    pages: tuple[list[Any], ...] = ()
    refused: ApiResponse | None = None
    failed: TransientError | None = None
    _by_name: tuple[dict[str | None, list[Any]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: list[dict[str | None, list[Any]]] = []
        for rows in self.pages:
            named: dict[str | None, list[Any]] = {}
            for row in rows:
                name = row.get("name")
                named.setdefault(name if isinstance(name, str) else None, []).append(row)
            index.append(named)
        object.__setattr__(self, "_by_name", tuple(index))

    def named(self, name: str, what: str) -> Iterator[list[Any]]:
        """The rows called ``name`` of each page, page by page; then, if the listing ended early,
        raise what a request listing alone would have met there: ``CannotCheck`` (``what``
        could not be done) or the transient error (a copy: each request's retry loop notes its
        own attempts on it)."""
        for named in self._by_name:
            yield named.get(name, [])
        if self.refused is not None:
            raise CannotCheck(what, self.refused)
        if self.failed is not None:
            raise copy.copy(self.failed)


class SharedListings(Generic[K]):
    """Listings by key (a pipeline), each fetched once for every request that joined it before
    it was sent (module doc). ``fetch(key)`` fetches one, every page; a transient error goes
    into its ``Listing`` (``failed``), anything else raised reaches every joiner. ``gather``:
    what a new listing awaits while others join (``WINDOW_S`` by default)."""

    def __init__(
        self,
        fetch: Callable[[K], Awaitable[Listing]],
        *,
        gather: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._fetch = fetch
        self._gather = gather or _window
        #: Listings not sent yet: the ones a request may join.
        self._open: dict[K, asyncio.Task[Listing]] = {}
        #: The listing of each key on its way (sent, not answered yet).
        self._sent: dict[K, asyncio.Task[Listing]] = {}
        #: Every listing under way (the loop keeps only weak references to tasks).
        self._running: set[asyncio.Task[Listing]] = set()

    async def get(self, key: K) -> Listing:
        """A listing of ``key`` whose first request is sent after this call began."""
        task = self._open.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._wait_then_fetch(key))
            self._open[key] = task
            self._running.add(task)
            task.add_done_callback(self._finished)
        # A joiner that is cancelled leaves the listing to the others.
        return await asyncio.shield(task)

    async def _wait_then_fetch(self, key: K) -> Listing:
        try:
            await self._gather()
            # One listing of a key on its way at a time: the requests that come meanwhile
            # gather for the next (as a group commit does), however long this one takes.
            before = self._sent.get(key)
            if before is not None:
                await asyncio.wait([before])
        finally:
            # From here on no one joins: the listing is sent next, after every joiner's claim.
            del self._open[key]
        this = asyncio.current_task()
        assert this is not None
        self._sent[key] = this
        try:
            return await self._fetch(key)
        finally:
            if self._sent.get(key) is this:
                del self._sent[key]

    def _finished(self, task: asyncio.Task[Listing]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here too, should every joiner have been cancelled

    async def close(self) -> None:
        """Cancel the listings under way (their joiners see ``CancelledError``)."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
