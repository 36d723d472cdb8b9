"""``extract_context`` reads what this system sends without the propagators' generic path,
and gives the context they would give, for that and for everything else (pure: no provider,
no network)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ciretry.common import telemetry
from ciretry.common.events import Metadata
from ciretry.common.telemetry import context_from_metadata, extract_context

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

CARRIERS: list[dict[str, str]] = [
    {},
    {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    {"traceparent": f"00-{TRACE}-{SPAN}-03", "Nats-Msg-Id": "x", "Ciretry-Type": "JobFinished"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=opaque,other=1"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "user=alice"},
    {"baggage": "user=alice"},
    {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},  # upper case: invalid
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},  # zero trace id: invalid
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},  # zero span id: invalid
    {"traceparent": f"ff-{TRACE}-{SPAN}-01"},  # version ff: invalid
    {"traceparent": f"01-{TRACE}-{SPAN}-01-future"},  # a later version may add fields
    {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},  # version 00 may not
    {"traceparent": f" \t00-{TRACE}-{SPAN}-01 "},  # surrounding blanks are allowed
    {"traceparent": ""},
    {"traceparent": f"00-{TRACE}-{SPAN}"},
    {"traceparent": "x" * 600},
]


def seen(ctx: otel_context.Context) -> tuple[object, ...]:
    """What a context carries that a consumer could see: the parent span context, baggage."""
    span = trace.get_current_span(ctx).get_span_context()
    return (
        span.trace_id,
        span.span_id,
        span.is_remote,
        int(span.trace_flags),
        span.trace_state.to_header(),
        span.is_valid,
        dict(baggage.get_all(ctx)),
    )


@pytest.mark.parametrize("carrier", CARRIERS, ids=lambda c: repr(c)[:60])
def test_the_context_is_the_one_the_propagators_give(carrier: dict[str, str]) -> None:
    assert seen(extract_context(carrier)) == seen(propagate.extract(carrier))
    # aiohttp's request headers: case-insensitive, as the propagators' getter reads them.
    headers: Mapping[str, str] = CIMultiDictProxy(
        CIMultiDict({k.upper() if k == "traceparent" else k: v for k, v in carrier.items()})
    )
    assert seen(extract_context(headers)) == seen(propagate.extract(headers))


def test_what_this_system_sends_continues_its_trace() -> None:
    ctx = context_from_metadata(Metadata(traceparent=f"00-{TRACE}-{SPAN}-01"))
    parent = trace.get_current_span(ctx).get_span_context()
    assert (format(parent.trace_id, "032x"), format(parent.span_id, "016x")) == (TRACE, SPAN)
    assert parent.is_remote and parent.trace_flags.sampled


@pytest.fixture
def tracecontext_only() -> Iterator[None]:
    """An operator's ``OTEL_PROPAGATORS=tracecontext``: no baggage propagator."""
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


def test_another_propagator_setting_is_left_to_the_propagators(tracecontext_only: None) -> None:
    carrier = {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "user=alice"}
    assert not telemetry._default_propagation()
    got = extract_context(carrier)
    assert seen(got) == seen(propagate.extract(carrier))
    assert dict(baggage.get_all(got)) == {}  # no baggage propagator: no baggage
