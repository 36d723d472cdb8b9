"""/metrics exposes the shared instruments in Prometheus text format."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.common.metrics import instruments, metrics_endpoint
from tests.support.metrics import sample


async def scrape() -> str:
    app = web.Application()
    app.router.add_get("/metrics", metrics_endpoint)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


async def test_counters_and_sampled_gauges_are_scrapeable() -> None:
    before = await scrape()
    inst = instruments()
    inst.verdicts.add(2, {"category": "oom"})
    inst.samples.outbox_depth = 7
    inst.samples.consumer_lag["classify"] = 3
    after = await scrape()
    name = "ciretry_verdicts_total"
    assert sample(after, name, category="oom") - sample(before, name, category="oom") == 2
    assert sample(after, "ciretry_outbox_depth") == 7
    assert sample(after, "ciretry_consumer_lag", consumer="classify") == 3


async def test_provider_latency_buckets_are_seconds() -> None:
    """The histogram's unit is seconds: a 0.3 s call lands under le=0.5, not in a bucket sized
    for milliseconds (where every call would fall below the first bound)."""
    inst = instruments()
    before = await scrape()
    inst.provider_call_seconds.record(0.3, {"provider": "bucket-test", "status": "200"})
    after = await scrape()
    name = "ciretry_provider_call_duration_seconds_bucket"
    for le, delta in (("0.25", 0), ("0.5", 1), ("15.0", 1)):
        got = sample(after, name, provider="bucket-test", status="200", le=le) - sample(
            before, name, provider="bucket-test", status="200", le=le
        )
        assert got == delta, (le, got)
    assert "pipeline=" not in after  # no label grows with the number of pipelines
