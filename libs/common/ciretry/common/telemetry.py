"""OpenTelemetry wiring and W3C trace-context propagation across HTTP, the bus and the event log.

The tracer provider is configured from the standard ``OTEL_*`` variables (the SDK reads them);
spans are exported over OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. With nowhere to
export spans to (and no ``OTEL_TRACES_SAMPLER`` chosen), spans are not recorded: every span
still has its trace and span ids (log lines carry them, events and messages propagate them), but
no attributes or timings are collected for no one (about 20 µs a span, several per job).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .events import Metadata

_provider: TracerProvider | None = None
#: Whether any span processor (an exporter, or a test's collector) is installed.
_exporting = False
#: Whether the sampler is the operator's (``OTEL_TRACES_SAMPLER``), not ``RecordWhenExported``.
_operator_sampler = False


class RecordWhenExported(Sampler):
    """``ParentBased(ALWAYS_ON)`` once spans go somewhere; until then, spans are not recorded
    (their context stays valid and propagates)."""

    def __init__(self) -> None:
        self._on = ParentBased(ALWAYS_ON)

    def should_sample(
        self, parent_context: otel_context.Context | None = None, *args: Any, **kwargs: Any
    ) -> SamplingResult:
        if _exporting:
            return self._on.should_sample(parent_context, *args, **kwargs)
        # The caller's trace state goes on with the trace, recorded or not (W3C trace context).
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(
            Decision.DROP, trace_state=parent.trace_state if parent.is_valid else None
        )

    def get_description(self) -> str:
        return "RecordWhenExported{ParentBased{AlwaysOn}}"


def setup_telemetry(
    service_name: str, *, extra_processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """Install the global tracer provider once per process (idempotent)."""
    global _provider, _exporting, _operator_sampler
    if _provider is not None:
        for p in extra_processors:
            _provider.add_span_processor(p)
            _exporting = True
        return _provider
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    # A sampler named in OTEL_TRACES_SAMPLER is the operator's choice: the SDK reads it.
    _operator_sampler = bool(os.environ.get("OTEL_TRACES_SAMPLER"))
    sampler = None if _operator_sampler else RecordWhenExported()
    provider = TracerProvider(resource=resource, sampler=sampler)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _exporting = True
    for p in extra_processors:
        provider.add_span_processor(p)
        _exporting = True
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def spans_recorded() -> bool:
    """False when ``setup_telemetry`` installed ``RecordWhenExported`` and nothing exports: no
    span of this process is recorded, so hot paths may skip what only a recorded span uses
    (attributes, links) and build the span's context without the SDK's generic path. True
    otherwise (an exporter, a collector, an operator's sampler, or a provider not set up here)."""
    return _provider is None or _exporting or _operator_sampler


def shutdown_telemetry() -> None:
    if _provider is not None:
        _provider.shutdown()


_tracers: dict[str, tuple[object, trace.Tracer]] = {}


def tracer(name: str = "ciretry") -> trace.Tracer:
    """The tracer called ``name`` of the current provider; made once per provider, since
    ``get_tracer`` builds a new one (resource, scope, locks) on every call."""
    provider = trace.get_tracer_provider()
    cached = _tracers.get(name)
    if cached is not None and cached[0] is provider:
        return cached[1]
    made = provider.get_tracer(name)
    _tracers[name] = (provider, made)
    return made


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Current trace context as W3C headers (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = {} if headers is None else headers
    propagate.inject(carrier)
    return carrier


#: A ``traceparent`` as ``trace_fields`` writes it (version 00, lower-case hex, nothing after).
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
#: The global propagator last found to be the SDK's default, and whether it was.
_default_checked: tuple[object, bool] = (None, False)


def _default_propagation() -> bool:
    """Whether the global propagator is the default one (W3C trace context, then baggage), as
    ``OTEL_PROPAGATORS`` unset or ``tracecontext,baggage`` installs it."""
    global _default_checked
    current = propagate.get_global_textmap()
    if _default_checked[0] is not current:
        kinds = [type(p) for p in getattr(current, "_propagators", ())]
        _default_checked = (
            current,
            type(current) is CompositePropagator
            and kinds == [TraceContextTextMapPropagator, W3CBaggagePropagator],
        )
    return _default_checked[1]


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """``propagate.extract(carrier)``. What this system sends (a version-00 ``traceparent``,
    no ``tracestate``, no ``baggage``) is read here, to the same context, without the
    propagators' generic path: it runs for every message every consumer takes, and the
    ``tracecontext`` propagator alone had 5% of act's profile samples (a compiled pattern
    looked up in ``re``'s cache on every call, and missed). Anything else goes to the
    propagators."""
    if "tracestate" not in carrier and "baggage" not in carrier and _default_propagation():
        header = carrier.get("traceparent")
        if header is None:
            return otel_context.Context()
        match = _TRACEPARENT_00.fullmatch(header)
        if match is not None:
            trace_id, span_id = int(match[1], 16), int(match[2], 16)
            if trace_id and span_id:
                parent = trace.SpanContext(
                    trace_id=trace_id,
                    span_id=span_id,
                    is_remote=True,
                    trace_flags=trace.TraceFlags(int(match[3], 16)),
                )
                return trace.set_span_in_context(
                    trace.NonRecordingSpan(parent), otel_context.Context()
                )
    return propagate.extract(carrier)


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    return extract_context(headers or {})


def context_from_metadata(metadata: Metadata) -> otel_context.Context:
    carrier = {}
    if metadata.traceparent:
        carrier["traceparent"] = metadata.traceparent
    if metadata.tracestate:
        carrier["tracestate"] = metadata.tracestate
    return extract_context(carrier)


def trace_fields() -> dict[str, str]:
    """The current context's ``traceparent``/``tracestate``, for an event's metadata: the W3C
    trace context of the current span, formatted here (what the ``tracecontext`` propagator
    writes, without the propagators' generic path: this runs for every webhook)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    fields = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    state = ctx.trace_state.to_header() if ctx.trace_state else ""
    if state:
        fields["tracestate"] = state
    return fields


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the active span's trace and span ids."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            payload["trace_id"] = format(ctx.trace_id, "032x")
            payload["span_id"] = format(ctx.span_id, "016x")
        for key in ("service", "event_id", "stream", "consumer"):
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = str(value)
        # Structured fields of a log line (``extra={"fields": {...}}``), e.g. act's decisions.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                payload.setdefault(str(key), value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(level: str = "INFO", as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _CurrentSpan:
    """The current span for a ``with`` block: attached on entry, detached and ended on exit."""

    __slots__ = ("_parent", "_span", "_token")

    def __init__(self, span: trace.Span, parent: otel_context.Context | None) -> None:
        self._span = span
        self._parent = parent
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span, self._parent))
        return self._span

    def __exit__(self, *_exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        self._span.end()


def current_span(
    name: str,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    context: otel_context.Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[trace.Link] | None = None,
    scope: str = "ciretry",
) -> AbstractContextManager[trace.Span]:
    """``tracer(scope).start_as_current_span(...)``; when no span is recorded
    (``spans_recorded``), the same span context made with ``start_span`` and attached for the
    block, without the attributes, links and nested context managers no one reads (a span costs
    about half as much: several spans per job in every service)."""
    made = tracer(scope)
    if spans_recorded():
        return made.start_as_current_span(
            name, context=context, kind=kind, attributes=attributes, links=links
        )
    return _CurrentSpan(made.start_span(name, context=context, kind=kind), context)


# --- HTTP server and client spans -----------------------------------------------------------


def server_span_middleware() -> Any:
    """aiohttp middleware: one SERVER span per request, continuing the caller's trace when it
    sent ``traceparent``. Named by route template (``POST /webhooks/gitlab``), never by the raw
    path, and carrying no headers or bodies (tokens, signatures)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz", "/metrics"):
            return await handler(request)  # type: ignore[no-any-return]
        route = request.match_info.route.resource
        template = route.canonical if route is not None else request.path
        # The headers as they are (case-insensitive): ``dict()`` of them would miss a
        # ``Traceparent`` sent capitalised.
        parent = extract_context(request.headers)
        if not spans_recorded():
            # The same span context the SDK would make (its sampler drops the span), without
            # the attributes no one reads and the generic context managers: every webhook
            # passes here.
            span = tracer("ciretry.http").start_span(
                f"{request.method} {template}", context=parent, kind=trace.SpanKind.SERVER
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                otel_context.detach(token)
        with tracer("ciretry.http").start_as_current_span(
            f"{request.method} {template}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": template,
                "url.path": request.path,
                "url.scheme": request.scheme,
            },
        ) as span:
            try:
                response: web.StreamResponse = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
            return response

    return middleware


class ProviderCallSpans:
    """One CLIENT span per outgoing request to ``peer`` (a CI provider), ``traceparent``
    injected into its headers, its latency (to the answer's headers) recorded in the
    provider-call histogram. Called by the HTTP transport around each request, rather than
    through aiohttp's ``TraceConfig``: with a trace config, aiohttp awaits a dozen signals per
    request (connection, DNS, chunks sent), most of them empty, on every call."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def start(self, method: str, url: Any, headers: dict[str, str]) -> tuple[trace.Span, float]:
        """The request's span, its context written into ``headers``, and the start time.
        ``url``: a ``yarl.URL``."""
        if not spans_recorded():
            # The span context the SDK would make (its sampler drops the span), formatted as
            # the tracecontext propagator writes it, without the attributes no one reads.
            span = tracer("ciretry.http").start_span(method, kind=trace.SpanKind.CLIENT)
            ctx = span.get_span_context()
            headers["traceparent"] = (
                f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
            )
            state = ctx.trace_state.to_header() if ctx.trace_state else ""
            if state:
                headers["tracestate"] = state
            return span, time.perf_counter()
        span = tracer("ciretry.http").start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": method,
                "server.address": url.host or "",
                "server.port": url.port or 0,
                "url.path": url.path,
                "ciretry.provider": self.peer,
            },
        )
        propagate.inject(headers, context=trace.set_span_in_context(span))
        return span, time.perf_counter()

    def finish(
        self, call: tuple[trace.Span, float], status: int | None, error: BaseException | None
    ) -> None:
        span, started = call
        if span.is_recording():
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error is not None:
                span.record_exception(error)
            if error is not None or (status or 0) >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end()
        from .metrics import instruments

        instruments().provider_call_seconds.record(
            time.perf_counter() - started,
            {"provider": self.peer, "status": str(status) if status is not None else "error"},
        )
