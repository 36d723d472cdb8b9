"""Before a process serves: reach PostgreSQL and NATS, say what is wrong, stop when asked.

Waiting for a dependency prints one line per attempt (``PostgreSQL at 127.0.0.1:5432 refused
the connection; retrying in 2 s (3/30)``) and ends with one message naming the cause; a stop
asked for meanwhile (SIGINT, SIGTERM) ends the wait at once. Every ``ciretry`` command exits
with one of the codes below (the README's Troubleshooting section lists them too).
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import asyncpg
import nats.errors

from .errors import is_transient

#: Finished, or stopped on request (Ctrl-C, SIGTERM).
EXIT_OK: Final = 0
#: Failed at run time: a server or a service died, or did not become ready (the message says
#: which, with the last lines of its log).
EXIT_FAILED: Final = 1
#: A configuration or usage error (the message names the variable or option).
EXIT_CONFIG: Final = 2
#: A port ciretry must listen on, or the data directory of ``ciretry up``, is taken by another
#: program (the message names it and what to do).
EXIT_IN_USE: Final = 3
#: PostgreSQL or NATS could not be reached (the message says which, where, and why).
EXIT_UNAVAILABLE: Final = 4

T = TypeVar("T")


class DependencyUnavailable(Exception):
    """PostgreSQL or NATS could not be reached; the message names it, where, and the cause."""


class PortInUse(Exception):
    """An address to listen on is taken; the message names it and what to do."""


class StopRequested(Exception):
    """A stop was asked for (signal) before the process was up; not an error."""


_DEFAULT_PORTS: Final = {"postgresql": 5432, "postgres": 5432, "nats": 4222, "tls": 4222}


def endpoint(what: str, url: str) -> str:
    """``PostgreSQL at host:port`` from a URL, without credentials (NATS URLs may be a list)."""
    places = []
    for one in url.split(","):
        try:
            parsed = urllib.parse.urlsplit(one.strip())
            port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme, 0)
            host = parsed.hostname or "localhost"
        except ValueError:
            places.append("?")
            continue
        places.append(f"{host}:{port}" if port else host)
    return f"{what} at {', '.join(places)}"


def why_failed(exc: BaseException) -> str:
    """The cause of a failed connection, as the end of a sentence about the server."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused the connection (nothing listens there)"
    if isinstance(exc, socket.gaierror):
        return "cannot be found (the host name does not resolve)"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | nats.errors.TimeoutError):
        return "did not answer in time"
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"refused the credentials: {_first_line(exc)}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"has no such database: {_first_line(exc)}"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return "is starting up or shutting down"
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return "has no free connection slot"
    if isinstance(exc, nats.errors.NoServersError):
        return "did not answer"
    if isinstance(exc, nats.errors.AuthorizationError):
        return "refused the credentials"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be reached: {exc.strerror.lower()}"
    return f"failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


async def until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event | None) -> T:
    """``await work``, unless ``stop`` is set first: then cancel it and raise StopRequested."""
    if stop is None:
        return await work
    if stop.is_set():
        work.close()
        raise StopRequested
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001, S110 - whatever it was doing no longer matters
        pass
    raise StopRequested


async def wait_for(
    what: str,
    connect: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    report: Callable[[str], None],
    stop: asyncio.Event | None = None,
    retryable: Callable[[BaseException], bool] = is_transient,
) -> T:
    """``connect()`` until it succeeds, ``attempts`` times at most, waiting 0.5 s doubling up to
    5 s in between; ``report`` gets one line per failed attempt. Raises DependencyUnavailable
    with the cause (at once for a failure that waiting cannot fix, such as a wrong password)."""
    delay = 0.5
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return await until_stopped(_call(connect), stop)
        except StopRequested:
            raise
        except Exception as exc:
            cause = why_failed(exc)
            if not retryable(exc):
                raise DependencyUnavailable(f"{what} {cause}") from exc
            if attempt == attempts:
                spent = time.monotonic() - started
                raise DependencyUnavailable(
                    f"{what} {cause}; gave up after {attempts} attempt(s) in {spent:.0f} s"
                ) from exc
            report(f"{what} {cause}; retrying in {delay:g} s ({attempt}/{attempts})")
        await until_stopped(asyncio.sleep(delay), stop)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")  # pragma: no cover - attempts >= 1 (config checks it)


async def _call(connect: Callable[[], Awaitable[T]]) -> T:
    return await connect()


def is_retryable_connect_error(exc: BaseException) -> bool:
    """Worth another attempt at connecting: the transient failures, and NATS not answering."""
    return is_transient(exc) or isinstance(exc, nats.errors.NoServersError)


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_IN_USE",
    "EXIT_UNAVAILABLE",
    "DependencyUnavailable",
    "PortInUse",
    "StopRequested",
    "endpoint",
    "is_retryable_connect_error",
    "until_stopped",
    "wait_for",
    "why_failed",
]
