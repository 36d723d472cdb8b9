"""Tracing costs nothing when spans go nowhere, and keeps its ids for logs and propagation.

Each case runs in a fresh interpreter: the tracer provider is process-global, and this test
suite's own conftest installs a collector in the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json
from ciretry.common.telemetry import setup_telemetry, trace_fields, tracer
setup_telemetry("probe")
with tracer().start_as_current_span("outer") as span:
    fields = trace_fields()
    print(json.dumps({"recording": span.is_recording(),
                      "valid": span.get_span_context().is_valid,
                      "traceparent": fields.get("traceparent", "")}))
"""


def probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def sampled(traceparent: str) -> bool:
    """The W3C trace-flags' sampled bit (the SDK also sets the random bit, 0x02)."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 0x01)


def test_with_no_exporter_spans_are_not_recorded_but_keep_their_ids() -> None:
    got = probe()
    assert got["recording"] is False
    assert got["valid"] is True
    # Propagated to the next service (not sampled: there is nothing to collect here).
    assert str(got["traceparent"]).startswith("00-") and not sampled(str(got["traceparent"]))


def test_an_operator_chosen_sampler_is_honoured() -> None:
    got = probe(OTEL_TRACES_SAMPLER="always_on")
    assert got["recording"] is True
    assert sampled(str(got["traceparent"]))


SERVER_PROBE = """
import asyncio, json
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from ciretry.common.telemetry import server_span_middleware, setup_telemetry, trace_fields
setup_telemetry("probe")

async def handler(request):
    return web.json_response(trace_fields())

async def main():
    app = web.Application(middlewares=[server_span_middleware()])
    app.router.add_post("/webhooks/gitlab", handler)
    async with TestClient(TestServer(app)) as client:
        out = []
        for headers in ({"Traceparent": PARENT, "tracestate": "k=v"}, {}):
            resp = await client.post("/webhooks/gitlab", headers=headers)
            out.append(await resp.json())
        print(json.dumps(out))

asyncio.run(main())
"""
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def server_probe(**env: str) -> list[dict[str, str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = f"PARENT = {PARENT!r}\n" + SERVER_PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, check=True
    )
    result: list[dict[str, str]] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def test_a_request_continues_the_callers_trace_with_or_without_recording() -> None:
    """The middleware's lean path (nothing exports) gives the handler the context the SDK's
    path gives it: the caller's trace (its header in any case), a span of its own, the
    caller's trace state; the sampled flag says whether the span is recorded. Without a
    ``traceparent`` a new trace starts."""
    _, trace_id, parent_span, _ = PARENT.split("-")
    for env, recorded in (({}, False), ({"OTEL_TRACES_SAMPLER": "always_on"}, True)):
        continued, fresh = server_probe(**env)
        version, got_trace, got_span, _ = continued["traceparent"].split("-")
        assert (version, got_trace) == ("00", trace_id)
        assert got_span != parent_span and int(got_span, 16) != 0
        assert sampled(continued["traceparent"]) is recorded
        assert continued["tracestate"] == "k=v"
        assert fresh["traceparent"].split("-")[1] not in (trace_id, "0" * 32)
        assert "tracestate" not in fresh


CLIENT_PROBE = """
import asyncio, json
from aiohttp import web
from aiohttp.test_utils import TestServer
from ciretry.common.http import AiohttpTransport, Request
from ciretry.common.telemetry import setup_telemetry, trace_fields, tracer
setup_telemetry("probe")

async def echo(request):
    return web.json_response({k: request.headers.get(k, "") for k in ("traceparent", "tracestate")})

async def main():
    app = web.Application()
    app.router.add_get("/x", echo)
    async with TestServer(app) as server:
        transport = AiohttpTransport(peer="gitlab")
        with tracer().start_as_current_span("decide"):
            outer = trace_fields()["traceparent"]
            resp = await transport.send(Request("GET", str(server.make_url("/x"))))
            sent = json.loads(await resp.read())
            await resp.aclose()
        await transport.aclose()
        print(json.dumps({"outer": outer, "sent": sent}))

asyncio.run(main())
"""


def test_a_provider_call_carries_its_own_span_of_the_callers_trace() -> None:
    """An outgoing call's ``traceparent`` (recorded or not) is the caller's trace with a span
    id of its own, sampled as the caller's is."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    for env, recorded in (({}, False), ({"OTEL_TRACES_SAMPLER": "always_on"}, True)):
        out = subprocess.run(
            [sys.executable, "-c", CLIENT_PROBE], env={**clean, **env}, capture_output=True,
            check=True,
        )  # fmt: skip
        got = json.loads(out.stdout.decode().strip().splitlines()[-1])
        _, outer_trace, outer_span, _ = got["outer"].split("-")
        version, sent_trace, sent_span, _ = got["sent"]["traceparent"].split("-")
        assert (version, sent_trace) == ("00", outer_trace)
        assert sent_span != outer_span and int(sent_span, 16) != 0
        assert sampled(got["sent"]["traceparent"]) is recorded
        assert got["sent"]["tracestate"] == ""


NESTED_PROBE = """
import json
from opentelemetry import trace
from ciretry.common.telemetry import context_from_headers, current_span, setup_telemetry, trace_fields
setup_telemetry("probe")
parent = context_from_headers({"traceparent": PARENT})
ids = lambda s: (format(s.get_span_context().trace_id, "032x"), format(s.get_span_context().span_id, "016x"))
with current_span("consume", kind=trace.SpanKind.CONSUMER, context=parent) as outer:
    with current_span("decide", attributes={"a": 1}) as inner:
        inside = trace_fields()["traceparent"]
        current = ids(trace.get_current_span())
        recording = inner.is_recording()
    after = ids(trace.get_current_span())
print(json.dumps({"outer": ids(outer), "inner": ids(inner), "inside": inside, "current": current,
                  "after": after, "ended": ids(trace.get_current_span()),
                  "recording": recording}))
"""


def test_current_span_nests_and_restores_the_context_with_or_without_recording() -> None:
    """``current_span``'s lean path (nothing records) gives what the SDK's path gives: a span of
    the given parent's trace, the current one inside the block (what events and calls carry),
    its parent's again after it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    _, trace_id, parent_span, _ = PARENT.split("-")
    for env, recorded in (({}, False), ({"OTEL_TRACES_SAMPLER": "always_on"}, True)):
        out = subprocess.run(
            [sys.executable, "-c", f"PARENT = {PARENT!r}\n" + NESTED_PROBE],
            env={**clean, **env}, capture_output=True, check=True,
        )  # fmt: skip
        got = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert got["outer"][0] == got["inner"][0] == trace_id
        assert len({got["outer"][1], got["inner"][1], parent_span}) == 3
        assert got["current"] == got["inner"] and got["after"] == got["outer"]
        assert got["inside"].split("-")[1:3] == got["inner"]
        assert got["ended"] == ["0" * 32, "0" * 16]  # nothing current once both blocks ended
        assert got["recording"] is recorded
