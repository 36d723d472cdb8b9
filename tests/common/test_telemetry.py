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
