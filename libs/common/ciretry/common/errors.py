"""Which failures are worth waiting out (transient) and which are the input's fault (poison)."""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
import nats.errors
import nats.js.errors

#: What decoding malformed JSON with msgspec raises: ``DecodeError``, and ``UnicodeDecodeError``
#: for invalid UTF-8 inside a string (the long chaos run's fuzzing found the second one turning
#: into a 503, and into a redelivery loop for pulse). Catch both wherever input is decoded.
MALFORMED_JSON: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeDecodeError)


class PoisonMessage(Exception):
    """Raised by a handler for input that will never succeed: terminate it, do not retry it."""


class DependencyUnavailable(Exception):
    """A dependency a handler cannot decide without (e.g. a CI provider's API) did not answer
    usefully: the message is worth trying again later, never skipping."""


_TRANSIENT_PG = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
)


def is_transient(exc: BaseException) -> bool:
    """True for failures of the infrastructure (database, bus, network) rather than the data."""
    return isinstance(
        exc,
        _TRANSIENT_PG
        + (
            DependencyUnavailable,
            ConnectionError,
            OSError,
            asyncio.TimeoutError,
            nats.errors.ConnectionClosedError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.OutboundBufferLimitError,
            nats.js.errors.ServiceUnavailableError,
        ),
    )
