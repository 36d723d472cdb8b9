"""A breaker for calls to a CI provider, per provider.

After a provider failed to answer (``DependencyUnavailable``), it is not asked again for a while
(1 s, doubling to a minute), however many callers wait: they are handed back to the bus
meanwhile, so an outage costs one call per period, not one per redelivered message. Retries and
explanations each keep their own breaker (one's outage must not stop the other's calls).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ciretry.common.errors import DependencyUnavailable


class ProviderBreaker:
    def __init__(self, cap_s: float = 60.0) -> None:
        self.cap_s = cap_s
        #: source -> (monotonic time before which it is not asked again, failures in a row).
        self._down: dict[str, tuple[float, int]] = {}

    @asynccontextmanager
    async def call(self, source: str) -> AsyncIterator[None]:
        until, failures = self._down.get(source, (0.0, 0))
        if time.monotonic() < until:
            raise DependencyUnavailable(
                f"{source} did not answer a moment ago; asking again in "
                f"{until - time.monotonic():.1f} s"
            )
        try:
            yield
        except DependencyUnavailable:
            self._down[source] = (time.monotonic() + min(self.cap_s, 2.0**failures), failures + 1)
            raise
        self._down.pop(source, None)

    def reset(self) -> None:
        """Forget every failure: the providers are known to answer again."""
        self._down.clear()


__all__ = ["ProviderBreaker"]
