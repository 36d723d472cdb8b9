"""A fake HTTP service reachable two ways: over real HTTP (an aiohttp server on 127.0.0.1) and
in-process (``transport()``: a ``FunctionTransport``, no sockets). Both go through ``answer``, so
a fake provider written once is the same fake on either path: the pure tests talk to it
in-process, and at least one test per provider talks to it over real HTTP.

Routes are ``(method, "/path/{name}/...")`` patterns whose ``{name}`` matches one path segment
as sent (a quoted GitLab project path stays one segment). Every call is recorded; failures are
injected per route prefix (``fail[(method, path_prefix)] = [503, 429, ...]``), with ``retry_after``
sent alongside; ``stall`` makes the next call that changes something (POST, PUT: what a retry
is) act and then answer too late (a client timeout after the provider acted): over HTTP the server waits ``stall`` seconds, in-process the transport
raises ``TransportError`` at once. ``hold(method, fragment)`` answers the next matching call (from
the state the fake is in then) but keeps the answer until the test releases it: a provider slow
to answer, with the test choosing what happens meanwhile; with ``before=True`` the call waits
before it is carried out (a provider slow to act: over HTTP it acts once released even if the
client gave up meanwhile, as a real server does).
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer

from ciretry.common.http import (
    AiohttpTransport,
    FunctionTransport,
    Request,
    Response,
    Transport,
    TransportError,
)

#: The base URL a fake answers to in-process (any host would do: nothing is resolved).
IN_PROCESS_URL = "http://fake.invalid"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    #: The query as sent, repeated keys included (``scope[]=failed&scope[]=canceled``).
    params: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: Sent in pieces of this many bytes, without a Content-Length (a streamed log).
    chunk: int | None = None
    #: No answer at all: the connection is dropped.
    drop: bool = False

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(
            status,
            msgspec.json.encode(data),
            {"Content-Type": "application/json", **(headers or {})},
        )

    @classmethod
    def dropped(cls) -> Reply:
        return cls(0, drop=True)

    @classmethod
    def redirect(cls, location: str) -> Reply:
        return cls(302, headers={"Location": location})

    @classmethod
    def gzipped(cls, body: bytes) -> Reply:
        """A gzip file served as it is, without Content-Encoding (Taskcluster's artifacts)."""
        return cls(200, gzip.compress(body), {"Content-Type": "text/plain"})


Route = Callable[[Call, dict[str, str]], Reply | Awaitable[Reply]]


@dataclass
class Hold:
    """The next call of ``method`` whose path holds ``fragment``: answered, then held until
    ``release()`` (``before``: held, then carried out and answered). ``arrived`` is set when it
    starts waiting, ``done`` once it has been carried out and answered."""

    method: str
    fragment: str
    before: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()

    async def wait(self) -> None:
        self.arrived.set()
        await self.released.wait()


class FakeHttp:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.fail: dict[tuple[str, str], list[int]] = {}
        self.retry_after: str | None = None
        self.stall = 0.0
        self.holds: list[Hold] = []
        self.server: TestServer | None = None
        self._routes: list[tuple[str, re.Pattern[str], Route]] = []

    def route(self, method: str, pattern: str, handler: Route) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern))
        self._routes.append((method, re.compile(regex + "$"), handler))

    @property
    def url(self) -> str:
        """Where the fake answers: its server once started, else in-process."""
        if self.server is None:
            return IN_PROCESS_URL
        return str(self.server.make_url("")).rstrip("/")

    def hold(self, method: str, fragment: str, *, before: bool = False) -> Hold:
        """Hold the answer to the next call of ``method`` whose path holds ``fragment`` (with
        ``before``, the call itself, before it is carried out)."""
        held = Hold(method, fragment, before)
        self.holds.append(held)
        return held

    def posts(self, fragment: str = "") -> list[Call]:
        return self.calls_of("POST", fragment)

    def calls_of(self, method: str, fragment: str = "") -> list[Call]:
        """The calls of ``method`` whose path holds ``fragment``."""
        return [c for c in self.calls if c.method == method and fragment in c.path]

    async def answer(self, call: Call) -> tuple[Reply, float]:
        """The reply to ``call`` and how long to stall it (recorded, failures injected)."""
        self.calls.append(call)
        for (method, prefix), statuses in self.fail.items():
            if call.method == method and call.path.startswith(prefix) and statuses:
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return Reply.json({"message": "injected"}, statuses.pop(0), headers), 0.0
        stall = 0.0
        if call.method in ("POST", "PUT") and self.stall:
            stall, self.stall = self.stall, 0.0
        for method, regex, handler in self._routes:
            match = regex.match(call.path)
            if method == call.method and match:
                held = next(
                    (h for h in self.holds if h.method == call.method and h.fragment in call.path),
                    None,
                )
                if held is not None:
                    self.holds.remove(held)
                    if held.before:
                        await held.wait()
                reply = handler(call, match.groupdict())
                if inspect.isawaitable(reply):
                    reply = await reply
                if held is not None:
                    if not held.before:
                        await held.wait()
                    held.done.set()
                return reply, stall
        return Reply.json({"message": "404 Not found"}, 404), 0.0

    # --- in-process ---------------------------------------------------------------------------

    def transport(self) -> FunctionTransport:
        return FunctionTransport(self._send)

    async def _send(self, request: Request) -> Response:
        parts = urlsplit(request.url)
        params = parse_qsl(parts.query, keep_blank_values=True)
        # What the wire would carry: the body as JSON text, decoded again.
        body = (
            None if request.json is None else msgspec.json.decode(msgspec.json.encode(request.json))
        )
        call = Call(request.method, parts.path, dict(params), dict(request.headers), body, params)
        reply, stall = await self.answer(call)
        if reply.drop:
            raise TransportError("ServerDisconnectedError: the provider dropped the connection")
        if stall:
            raise TransportError("TimeoutError: the provider answered too late")
        headers = dict(reply.headers)
        if reply.chunk is None:
            return Response(
                reply.status, {**headers, "Content-Length": str(len(reply.body))}, reply.body
            )
        pieces = [reply.body[i : i + reply.chunk] for i in range(0, len(reply.body), reply.chunk)]
        return Response(reply.status, headers, pieces)

    # --- over HTTP ----------------------------------------------------------------------------

    async def started(self) -> Self:
        """Serving over HTTP on 127.0.0.1 (``url`` says where)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        params = list(request.rel_url.query.items())
        call = Call(
            request.method,
            request.rel_url.raw_path,
            dict(request.query),
            dict(request.headers),
            body,
            params,
        )
        reply, stall = await self.answer(call)
        if reply.drop:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=503)  # never written: the connection is gone
        if stall:
            await asyncio.sleep(stall)
        if reply.chunk is None:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        await response.prepare(request)
        for i in range(0, len(reply.body), reply.chunk):
            await response.write(reply.body[i : i + reply.chunk])
        await response.write_eof()
        return response


F = TypeVar("F", bound=FakeHttp)


@asynccontextmanager
async def running(fake: F, where: str) -> AsyncIterator[F]:
    """``fake`` answering in-process, or served over HTTP when ``where`` is ``"served"`` (the
    value of a fixture parametrized by ``["in-process", "served"]``); closed at the end."""
    if where == "served":
        await fake.started()
    try:
        yield fake
    finally:
        await fake.close()


@asynccontextmanager
async def reaching(fake: FakeHttp) -> AsyncIterator[Transport]:
    """A transport to ``fake``: its own in-process one, or an aiohttp session of its own when
    the fake is served over HTTP (closed at the end)."""
    if fake.server is None:
        yield fake.transport()
        return
    transport = AiohttpTransport()
    try:
        yield transport
    finally:
        await transport.aclose()


class Sleeps:
    """A ``sleep`` that records the delays asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
