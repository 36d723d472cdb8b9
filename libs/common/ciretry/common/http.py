"""HTTP to the CI providers: one client over an injectable transport.

The seam is httpx's: a ``Transport`` sends one ``Request`` and returns a ``Response`` whose body
is read as a stream; it follows no redirects and applies no policy. ``AiohttpTransport`` speaks
HTTP over an aiohttp session (production, and the tests against the real-HTTP fake providers);
``FunctionTransport`` answers in-process from a function of the request (pure tests of everything
above it).

``HttpClient`` is the one client every service uses, and holds what they all want done the same
way: a base URL, headers, credentials (fixed, or computed per request as Hawk's are) sent only to
the base URL's origin, redirects followed (credentials dropped when one leaves that origin), a
timeout, and the token scrubbed from any text it hands back. Its answer to a 429, a 5xx or no
answer at all (connection refused or reset, a timeout, a body cut short) is a ``TransientError``;
``retrying`` runs an operation again after one, waiting what Retry-After says when the provider
says it, else a jittered exponential backoff, a bounded number of times, and gives up early when
the provider asks for a longer wait than the caller will spend. Every other status is the caller's
to judge (a 404 is final for one caller and worth another try for another).

Pure apart from the aiohttp transport; tokens go into request headers only and nothing here logs
headers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import inspect
import logging
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import aiohttp
import msgspec
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Params = Mapping[str, str] | Sequence[tuple[str, str]]
#: Credentials for one request, from its method and URL (Hawk signs both).
Auth = Callable[[str, str], Mapping[str, str]]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
#: How much of an API answer's text is kept (error details, outcomes), after scrubbing.
TEXT_KEPT = 500


@dataclass(frozen=True, slots=True)
class Timeout:
    """``total`` bounds the whole exchange, body included; ``read`` the wait for each chunk."""

    total: float
    read: float | None = None


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    #: With its query: what is signed (Hawk) is what is sent.
    headers: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    timeout: Timeout | None = None

    @property
    def path(self) -> str:
        """The URL's path as sent (quoted: a GitLab project path keeps its ``%2F``)."""
        return urlsplit(self.url).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))


class Response:
    """A status, headers (case-insensitive) and a body read as a stream; ``aclose`` gives the
    connection back (``HttpClient.stream`` does it at the end). This one holds its body in
    memory, as the chunks given; transports subclass it to read from the network."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        content: bytes | Iterable[bytes] = b"",
    ) -> None:
        self.status = status
        self.headers: Mapping[str, str] = CIMultiDictProxy(CIMultiDict(headers or {}))
        self._content = [content] if isinstance(content, bytes) else list(content)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length", "")
        return int(value) if value.isdigit() else None

    async def iter_bytes(self, chunk_size: int = 64 * 1024) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, in chunks of at most ``chunk_size`` bytes."""
        for piece in self._content:
            for start in range(0, len(piece), chunk_size):
                yield piece[start : start + chunk_size]

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_bytes()])

    async def aclose(self) -> None:
        return None


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer, as a ``FunctionTransport`` handler returns one."""
    body = msgspec.json.encode(data)
    return Response(
        status,
        {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})},
        body,
    )


class TransientError(Exception):
    """The provider did not answer usefully (429, 5xx, or no answer): worth another try.
    ``attempts`` is how many were made when ``retrying`` gave up."""

    def __init__(
        self, detail: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.retry_after = retry_after
        self.attempts = 1


class TransportError(TransientError):
    """No answer: the connection was refused or reset, timed out, or the body was cut short.
    ``sent``: whether the request may have reached the provider (False only when no connection
    could be made); a call that may have reached it may have been carried out, answer or not."""

    def __init__(self, detail: str, *, sent: bool = True) -> None:
        super().__init__(detail)
        self.sent = sent


class Transport(Protocol):
    async def send(self, request: Request) -> Response:
        """The provider's answer, its body not yet read; ``TransportError`` when none came."""
        ...

    async def aclose(self) -> None: ...


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AiohttpTransport:
    """HTTP over an aiohttp session: the given one, or its own (closed by ``aclose``), each
    call to ``peer`` (when named) a provider-call span (``telemetry.ProviderCallSpans``)."""

    def __init__(self, session: aiohttp.ClientSession | None = None, *, peer: str | None = None):
        from .telemetry import ProviderCallSpans

        self._own = session is None
        self._session = session if session is not None else aiohttp.ClientSession()
        self._spans = ProviderCallSpans(peer) if peer else None

    async def send(self, request: Request) -> Response:
        options: dict[str, Any] = {}
        if request.timeout is not None:
            options["timeout"] = aiohttp.ClientTimeout(
                total=request.timeout.total, sock_read=request.timeout.read
            )
        url = yarl.URL(request.url)
        headers = dict(request.headers)
        spans = self._spans
        call = spans.start(request.method, url, headers) if spans is not None else None
        try:
            resp = await self._session.request(
                request.method,
                url,
                json=request.json,
                headers=headers,
                allow_redirects=False,
                **options,
            )
        except BaseException as exc:
            if spans is not None and call is not None:
                spans.finish(call, None, exc)
            if isinstance(exc, aiohttp.ClientConnectorError):  # no connection: nothing was sent
                raise TransportError(_describe(exc), sent=False) from None
            if isinstance(exc, TimeoutError | aiohttp.ClientError):
                raise TransportError(_describe(exc)) from None
            raise
        if spans is not None and call is not None:
            spans.finish(call, resp.status, None)
        return _AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._own:
            await self._session.close()


class _AiohttpResponse(Response):
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        super().__init__(resp.status)
        self.headers = resp.headers
        self._resp = resp

    async def iter_bytes(self, chunk_size: int = 64 * 1024) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._resp.content.iter_chunked(chunk_size):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(_describe(exc)) from None

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(_describe(exc)) from None

    async def aclose(self) -> None:
        # An unread body closes the connection rather than returning it to the pool.
        self._resp.release()


Handler = Callable[[Request], Response | Awaitable[Response]]


class FunctionTransport:
    """Answers in-process from ``handler(request)`` (httpx's MockTransport): no server, no
    sockets. The handler may raise ``TransportError`` to stand for no answer; one that takes
    longer than the request's timeout is cut off with one, as a network transport would be."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def send(self, request: Request) -> Response:
        answer = self._handler(request)
        if not inspect.isawaitable(answer):
            return answer
        try:
            async with asyncio.timeout(request.timeout.total if request.timeout else None):
                return await answer
        except TimeoutError:
            raise TransportError("TimeoutError: no answer in time") from None

    async def aclose(self) -> None:
        return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def rate_limit_reset(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds until the provider's rate-limit window resets, when the answer says no request
    is left in it (GitLab's ``RateLimit-Remaining``/``RateLimit-Reset``, GitHub's
    ``X-RateLimit-*``; the reset as a Unix time). None: requests remain, or it does not say."""
    for prefix in ("RateLimit-", "X-RateLimit-"):
        remaining = headers.get(prefix + "Remaining")
        if remaining is None:
            continue
        reset = headers.get(prefix + "Reset")
        if remaining.strip() != "0" or reset is None or not reset.strip().isdigit():
            return None
        return max(0.0, float(reset) - (time.time() if now is None else now))
    return None


def transient_status(status: int) -> bool:
    """429 (slow down) and 5xx (the provider's own trouble) are worth another try."""
    return status == 429 or status >= 500


@dataclass(frozen=True, slots=True)
class HttpSettings:
    timeout_s: float = 15.0
    #: The longest wait for the next chunk of a body (a stalled stream), within ``timeout_s``.
    read_timeout_s: float | None = None
    #: Tries before giving up on transient errors (``retrying``).
    max_attempts: int = 4
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    #: A Retry-After longer than this is not waited for: ``retrying`` gives up at once, and the
    #: caller comes back later.
    retry_after_cap_s: float = 120.0
    #: Requests to the provider under way at once from this client (a stream holds its slot
    #: until its body is read): a burst of failures must not open hundreds of connections.
    max_in_flight: int = 16

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")

    @property
    def timeout(self) -> Timeout:
        return Timeout(self.timeout_s, self.read_timeout_s)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before try ``attempt + 1`` (``attempt`` counts from 0): Retry-After when the
        provider gave one, else exponential backoff with jitter (so replicas spread out)."""
        if retry_after is not None:
            return retry_after
        backoff = min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)
        return float(backoff * random.uniform(0.5, 1.0))


#: Defaults for an API call: callers pass their own where they differ.
DEFAULT_SETTINGS = HttpSettings()


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """An API answer read whole: ``data`` is its JSON (None when it has none), ``text`` the
    start of its body with the token scrubbed."""

    status: int
    headers: Mapping[str, str]
    data: Any
    text: str


class HttpClient:
    """Requests to one provider's API over a transport (module doc). ``path`` arguments are
    relative to ``base_url``; an absolute URL is taken as it is (and gets no credentials unless
    it is on the base URL's origin)."""

    def __init__(
        self,
        transport: Transport,
        base_url: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        credentials: Mapping[str, str] | Auth | None = None,
        secret: str = "",
        settings: HttpSettings = DEFAULT_SETTINGS,
        sleep: Sleep | None = None,
    ) -> None:
        self.transport = transport
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self._headers = dict(headers or {})
        self._credentials = credentials
        self._secret = secret
        self._sleep = sleep or asyncio.sleep
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        #: Wall-clock time before which the provider said no request is left (rate limit).
        self._limited_until = 0.0

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path

    def _headers_for(self, method: str, url: str) -> dict[str, str]:
        headers = dict(self._headers)
        if self._credentials is not None and _origin(url) == _origin(self.url("/")):
            credentials = self._credentials
            headers.update(credentials(method, url) if callable(credentials) else credentials)
        return headers

    def _label(self, method: str, path: str) -> str:
        # Paths only: a URL's query may be a signature (blob storage links).
        return f"{method} {urlsplit(path).path}"

    async def _open(self, method: str, path: str, params: Params | None, json: Any) -> Response:
        """The answer after redirects, body unread; 429/5xx and no answer raise."""
        label = self._label(method, path)
        url = with_query(self.url(path), params)
        for _ in range(MAX_REDIRECTS + 1):
            request = Request(
                method, url, self._headers_for(method, url), json, self.settings.timeout
            )
            try:
                response = await self.transport.send(request)
            except TransportError as exc:
                raise TransportError(f"{label}: {self.scrub(str(exc))}", sent=exc.sent) from None
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or not location:
                break
            await response.aclose()
            url = urljoin(url, location)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, json = "GET", None
        else:
            raise TransientError(f"{label}: more than {MAX_REDIRECTS} redirects")
        if transient_status(response.status):
            try:
                start = await self._start_of(response)
            finally:
                await response.aclose()
            raise TransientError(
                f"{label}: HTTP {response.status}: {start[:200]}",
                response.status,
                parse_retry_after(response.headers.get("Retry-After")),
            )
        return response

    async def _start_of(self, response: Response) -> str:
        chunks = response.iter_bytes(4096)
        try:
            first = await anext(chunks, b"")
        except TransportError:
            first = b""  # the status says enough
        finally:
            await chunks.aclose()
        return self.scrub(first.decode("utf-8", "replace"))

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, params: Params | None = None, json: Any = None
    ) -> AsyncIterator[Response]:
        """``async with client.stream("GET", path) as response``: the body read as it arrives
        (``response.iter_bytes``), the connection given back at the end. A body cut short raises
        ``TransportError``."""
        async with self._slots:
            await self._within_rate_limit(method, path)
            response = await self._open(method, path, params, json)
            reset = rate_limit_reset(response.headers)
            if reset is not None:
                self._limited_until = max(self._limited_until, time.time() + reset)
            try:
                yield response
            except TransportError as exc:
                raise TransportError(
                    f"{self._label(method, path)}: {self.scrub(str(exc))}"
                ) from None
            finally:
                await response.aclose()

    async def _within_rate_limit(self, method: str, path: str) -> None:
        """Wait out a rate-limit window the provider said is used up, or, when that is longer
        than the settings allow, fail as a 429 would (the caller comes back later)."""
        wait = self._limited_until - time.time()
        if wait <= 0:
            return
        if wait > self.settings.retry_after_cap_s:
            raise TransientError(
                f"{self._label(method, path)}: rate limit used up for {wait:.0f} s", 429, wait
            )
        await self._sleep(wait)

    async def request(
        self, method: str, path: str, *, params: Params | None = None, json: Any = None
    ) -> ApiResponse:
        """One API call, its answer read whole and its JSON decoded."""
        async with self.stream(method, path, params=params, json=json) as response:
            body = await response.read()
        data: Any = None
        if body:
            try:
                data = msgspec.json.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError):
                data = None
        text = self.scrub(body[: TEXT_KEPT * 4].decode("utf-8", "replace")[:TEXT_KEPT])
        return ApiResponse(response.status, response.headers, data, text)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """``attempt()``, again after each ``TransientError`` as the settings say (module doc).
        The last error is raised when the tries run out, or at once when the provider asks for
        a wait longer than ``retry_after_cap_s``."""
        settings = self.settings
        for n in range(settings.max_attempts):
            try:
                return await attempt()
            except TransientError as exc:
                exc.attempts = n + 1
                delay = settings.delay(n, exc.retry_after)
                if n + 1 >= settings.max_attempts or delay > settings.retry_after_cap_s:
                    raise
                log.warning("%s: %s; again in %.1fs", what, exc, delay)
                await self._sleep(delay)
        raise AssertionError("max_attempts is at least 1")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def query_pairs(params: Params | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    return list(params.items()) if isinstance(params, Mapping) else list(params)


def with_query(url: str, params: Params | None) -> str:
    """``url`` with ``params`` added to its query, encoded as a form would be."""
    pairs = query_pairs(params)
    if not pairs:
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{urlencode(pairs)}"


__all__ = [
    "AiohttpTransport",
    "ApiResponse",
    "DEFAULT_SETTINGS",
    "FunctionTransport",
    "HttpClient",
    "HttpSettings",
    "Request",
    "Response",
    "Timeout",
    "Transport",
    "TransientError",
    "TransportError",
    "json_response",
    "parse_retry_after",
    "query_pairs",
    "rate_limit_reset",
    "transient_status",
    "with_query",
]
