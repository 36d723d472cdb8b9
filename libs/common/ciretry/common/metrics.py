"""OpenTelemetry metrics, scrapeable as Prometheus text at ``/metrics`` on every service.

The instruments are declared once here so every service counts the same things under the same
names; a service records with ``instruments().verdicts.add(1, {"category": "oom"})``.
Gauges that need I/O to read (consumer lag, outbox depth) are sampled by a worker of the service
runtime and reported through observable gauges from the last sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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
    outbox_depth: int | None = None
    budget_remaining: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Instruments:
    events_ingested: metrics.Counter
    duplicates: metrics.Counter
    rejected_requests: metrics.Counter
    verdicts: metrics.Counter
    retries: metrics.Counter
    budget_exhausted: metrics.Counter
    log_bytes_scanned: metrics.Counter
    provider_call_seconds: metrics.Histogram
    messages_rejected: metrics.Counter
    samples: Samples


@cache
def instruments() -> Instruments:
    m = metrics.get_meter("ciretry")
    samples = Samples()

    def lag(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"consumer": k}) for k, v in samples.consumer_lag.items()]

    def depth(_: CallbackOptions) -> Iterable[Observation]:
        return [] if samples.outbox_depth is None else [Observation(samples.outbox_depth)]

    def remaining(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"pipeline": k}) for k, v in samples.budget_remaining.items()]

    m.create_observable_gauge(
        "ciretry.consumer.lag",
        [lag],
        unit="{message}",
        description="JetStream messages pending or unacknowledged for a durable consumer",
    )
    m.create_observable_gauge(
        "ciretry.outbox.depth",
        [depth],
        unit="{event}",
        description="Events committed but not yet published to JetStream",
    )
    m.create_observable_gauge(
        "ciretry.pipeline.budget.remaining",
        [remaining],
        unit="{retry}",
        description="Automatic retries left in recently decided pipelines",
    )
    return Instruments(
        events_ingested=m.create_counter(
            "ciretry.events.ingested",
            unit="{event}",
            description="Events accepted by ingest, by source, type and status",
        ),
        duplicates=m.create_counter(
            "ciretry.events.duplicates",
            unit="{event}",
            description="Deliveries dropped as duplicates of a stored event",
        ),
        rejected_requests=m.create_counter(
            "ciretry.requests.rejected",
            unit="{request}",
            description="Webhook/pulse inputs refused, by reason (HTTP status class)",
        ),
        verdicts=m.create_counter(
            "ciretry.verdicts", unit="{verdict}", description="Verdicts reached, by category"
        ),
        retries=m.create_counter(
            "ciretry.retries",
            unit="{decision}",
            description="Retry decisions and outcomes: requested, issued, failed, skipped (reason)",
        ),
        budget_exhausted=m.create_counter(
            "ciretry.budget.exhausted",
            unit="{decision}",
            description="Skips because a job or pipeline budget was used up",
        ),
        log_bytes_scanned=m.create_counter(
            "ciretry.log.scanned", unit="By", description="Log bytes run through the rules"
        ),
        provider_call_seconds=m.create_histogram(
            "ciretry.provider.call.duration",
            unit="s",
            description="CI provider API call latency, by provider, operation and status",
        ),
        messages_rejected=m.create_counter(
            "ciretry.messages.rejected",
            unit="{message}",
            description="Bus messages terminated as poison, by consumer",
        ),
        samples=samples,
    )


async def metrics_endpoint(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
