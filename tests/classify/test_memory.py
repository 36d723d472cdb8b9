"""classify's memory under full concurrency, measured on a real ``ciretry serve classify``
process: hostile logs far larger than the cap, as many at once as the deployment lets it take,
and the process's RSS (sampled with psutil) stays under the memory limit its Kubernetes
manifest sets.

The process runs with the manifest's settings (k8s/base: consumer concurrency and batch, the log
budget next to the limit; the log cap is the default 64 MiB). A fake GitLab streams each job a
96 MiB log made to hurt: an 80 MiB line without a newline, 8 MiB of random bytes, ANSI escapes
and carriage returns, and the network error classify must still find at the end. Some logs are
chunked (size unknown: a fetch holds the whole cap), some carry a Content-Length, some are
gzip files served raw as Taskcluster does. Nothing is timed.
"""

from __future__ import annotations

import asyncio
import gzip
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from ciretry.common.bus import Bus, OutboxPublisher, Recorder
from ciretry.common.events import JobFinished, NewEvent, VerdictReached, pipeline_stream
from ciretry.common.eventstore import EventStore
from tests.support.chaos.processes import ServiceProcess, base_env
from tests.support.memory import PeakRss

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
LOG_MIB = 96
JOBS = 40
ERROR_LINE = b"fatal: unable to access 'https://gitlab.example/x.git/': Could not resolve host: gitlab.example\n"


def manifest() -> tuple[int, dict[str, str]]:
    """The classify container's memory limit (bytes) and the settings it runs with."""
    documents = yaml.safe_load_all((ROOT / "k8s" / "base" / "classify.yaml").read_text())
    deployment = next(d for d in documents if d and d.get("kind") == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    settings: dict[str, str] = {}
    for generator in kustomization["configMapGenerator"]:
        if generator["name"] == "ciretry-config":
            for literal in generator["literals"]:
                key, _, value = literal.partition("=")
                if key.startswith("CIRETRY_CONSUMER_"):
                    settings[key] = value
    for var in container.get("env", []):
        if var["name"].startswith("CIRETRY_CLASSIFY_") and "value" in var:
            settings[var["name"]] = var["value"]
    return limit_bytes, settings


def test_the_manifest_sets_a_limit_and_a_log_budget_below_it() -> None:
    limit, settings = manifest()
    assert limit == 1024 * MIB
    assert int(settings["CIRETRY_CONSUMER_CONCURRENCY"]) == 16
    assert 0 < int(settings["CIRETRY_CLASSIFY_LOG_BUDGET_BYTES"]) < limit // 2


class HostileLogs:
    """A fake GitLab trace endpoint streaming 96 MiB hostile logs, built from shared blocks so
    that serving forty of them costs this process little memory."""

    def __init__(self) -> None:
        rng = random.Random(13)
        self.long_line = b"x" * MIB  # 80 of these, no newline between them
        self.garbage = [rng.randbytes(MIB) for _ in range(8)]
        noise = b"\x1b[31;1m" * 8 + b"\r" * 64 + b"\x00" * 16 + "💥".encode() * 32 + b"\n"
        self.noise = (noise * (MIB // len(noise) + 1))[:MIB]
        self.size = 80 * MIB + 8 * MIB + 8 * MIB + len(ERROR_LINE)
        self.gzipped = gzip.compress(b"".join(self.blocks()), compresslevel=1)
        self.streaming = 0
        self.most_streaming = 0
        self.served = 0

    def blocks(self) -> Iterator[bytes]:
        yield from [self.long_line] * 80
        yield from self.garbage
        yield from [self.noise] * 8
        yield ERROR_LINE

    async def trace(self, request: web.Request) -> web.StreamResponse:
        kind = int(request.match_info["job"]) % 4
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        if kind == 1:
            resp.content_length = self.size
        elif kind == 2:
            resp.content_length = len(self.gzipped)
        await resp.prepare(request)
        self.streaming += 1
        self.most_streaming = max(self.most_streaming, self.streaming)
        try:
            if kind == 2:
                for i in range(0, len(self.gzipped), MIB):
                    await resp.write(self.gzipped[i : i + MIB])
            else:
                for block in self.blocks():
                    await resp.write(block)
            await resp.write_eof()
        finally:
            self.streaming -= 1
        self.served += 1
        return resp


@pytest.fixture
async def hostile_gitlab() -> AsyncIterator[tuple[str, HostileLogs]]:
    logs = HostileLogs()
    app = web.Application()
    app.router.add_get("/api/v4/projects/{p}/jobs/{job}/trace", logs.trace)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), logs
    finally:
        await server.close()


def failed_job(i: int) -> NewEvent:
    job = JobFinished(
        source="gitlab",
        project="42",
        pipeline_id=str(1000 + i // 10),
        job_id=str(5000 + i),
        job_name=f"build-{i}",
        status="failed",
        failure_reason="script_failure",
        provider_failure_reason="script_failure",
    )
    return NewEvent(stream=pipeline_stream("gitlab", "42", job.pipeline_id), data=job)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_classify_stays_under_its_memory_limit_with_hostile_logs_at_full_concurrency(
    store: EventStore,
    bus: Bus,
    pg_dsn: str,
    nats_url: str,
    schema: str,
    hostile_gitlab: tuple[str, HostileLogs],
    tmp_path: Path,
) -> None:
    gitlab_url, logs = hostile_gitlab
    limit, settings = manifest()
    env = base_env(
        CIRETRY_DATABASE_URL=pg_dsn,
        CIRETRY_DATABASE_SCHEMA=schema,
        CIRETRY_NATS_URL=nats_url,
        CIRETRY_NATS_PREFIX=bus.prefix,
        CIRETRY_NATS_STREAM=bus.stream,
        CIRETRY_GITLAB_URL=gitlab_url,
        CIRETRY_CLASSIFY_POD_GRACE="0",
        CIRETRY_CONSUMER_FETCH_TIMEOUT="0.2",
        CIRETRY_LOG_LEVEL="WARNING",
        **settings,
    )
    published = 0
    all_in = asyncio.Event()

    async def on_verdict(_: Any) -> None:
        nonlocal published
        published += 1
        if published == JOBS:
            all_in.set()

    sub = await bus.nc.subscribe(f"{bus.prefix}.verdict.>", cb=on_verdict)
    classify = ServiceProcess("classify", env, tmp_path / "classify.log").start()
    try:
        await classify.wait_ready()
        assert classify.proc is not None
        rss = PeakRss(classify.proc.pid).start()
        idle = rss.current()
        recorder = Recorder(store, OutboxPublisher(store, bus))
        await recorder.append([failed_job(i) for i in range(JOBS)])
        await all_in.wait()
        peak = rss.stop()
    finally:
        await sub.unsubscribe()
        classify.stop()

    print(
        f"\nclassify RSS: idle {idle / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB "
        f"({rss.samples} samples) for {JOBS} logs of {logs.size / MIB:.0f} MiB, "
        f"at most {logs.most_streaming} streamed at once; limit {limit / MIB:.0f} MiB"
    )
    assert peak < limit, f"peak RSS {peak / MIB:.0f} MiB above the {limit / MIB:.0f} MiB limit"
    # Each log was read to its end and its tail classified: the error at the end was found.
    stored = [e.data async for e in store.read_all() if isinstance(e.data, VerdictReached)]
    assert len(stored) == JOBS
    assert {v.category for v in stored} == {"infra_network"}, {v.category for v in stored}
    # The budget, not the handler count, bounded the logs read at once: without it all sixteen
    # handlers read at once, and this run peaked at 1.4 GiB. The requests themselves all go out
    # at once (a fetch holds the cap only when its answer shows no size it can trust): those
    # waiting for their bytes are answered as far as TCP's buffers take, and read later.
    assert logs.served == JOBS
    assert logs.most_streaming == min(JOBS, int(settings["CIRETRY_CONSUMER_CONCURRENCY"]))
