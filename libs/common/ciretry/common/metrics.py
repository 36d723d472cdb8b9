"""OpenTelemetry metrics, scrapeable as Prometheus text at ``/metrics`` on every service.

The instruments are declared once here so every service counts the same things under the same
names; a service records with ``instruments().verdicts.add(1, {"category": "oom"})``.
Gauges that need I/O to read (consumer lag, outbox depth, a follower's oldest unprocessed event)
are sampled by a worker of the service runtime and reported through observable gauges from the
last sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache

from aiohttp import web
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

_provider: MeterProvider | None = None

#: Bucket bounds (seconds) of the provider call latency histogram: a fast API call is tens of
#: milliseconds, a slow one seconds; act's client gives up at its timeout (15 s by default).
PROVIDER_CALL_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
)  # fmt: skip


def setup_metrics(service_name: str) -> MeterProvider:
    """Install the global meter provider once per process: Prometheus reader always, OTLP
    exporter too when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""
    global _provider
    if _provider is not None:
        return _provider
    readers: list[MetricReader] = [PrometheusMetricReader()]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    _provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(_provider)
    return _provider


def shutdown_metrics() -> None:
    if _provider is not None:
        _provider.shutdown()


@dataclass
class Samples:
    """Last sampled values for observable gauges, keyed by their attribute tuples."""

    consumer_lag: dict[str, int] = field(default_factory=dict)
    #: Per follower: seconds since its oldest event without a tracking row was recorded.
    oldest_unprocessed: dict[str, float] = field(default_factory=dict)
    outbox_depth: int | None = None


Attributes = Mapping[str, str | int | bool]


class Tally:
    """A monotonic counter kept as plain sums in the process and reported through an
    OpenTelemetry observable counter when metrics are collected.

    ``add`` is a dict update. The SDK's synchronous ``Counter.add`` aggregates on every call
    and cost about 7 µs with three attributes here, which is several percent of ingest's CPU per
    webhook on a path that runs for every event. Written from the event loop's thread; the
    collector reads a snapshot (``list(dict.items())`` is atomic under the GIL)."""

    def __init__(self) -> None:
        self._sums: dict[tuple[tuple[str, str | int | bool], ...], int | float] = {}

    def add(self, amount: int | float, attributes: Attributes | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        self._sums[key] = self._sums.get(key, 0) + amount

    def observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, dict(k)) for k, v in list(self._sums.items())]


@dataclass(frozen=True)
class Instruments:
    events_ingested: Tally
    duplicates: Tally
    rejected_requests: Tally
    verdicts: Tally
    retries: Tally
    budget_exhausted: Tally
    log_bytes_scanned: Tally
    provider_call_seconds: metrics.Histogram
    messages_rejected: Tally
    samples: Samples


@cache
def instruments() -> Instruments:
    m = metrics.get_meter("ciretry")
    samples = Samples()

    def lag(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"consumer": k}) for k, v in samples.consumer_lag.items()]

    def oldest(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"consumer": k}) for k, v in samples.oldest_unprocessed.items()]

    def depth(_: CallbackOptions) -> Iterable[Observation]:
        return [] if samples.outbox_depth is None else [Observation(samples.outbox_depth)]

    m.create_observable_gauge(
        "ciretry.consumer.lag",
        [lag],
        unit="{message}",
        description="JetStream messages pending or unacknowledged for a durable consumer",
    )
    m.create_observable_gauge(
        "ciretry.follower.oldest_unprocessed",
        [oldest],
        unit="s",
        description="Age of the oldest event of a follower's topic it has not processed yet "
        "(0: none); grows while a follower is stuck or behind",
    )
    m.create_observable_gauge(
        "ciretry.outbox.depth",
        [depth],
        unit="{event}",
        description="Events committed but not yet published to JetStream",
    )

    def tally(name: str, unit: str, description: str) -> Tally:
        t = Tally()
        m.create_observable_counter(name, [t.observe], unit=unit, description=description)
        return t

    return Instruments(
        events_ingested=tally(
            "ciretry.events.ingested",
            unit="{event}",
            description="Events accepted by ingest, by source, type and status",
        ),
        duplicates=tally(
            "ciretry.events.duplicates",
            unit="{event}",
            description="Deliveries dropped as duplicates of a stored event",
        ),
        rejected_requests=tally(
            "ciretry.requests.rejected",
            unit="{request}",
            description="Webhook/pulse inputs refused, by reason (HTTP status class)",
        ),
        verdicts=tally(
            "ciretry.verdicts", unit="{verdict}", description="Verdicts reached, by category"
        ),
        retries=tally(
            "ciretry.retries",
            unit="{decision}",
            description="Retry decisions and outcomes: requested, issued, failed, skipped (reason)",
        ),
        budget_exhausted=tally(
            "ciretry.budget.exhausted",
            unit="{decision}",
            description="Skips because a job or pipeline budget was used up",
        ),
        log_bytes_scanned=tally(
            "ciretry.log.scanned", unit="By", description="Log bytes run through the rules"
        ),
        provider_call_seconds=m.create_histogram(
            "ciretry.provider.call.duration",
            unit="s",
            description="CI provider API call latency, by provider and status",
            # In seconds, as the unit says (the SDK's default buckets are for milliseconds).
            explicit_bucket_boundaries_advisory=PROVIDER_CALL_BUCKETS,
        ),
        messages_rejected=tally(
            "ciretry.messages.rejected",
            unit="{message}",
            description="Bus messages terminated as poison, by consumer",
        ),
        samples=samples,
    )


async def metrics_endpoint(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
