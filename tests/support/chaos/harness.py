"""Seeded fault injection against real ``ciretry serve`` processes (tests/chaos, bench/chaos.py).

One run: an embedded PostgreSQL and an embedded NATS started here (their own temp dir, never the
machine's shared servers), 1 ingest + N classify + M act processes, a fake GitLab that records
every call and can be "down". Every job webhook is delivered ``copies`` times, shuffled (out of
order), some with skewed timestamps, while a nemesis kills services with SIGKILL (restarting
them), restarts PostgreSQL and NATS, and takes the provider API down for a while. Afterwards the
invariants are computed from the event log, the JetStream stream and the fake provider's record
(Jepsen style): nothing here trusts what the services say about themselves.

Randomness: one seed drives the data, the fault schedule and the provider's fault modes; the
interleaving of processes is the machine's. Every run prints its seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from ciretry.common.embedded import EmbeddedNats, EmbeddedPostgres
from tests.support.chaos.calls import Disruption, ProviderCall, account_calls, timed_out_keys
from tests.support.chaos.processes import ServiceProcess
from tests.support.chaos.reruns import Limits, StickyFailures, budget_violations
from tests.support.fakehttp import Call, Reply
from tests.support.fuzz import Fuzzer
from tests.support.providers import FakeGitLab
from tests.support.scenario import job_hook, policy_without_backoff, service_env

DEFAULT_SEED = 20240917
SEED_ENV = "CIRETRY_CHAOS_SEED"

#: Secrets configured on every service of a run; none may appear in a log line or an event.
WEBHOOK_SECRET = "whsec-chaos-5f1c0a7e9b"
GITLAB_TOKEN = "glpat-chaos-3c9d2e11aa"
API_TOKEN = "api-chaos-77b04e6a1d"
FUZZ_GITHUB_SECRET = "ghsec-chaos-fuzz-91d2"
SECRETS = (WEBHOOK_SECRET, GITLAB_TOKEN, API_TOKEN)

#: act's executor settings in force in the services (HttpSettings defaults; act's failures
#: before giving up, as ``outage_env`` sets them).
EXECUTOR_MAX_ATTEMPTS = 4
ACT_MAX_FAILURES = 3

NETWORK_LOG = b"$ git fetch\nfatal: unable to access 'https://gitlab.example/x.git/': Could not resolve host: gitlab.example\n"
OOM_LOG = b"$ make -j8\nERROR: Job failed: command terminated with exit code 137\n"
COMPILE_LOG = b"$ make\nsrc/a.c:3:1: error: unknown type name 'strin'\nmake: *** [all] Error 1\n"

#: Payload timestamps from clocks that are wrong in every way a provider's can be.
SKEWED_TIMES = (
    ("2099-12-31T23:59:59Z", "2099-12-31T23:00:00Z"),  # far future, finished before started
    ("1970-01-01 00:00:00 UTC", "1970-01-01 00:00:01 UTC"),  # the epoch
    ("2031-06-01T12:00:00+14:00", "2031-06-01T11:00:00-12:00"),  # extreme offsets
    ("2001-01-01T00:00:00", "2000-01-01T00:00:00"),  # no zone, going backwards
    ("2024-02-29T23:59:60Z", ""),  # a leap second (invalid: must be a 400, not a 5xx)
)


def chaos_seed(environ: dict[str, str] | None = None) -> int:
    value = (environ if environ is not None else os.environ).get(SEED_ENV, "")
    return int(value) if value.strip() else DEFAULT_SEED


# --- the fake provider, with outages --------------------------------------------------------


class ChaosGitLab(FakeGitLab):
    """FakeGitLab whose API (not the job logs) can be down: each call in an outage window is
    answered 503, 429 (Retry-After: 1) or has its connection dropped, chosen by the seed."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.windows: list[tuple[float, float]] = []
        self.record: list[ProviderCall] = []
        self.faults: Counter[str] = Counter()
        self.echo_token = False
        #: Jobs that fail again when retried (None: every retry is the job's last word).
        self.sticky: StickyFailures | None = None
        self._recorded = asyncio.Event()

    def _retry(self, call: Call, match: dict[str, str]) -> Reply:
        reply = super()._retry(call, match)
        if reply.status == 201 and self.sticky is not None:
            old = int(match["job"])
            new = self.jobs[int(json.loads(reply.body)["id"])]
            self.traces[new["id"]] = self.traces.get(old, b"")
            self.sticky.retried(old, new["id"], new["pipeline_id"], new["name"])
        return reply

    async def _create(self, call: Call, match: dict[str, str]) -> Reply:
        """A new pipeline runs the job it was created for again (as a new job)."""
        reply = await super()._create(call, match)
        p = self.pipelines[self.next_id]
        key = next((v["value"] for v in p["variables"] if v["key"] == "CIRETRY_RETRY_OF"), "")
        parts = key.rsplit(":", 2)
        old = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if old is not None and old in self.jobs:
            self.next_id += 1
            name = self.jobs[old]["name"]
            self.add_job(self.next_id, name, p["id"])
            self.traces[self.next_id] = self.traces.get(old, b"")
            if self.sticky is not None:
                self.sticky.recreated(old, self.next_id, p, name)
        return reply

    async def recorded(self, method: str, fragment: str) -> ProviderCall:
        """The first call of ``method`` whose path holds ``fragment``, once it is recorded."""
        while True:
            for c in self.record:
                if c.method == method and fragment in c.path:
                    return c
            self._recorded.clear()
            await self._recorded.wait()

    def _note(self, call: ProviderCall) -> None:
        self.record.append(call)
        self._recorded.set()

    def outage(self, seconds: float) -> tuple[float, float]:
        now = time.monotonic()
        window = (now, now + seconds)
        self.windows.append(window)
        return window

    def down(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.windows)

    async def answer(self, call: Call) -> tuple[Reply, float]:
        now = time.monotonic()
        key = None
        if call.method == "POST" and call.path.endswith("/pipeline"):
            body = call.body
            for v in body.get("variables", []) if isinstance(body, dict) else []:
                if v.get("key") == "CIRETRY_RETRY_OF":
                    key = v.get("value")
        if "/trace" not in call.path and self.down(now):
            self.calls.append(call)  # injected calls are recorded too
            mode = self.rng.choice(("503", "429", "drop"))
            self.faults[mode] += 1
            if mode == "drop":
                self._note(ProviderCall(now, call.method, call.path, 0, True, key))
                return Reply.dropped(), 0.0
            status = int(mode)
            self._note(ProviderCall(now, call.method, call.path, status, True, key))
            headers = {"Retry-After": "1"} if status == 429 else {}
            return Reply.json({"message": "injected"}, status, headers), 0.0
        reply, stall = await super().answer(call)
        if self.echo_token and reply.status == 404:
            token = call.headers.get("PRIVATE-TOKEN", "")
            reply = Reply.json({"message": f"404 Not found (token {token} has no access)"}, 404)
        self._note(ProviderCall(now, call.method, call.path, reply.status, False, key))
        return reply, stall


# --- infrastructure -------------------------------------------------------------------------


class EmbeddedInfra:
    """PostgreSQL and NATS of this run only, in a 0755 temp dir under /tmp (PostgreSQL runs as
    ``nobody`` when we are root). Restarts keep the port and the data directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ciretry-chaos-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.pg = EmbeddedPostgres(self.dir)
        self.nats = EmbeddedNats(self.dir)

    def start(self) -> EmbeddedInfra:
        self.pg.start()
        self.nats.start()
        return self

    @property
    def dsn(self) -> str:
        return self.pg.dsn

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.nats.stop()
        with contextlib.suppress(Exception):
            self.pg.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- webhooks -------------------------------------------------------------------------------


@dataclass
class Delivery:
    uuid: str
    job_id: int
    body: bytes
    skewed: bool = False
    #: A payload no provider could mean (e.g. a leap second): must be a 4xx, never stored.
    invalid: bool = False


@dataclass
class Attempt:
    t0: float
    t1: float
    status: int  # -1: connection error (ingest killed), -2: timeout


@dataclass
class Answer:
    delivery: Delivery
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> int:
        return self.attempts[-1].status if self.attempts else -1


async def deliver(
    url: str,
    deliveries: list[Delivery],
    *,
    duration: float,
    concurrency: int = 8,
    give_up_after: float = 240.0,
    secret: str = WEBHOOK_SECRET,
) -> list[Answer]:
    """Post every delivery, paced over ``duration`` seconds, retrying on 503 and on connection
    errors (ingest killed) as GitLab does, until a final answer."""
    answers = [Answer(d) for d in deliveries]
    start = time.monotonic()
    step = duration / max(1, len(deliveries))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(answers)):
        queue.put_nowait(i)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(answer: Answer) -> None:
            d = answer.delivery
            headers = {
                "Content-Type": "application/json",
                "X-Gitlab-Event": "Job Hook",
                "X-Gitlab-Token": secret,
                "X-Gitlab-Event-UUID": d.uuid,
            }
            deadline = time.monotonic() + give_up_after
            while True:
                t0 = time.monotonic()
                try:
                    async with session.post(url, data=d.body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, OSError):
                    status = -1
                except TimeoutError:
                    status = -2
                answer.attempts.append(Attempt(t0, time.monotonic(), status))
                if status not in (-2, -1, 503) or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.25)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                wait = start + i * step - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await one(answers[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


# --- the run --------------------------------------------------------------------------------


@dataclass
class ChaosSettings:
    seed: int = DEFAULT_SEED
    jobs: int = 300
    pipelines: int = 90
    copies: int = 3
    classify: int = 2
    act: int = 2
    #: SIGKILLs per service kind (ingest, classify, act) during the posting window.
    kills_per_service: int = 3
    pg_restart: bool = True
    pg_down_s: float = 3.0
    nats_restart: bool = True
    nats_down_s: float = 3.0
    provider_outage_s: float = 8.0
    #: How many times each happens (the long run repeats them; spread over the posting window).
    pg_restarts: int = 1
    nats_restarts: int = 1
    provider_outages: int = 1
    #: Webhooks are spread over this many seconds (faults happen inside it).
    post_seconds: float = 35.0
    #: Fraction of jobs whose payload timestamps are skewed.
    skew_fraction: float = 0.2
    settle_timeout: float = 150.0
    log_level: str = "INFO"
    #: The fake provider echoes the request's token in its 404 answers (scrubbing is tested).
    echo_token: bool = False
    #: Webhooks sent with wrong credentials (a near-miss and other configured secrets) first.
    bad_token_posts: int = 0
    #: Share of the network and OOM failures that fail again however often they are retried
    #: (``tests.support.chaos.reruns``): their chains run into the attempt limits and size cap.
    sticky_share: float = 0.3
    #: Mutated requests to every ingest endpoint after the run (``tests.support.fuzz``), to an
    #: ingest of its own (schema and stream "fuzz") so that what they store stays out of the
    #: invariants above. None may be answered with a 5xx.
    fuzz_requests: int = 2000
    #: The outage phase (issue 13), after the posting window: ``outage_jobs`` failing jobs are
    #: committed while classify and act are paused, then PostgreSQL stays down for
    #: ``outage_pg_s`` (longer than the consumers' whole nak schedule: JetStream used to stop
    #: delivering after it) and the provider API for that long plus ``outage_provider_extra_s``
    #: (longer than act's failure schedule for ``outage_retryable`` of the jobs, the others
    #: being compile errors: act's scheduler retries one request after the other, seconds each
    #: while the provider is down). 0 jobs: no phase.
    outage_jobs: int = 30
    outage_retryable: int = 1
    outage_pg_s: float = 10.0
    outage_provider_extra_s: float = 35.0


@dataclass
class Fault:
    at: float
    kind: str  # kill:<service>, pg, nats, provider
    detail: str = ""
    start: float = 0.0
    end: float = 0.0


@dataclass
class Invariant:
    name: str
    ok: bool
    numbers: str


@dataclass
class ChaosResult:
    seed: int
    settings: ChaosSettings
    invariants: list[Invariant]
    stats: dict[str, Any]
    faults: list[Fault]
    elapsed: float

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.invariants)

    @property
    def ratio(self) -> float:
        return sum(i.ok for i in self.invariants) / max(1, len(self.invariants))

    def table(self) -> str:
        width = max(len(i.name) for i in self.invariants)
        lines = [
            f"chaos seed={self.seed} ({SEED_ENV}={self.seed} to repeat), {self.elapsed:.0f}s",
            f"{'invariant'.ljust(width)}  result  numbers",
            f"{'-' * width}  ------  -------",
        ]
        for i in self.invariants:
            lines.append(f"{i.name.ljust(width)}  {'PASS' if i.ok else 'FAIL':6}  {i.numbers}")
        lines.append("stats: " + json.dumps(self.stats, sort_keys=True))
        return "\n".join(lines)


def build_jobs(
    rng: random.Random, settings: ChaosSettings, gitlab: FakeGitLab
) -> tuple[list[Delivery], dict[int, str]]:
    """The jobs of a run (registered at the fake, logs included) and their deliveries, each
    delivered ``copies`` times, shuffled. Returns (deliveries, kind by job id)."""
    kinds: dict[int, str] = {}
    originals: list[Delivery] = []
    for i in range(settings.jobs):
        job_id, pipeline_id = 10_000 + i, 500 + i % settings.pipelines
        name = f"job-{i // settings.pipelines}"
        roll = rng.random()
        kind = (
            "network"
            if roll < 0.78
            else "oom"
            if roll < 0.86
            else "compile"
            if roll < 0.95
            else "unknown_at_provider"
        )
        kinds[job_id] = kind
        if kind == "unknown_at_provider":
            # The provider answers 404 to the retry: a final RetryFailed with its reason.
            gitlab.add_pipeline(pipeline_id)
        else:
            gitlab.add_job(job_id, name, pipeline_id)
        gitlab.traces[job_id] = {"oom": OOM_LOG, "compile": COMPILE_LOG}.get(kind, NETWORK_LOG)
        hook = json.loads(job_hook(job_id, pipeline_id, name))
        hook.update(ref="main", sha="abc123")
        skewed = invalid = False
        if rng.random() < settings.skew_fraction:
            started, finished = rng.choice(SKEWED_TIMES)
            hook.update(build_started_at=started, build_finished_at=finished)
            skewed = True
            invalid = "T23:59:60" in started
        originals.append(
            Delivery(f"chaos-{job_id}", job_id, json.dumps(hook).encode(), skewed, invalid)
        )
    deliveries = [
        Delivery(d.uuid, d.job_id, d.body, d.skewed, d.invalid)
        for d in originals
        for _ in range(settings.copies)
    ]
    rng.shuffle(deliveries)
    return deliveries, kinds


def fault_schedule(
    rng: random.Random, settings: ChaosSettings, kinds: Iterable[str]
) -> list[Fault]:
    """When each fault happens (seconds after posting starts). The provider outage comes early,
    so the requests it fails are retried (after act's failure backoff) within the run."""
    span = settings.post_seconds

    def slots(n: int, lo: float, hi: float) -> list[float]:
        # n moments in [lo, hi) of the window, one per equal slice (so they do not overlap).
        width = (hi - lo) / max(1, n)
        return [(lo + width * (i + rng.uniform(0.1, 0.9))) * span for i in range(n)]

    faults = [Fault(at, "provider") for at in slots(settings.provider_outages, 0.15, 0.8)]
    if settings.pg_restart:
        faults += [Fault(at, "pg") for at in slots(settings.pg_restarts, 0.3, 0.9)]
    if settings.nats_restart:
        faults += [Fault(at, "nats") for at in slots(settings.nats_restarts, 0.5, 0.95)]
    for kind in kinds:
        for _ in range(settings.kills_per_service):
            faults.append(Fault(rng.uniform(0.05, 1.0) * span, f"kill:{kind}"))
    return sorted(faults, key=lambda f: f.at)


class ChaosRun:
    def __init__(self, settings: ChaosSettings, workdir: Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.rng = random.Random(settings.seed)
        self.procs: dict[str, list[ServiceProcess]] = {}
        self.kills: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self.pg_windows: list[tuple[float, float]] = []
        self.nats_windows: list[tuple[float, float]] = []
        self.notes: list[str] = []

    # --- processes ----------------------------------------------------------------------

    def _all(self) -> list[ServiceProcess]:
        return [p for ps in self.procs.values() for p in ps]

    async def _kill_and_restart(self, kind: str) -> str:
        proc = self.rng.choice(self.procs[kind])
        assert proc.proc is not None
        if proc.proc.poll() is None:
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.proc.wait)
            self.kills[kind] += 1
        await asyncio.sleep(self.rng.uniform(0.0, 1.0))
        proc.start()
        self.restarts[kind] += 1
        return f"{kind}:{proc.port}"

    async def _nemesis(
        self, faults: list[Fault], gitlab: ChaosGitLab, infra: EmbeddedInfra
    ) -> None:
        t0 = time.monotonic()
        for f in faults:
            wait = t0 + f.at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            f.start = time.monotonic()
            if f.kind.startswith("kill:"):
                f.detail = await self._kill_and_restart(f.kind.split(":", 1)[1])
            elif f.kind == "pg":
                await asyncio.to_thread(infra.pg.stop)
                down = time.monotonic()
                await asyncio.sleep(self.s.pg_down_s)
                up = time.monotonic()
                self.pg_windows.append((down, up))
                await asyncio.to_thread(infra.pg.start)
            elif f.kind == "nats":
                await asyncio.to_thread(infra.nats.stop)
                down = time.monotonic()
                await asyncio.sleep(self.s.nats_down_s)
                self.nats_windows.append((down, time.monotonic()))
                await asyncio.to_thread(infra.nats.start)
            elif f.kind == "provider":
                gitlab.outage(self.s.provider_outage_s)
            f.end = time.monotonic()

    async def _ensure_up(self) -> None:
        for p in self._all():
            assert p.proc is not None
            if p.proc.poll() is not None:
                self.notes.append(f"{p.service}:{p.port} had exited {p.proc.returncode}")
                p.start()
                self.restarts[p.service] += 1
        await asyncio.gather(*(p.wait_ready(120) for p in self._all()))

    # --- observing ----------------------------------------------------------------------

    async def _counts(self, dsn: str) -> dict[str, int] | None:
        try:
            conn = await asyncpg.connect(dsn, timeout=5, server_settings={"search_path": "chaos"})
        except Exception:  # noqa: BLE001 - PostgreSQL restarting
            return None
        try:
            out = dict(await conn.fetch("SELECT type, count(*) FROM events GROUP BY type"))
            out["_unsettled"] = await conn.fetchval(
                "SELECT count(*) FROM events r WHERE r.type = 'RetryRequested' AND NOT EXISTS "
                "(SELECT 1 FROM events o WHERE o.idempotency_key = r.idempotency_key || ':outcome')"
            )
            out["_outbox"] = await conn.fetchval("SELECT count(*) FROM outbox")
            return out
        except Exception:  # noqa: BLE001
            return None
        finally:
            await conn.close()

    async def _settle(self, dsn: str, expected_jobs: int, sticky: StickyFailures) -> bool:
        """Until every job is decided, every request has its outcome, the outbox is empty and
        no rerun's webhook is still on its way (a rerun may start another: looked at again)."""
        deadline = time.monotonic() + self.s.settle_timeout
        while time.monotonic() < deadline:
            c = await self._counts(dsn)
            if c is not None and not sticky.busy:
                jobs = c.get("JobFinished", 0)
                decided = c.get("RetryRequested", 0) + c.get("RetrySkipped", 0)
                if (
                    jobs >= expected_jobs
                    and c.get("VerdictReached", 0) >= jobs
                    and decided >= jobs
                    and c["_unsettled"] == 0
                    and c["_outbox"] == 0
                ):
                    return True
            await asyncio.sleep(1.0)
        return False

    # --- the run ------------------------------------------------------------------------

    async def run(self) -> ChaosResult:
        began = time.monotonic()
        infra = EmbeddedInfra().start()
        gitlab = await ChaosGitLab(self.s.seed + 1).started()
        gitlab.echo_token = self.s.echo_token
        try:
            policy = self.workdir / "policy.toml"
            # Learning off: every job of this world is on one commit (abc123), so the jobs of
            # one name in different pipelines would be taken for retries of one another and
            # their outcomes would move verdicts; the invariants here are about delivery,
            # budgets and outages, not learning (tests/common/test_learning.py, bench/learning.py).
            policy.write_text(
                policy_without_backoff().replace(
                    "[learning]\nenabled = true", "[learning]\nenabled = false"
                )
            )
            env = service_env(
                pg_dsn=infra.dsn,
                schema="chaos",
                nats_url=infra.nats_url,
                prefix="chaos",
                gitlab_url=gitlab.url,
                policy_path=policy,
            )
            env.update(outage_env())
            env.update(
                CIRETRY_GITLAB_WEBHOOK_SECRETS=WEBHOOK_SECRET,
                CIRETRY_GITLAB_TOKEN=GITLAB_TOKEN,
                CIRETRY_API_TOKEN=API_TOKEN,
                CIRETRY_LOG_LEVEL=self.s.log_level,
            )
            deliveries, kinds = build_jobs(self.rng, self.s, gitlab)
            sticky = StickyFailures(random.Random(self.s.seed + 3), share=self.s.sticky_share)
            sticky.choose(kinds)
            gitlab.sticky = sticky
            rerun_answers: list[Answer] = []
            logs = self.workdir
            self.procs = {
                "ingest": [ServiceProcess("ingest", env, logs / "ingest.log")],
                "classify": [
                    ServiceProcess("classify", env, logs / f"classify{i}.log")
                    for i in range(self.s.classify)
                ],
                "act": [
                    ServiceProcess("act", env, logs / f"act{i}.log") for i in range(self.s.act)
                ],
            }
            ingest = self.procs["ingest"][0]
            hooks_url = f"http://127.0.0.1:{ingest.port}/webhooks/gitlab"

            async def post_rerun(kind: str, body: bytes, job_id: int) -> int:
                uuid = f"chaos-rerun-{kind[:3]}-{job_id}"
                (answer,) = await deliver(hooks_url, [Delivery(uuid, job_id, body)], duration=0)
                if kind == "Job Hook":
                    rerun_answers.append(answer)
                return answer.final

            sticky.post = post_rerun
            ingest.start()
            await ingest.wait_ready(120)  # migrations and the stream first
            for p in self._all()[1:]:
                p.start()
            await asyncio.gather(*(p.wait_ready(120) for p in self._all()[1:]))
            bad_tokens = await post_bad_tokens(
                f"http://127.0.0.1:{ingest.port}/webhooks/gitlab",
                deliveries,
                self.s.bad_token_posts,
            )
            faults = fault_schedule(self.rng, self.s, self.procs)
            nemesis = asyncio.create_task(self._nemesis(faults, gitlab, infra))
            answers = await deliver(
                f"http://127.0.0.1:{ingest.port}/webhooks/gitlab",
                deliveries,
                duration=self.s.post_seconds,
            )
            await nemesis
            await self._ensure_up()
            phase = None
            if self.s.outage_jobs:
                phase = await run_outage_phase(
                    self, gitlab, infra, f"http://127.0.0.1:{ingest.port}/webhooks/gitlab"
                )
                answers += phase.answers
                kinds.update(phase.kinds)
                deliveries += [a.delivery for a in phase.answers]
                await self._ensure_up()
            expected = len({d.job_id for d in deliveries if not d.invalid})
            settled = await self._settle(infra.dsn, expected, sticky)
            for p in self._all():
                p.stop()
            bus_ids, bus_messages = await read_stream_ids(infra.nats_url, "CHAOS")
            invariants, stats = await check(
                infra.dsn,
                gitlab,
                answers + rerun_answers,
                kinds | sticky.sticky,
                settled=settled,
                bus_ids=bus_ids,
                bus_messages=bus_messages,
                pg_windows=self.pg_windows,
                log_files=sorted(logs.glob("*.log")),
                disruptions=act_disruptions(faults, phase),
                outage=phase,
            )
            invariants.append(await check_processed_exactly_once(infra.dsn))
            if phase is not None:
                invariants += await check_outage_phase(
                    infra.dsn, gitlab, phase, sorted(logs.glob("*.log"))
                )
                stats["outage_phase"] = phase.stats
            if self.s.fuzz_requests:
                fuzzer = await _fuzz_ingest(env, logs, self.s.fuzz_requests, self.s.seed + 7)
                sent = sum(fuzzer.statuses.values())
                invariants.append(
                    Invariant(
                        "fuzzed requests: no answer >= 500",
                        not fuzzer.errors and sent == self.s.fuzz_requests,
                        f"sent={sent} statuses={dict(sorted(fuzzer.statuses.items()))} "
                        f"5xx={len(fuzzer.errors)} {fuzzer.errors[:3]}",
                    )
                )
                stats["fuzzed_requests"] = sent
                stats["fuzz_statuses"] = dict(sorted(fuzzer.statuses.items()))
            stats.update(
                webhooks_posted=len(deliveries),
                duplicates_posted=len(deliveries) - len({d.uuid for d in deliveries}),
                kills=dict(self.kills),
                restarts={
                    **dict(self.restarts),
                    "postgres": len(self.pg_windows),
                    "nats": len(self.nats_windows),
                },
                provider_faults=dict(gitlab.faults),
                skewed_jobs=len({d.job_id for d in deliveries if d.skewed}),
                bad_token_statuses=dict(Counter(bad_tokens)),
                sticky_jobs=sum(1 for j in sticky.sticky if j in kinds),
                reruns_reported=len(sticky.reruns),
                notes=self.notes,
            )
            return ChaosResult(
                self.s.seed, self.s, invariants, stats, faults, time.monotonic() - began
            )
        finally:
            for p in self._all():
                with contextlib.suppress(Exception):
                    p.stop()
            await gitlab.close()
            infra.stop()


async def _fuzz_ingest(
    env: dict[str, str], logs: Path, requests: int, seed: int
) -> Fuzzer:
    """An ingest of its own on the same servers, and ``requests`` mutated webhooks to it."""
    fenv = {
        **env,
        "CIRETRY_DATABASE_SCHEMA": "fuzz",
        "CIRETRY_NATS_PREFIX": "fuzz",
        "CIRETRY_NATS_STREAM": "FUZZ",
        "CIRETRY_GITHUB_WEBHOOK_SECRETS": FUZZ_GITHUB_SECRET,
    }
    proc = ServiceProcess("ingest", fenv, logs / "fuzz-ingest.log").start()
    try:
        await proc.wait_ready(120)
        fuzzer = Fuzzer(
            f"http://127.0.0.1:{proc.port}", WEBHOOK_SECRET, FUZZ_GITHUB_SECRET, API_TOKEN, seed
        )
        await fuzzer.run(requests)
    finally:
        proc.stop()
    return fuzzer


async def post_bad_tokens(url: str, deliveries: list[Delivery], n: int) -> list[int]:
    """Webhooks with wrong credentials: each must be a 401 (and, checked later, appear in no log
    line and no event)."""
    wrong = [WEBHOOK_SECRET + "0", API_TOKEN, GITLAB_TOKEN, WEBHOOK_SECRET[:-1], None]
    statuses = []
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            d = deliveries[i % len(deliveries)]
            headers = {
                "Content-Type": "application/json",
                "X-Gitlab-Event": "Job Hook",
                "X-Gitlab-Event-UUID": f"bad-{i}",
            }
            token = wrong[i % len(wrong)]
            if token is not None:
                headers["X-Gitlab-Token"] = token
            async with session.post(url, data=d.body, headers=headers) as r:
                statuses.append(r.status)
    return statuses


async def read_stream_ids(nats_url: str, stream: str) -> tuple[set[str], int]:
    """Every Nats-Msg-Id in the JetStream stream (read with an ephemeral consumer), and the
    number of messages."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(nats_url)
    ids: set[str] = set()
    n = 0
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        sub = await js.pull_subscribe(
            "",
            stream=stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        while n < total:
            try:
                msgs = await sub.fetch(500, timeout=2)
            except Exception:  # noqa: BLE001 - nats.errors.TimeoutError: nothing more
                break
            for m in msgs:
                n += 1
                ids.add((m.headers or {}).get("Nats-Msg-Id", ""))
        await sub.unsubscribe()
    finally:
        await nc.close()
    return ids, n


# --- invariants -----------------------------------------------------------------------------


_PIPELINE_PATH = re.compile(r"/pipelines/(\d+)/")


def _bodies(rows: Iterable[asyncpg.Record]) -> list[dict[str, Any]]:
    return [json.loads(r["b"]) for r in rows]


async def check(
    dsn: str,
    gitlab: ChaosGitLab,
    answers: list[Answer],
    kinds: dict[int, str],
    *,
    settled: bool,
    bus_ids: set[str],
    bus_messages: int,
    pg_windows: list[tuple[float, float]],
    log_files: list[Path],
    disruptions: Sequence[Disruption] = (),
    outage: OutagePhase | None = None,
) -> tuple[list[Invariant], dict[str, Any]]:
    from ciretry.act.policy import default_policy_text

    conn = await asyncpg.connect(dsn, server_settings={"search_path": "chaos"})
    try:

        async def bodies(kind: str) -> list[dict[str, Any]]:
            rows = await conn.fetch(
                "SELECT convert_from(body, 'UTF8') AS b FROM events WHERE type = $1 "
                "ORDER BY position",
                kind,
            )
            return _bodies(rows)

        jobs = await bodies("JobFinished")
        verdicts = await bodies("VerdictReached")
        requested = await bodies("RetryRequested")
        skipped = await bodies("RetrySkipped")
        issued = await bodies("RetryIssued")
        failed = await bodies("RetryFailed")
        rejected = await bodies("MessageRejected")
        event_ids = {str(r[0]) for r in await conn.fetch("SELECT event_id FROM events")}
        outbox = await conn.fetchval("SELECT count(*) FROM outbox")
        all_text = await conn.fetchval(
            "SELECT string_agg(convert_from(body, 'UTF8') || metadata::text, E'\\n') FROM events"
        )
    finally:
        await conn.close()

    inv: list[Invariant] = []

    def add(name: str, ok: bool, numbers: str) -> None:
        inv.append(Invariant(name, bool(ok), numbers))

    # 1. Every webhook answered 2xx is in the log exactly once; nothing else is.
    accepted = {a.delivery.job_id for a in answers if 200 <= a.final < 300}
    stored = Counter(int(j["job_id"]) for j in jobs)
    missing = accepted - set(stored)
    doubled = [j for j, n in stored.items() if n > 1]
    unasked = set(stored) - accepted
    add(
        "2xx webhook stored exactly once",
        not missing and not doubled and not unasked,
        f"accepted jobs={len(accepted)} stored={len(stored)} missing={len(missing)} "
        f"doubled={len(doubled)} stored-without-2xx={len(unasked)}",
    )
    finals = Counter(a.final for a in answers)
    five = sum(n for s, n in finals.items() if s >= 500)
    invalid_ok = all(400 <= a.final < 500 for a in answers if a.delivery.invalid)
    add(
        "no webhook finally 5xx; invalid ones 4xx",
        five == 0 and invalid_ok and all(a.final > 0 for a in answers),
        f"final statuses={dict(sorted(finals.items()))}",
    )
    # 2. Every failed job has exactly one verdict, and one decision.
    per_job_verdicts = Counter(int(v["job_id"]) for v in verdicts)
    bad_v = [j for j in stored if per_job_verdicts.get(j) != 1]
    add(
        "every failed job has exactly one verdict",
        not bad_v and len(per_job_verdicts) == len(stored),
        f"jobs={len(stored)} verdicts={len(verdicts)} off={len(bad_v)}",
    )
    per_job_decisions = Counter(int(d["job_id"]) for d in requested + skipped)
    bad_d = [j for j in stored if per_job_decisions.get(j) != 1]
    add(
        "every verdict has exactly one decision",
        not bad_d,
        f"requested={len(requested)} skipped={len(skipped)} off={len(bad_d)}",
    )
    # 3. Provider calls: per job within the policy's limit, never twice for one request, and
    # exactly one successful call behind every RetryIssued (tests/support/chaos/calls.py).
    import tomllib

    job_limit = int(tomllib.loads(default_policy_text())["default"]["attempts"]["system"])
    key_job = {r["idempotency_key"]: int(r["job_id"]) for r in requested}
    log_lines = [line for path in log_files for line in path.read_text(errors="replace").split("\n")]
    acc = account_calls(
        gitlab.record,
        requested,
        issued,
        job_limit=job_limit,
        disruptions=disruptions,
        timed_out=timed_out_keys(log_lines, key_job),
    )
    fresh = [i for i in issued if not i.get("found_existing")]
    found = [i for i in issued if i.get("found_existing")]
    add(
        "provider calls per job <= limit, 0 double",
        acc.never_twice,
        f"requests called={len(acc.calls)} calls={acc.total} limit={job_limit} "
        f"double={len(acc.double)} {acc.double[:3]} over={len(acc.over_limit)} "
        f"without a request={len(acc.unattributed)} {acc.unattributed[:3]}",
    )
    add(
        "provider calls = RetryIssued",
        acc.one_call_per_issued,
        f"calls={acc.total} issued={len(issued)} (fresh={len(fresh)}, "
        f"found_existing={len(found)}: {acc.explanations()}) "
        f"issued without one call={len(acc.issued_not_called_once)} "
        f"{acc.issued_not_called_once[:3]} called without RetryIssued="
        f"{len(acc.called_not_issued)} {acc.called_not_issued[:3]}",
    )
    # 4. No chain over its budget, counted here from the raw events: which chain a pipeline is
    # in comes from the provider's record (each created pipeline's CIRETRY_RETRY_OF).
    created = [
        (key, p["id"])
        for p in gitlab.pipelines.values()
        if p.get("source") == "api"
        for key in [next((v["value"] for v in p["variables"]
                          if v["key"] == "CIRETRY_RETRY_OF"), None)]  # fmt: skip
        if key
    ]
    limits = Limits.of(tomllib.loads(default_policy_text()))
    over_budget, chain_stats = budget_violations(jobs, requested, created, limits)
    add(
        "no job or chain over its budget (own count)",
        not over_budget,
        f"chains={chain_stats['chains']} spanning pipelines="
        f"{chain_stats['chains_longer_than_one_pipeline']} jobs at their limit="
        f"{chain_stats['jobs_at_their_limit']} requests={len(requested)} "
        f"violations={len(over_budget)} {over_budget[:3]}",
    )
    # 5. Every RetryRequested issued or explained by a final RetryFailed with a reason.
    outcomes = {i["idempotency_key"] for i in issued}
    finals_failed = {f["idempotency_key"] for f in failed if not f.get("will_retry")}
    reasonless = [f for f in failed if not (f.get("detail") or "").strip()]
    unexplained = [k for k in key_job if k not in outcomes and k not in finals_failed]
    add(
        "every RetryRequested issued or explained",
        settled and not unexplained and not reasonless,
        f"requests={len(key_job)} issued={len(outcomes)} failed(final)={len(finals_failed)} "
        f"unexplained={len(unexplained)} settled={settled}",
    )
    # 6. Provider down: backoff, failures with a reason, no hot loop.
    # The outage phase's pipelines have their own, longer bound (check_outage_phase).
    injected = [c for c in gitlab.record if c.injected and not (outage and outage.owns(c.path))]
    transient_failures = [f for f in failed if f.get("will_retry")]
    per_pipeline: Counter[str] = Counter(
        m.group(1) for c in injected if (m := _PIPELINE_PATH.search(c.path))
    )
    per_job_posts: Counter[str] = Counter(c.path for c in injected if c.path.endswith("/retry"))
    requests_per_pipeline = Counter(str(r["pipeline_id"]) for r in requested)
    # Per request: at most max_attempts rounds of (check, call) per execution; an execution may
    # be repeated by a redelivery, not by a loop.
    bound = 2 * EXECUTOR_MAX_ATTEMPTS * 2
    hot = [p for p, n in per_pipeline.items() if n > bound * requests_per_pipeline.get(p, 1)]
    hot += [p for p, n in per_job_posts.items() if n > 2 * EXECUTOR_MAX_ATTEMPTS]
    window = sum(b - a for a, b in gitlab.windows) or 1.0
    add(
        "provider outage: backoff, reasons, no hot loop",
        not hot and (not injected or bool(transient_failures)),
        f"injected={len(injected)} ({len(injected) / window:.1f}/s over {window:.0f}s) "
        f"RetryFailed(will_retry)={len(transient_failures)} "
        f"max per pipeline={max(per_pipeline.values(), default=0)} hot={hot[:3]}",
    )
    # 7. PostgreSQL down: ingest answered 503 (or was unreachable), never 2xx or 500.
    # An invalid payload (the leap second) is refused with a 4xx before the database is asked:
    # right while it is down too.
    during: Counter[int] = Counter()
    refused_invalid = 0
    for a in answers:
        for at in a.attempts:
            if any(down <= at.t0 and at.t1 <= up for down, up in pg_windows):
                if a.delivery.invalid and 400 <= at.status < 500:
                    refused_invalid += 1
                    continue
                during[at.status] += 1
    bad_during = {s: n for s, n in during.items() if s not in (503, -1, -2)}
    add(
        "postgres down: ingest 503, accepts nothing",
        not bad_during and (not pg_windows or during.get(503, 0) > 0),
        f"answers while down={dict(sorted(during.items()))}, invalid refused={refused_invalid}",
    )
    # 8. Every event reached the bus (the outbox drained after the NATS restart).
    unpublished = event_ids - bus_ids
    add(
        "outbox drained: every event on the bus",
        outbox == 0 and not unpublished,
        f"events={len(event_ids)} on bus={len(event_ids & bus_ids)} outbox={outbox} "
        f"bus messages={bus_messages} (redelivered past the window={bus_messages - len(bus_ids)})",
    )
    # 9. Clock skew changed nothing: skewed jobs were stored and decided like the others.
    skewed = {a.delivery.job_id for a in answers if a.delivery.skewed and not a.delivery.invalid}
    add(
        "skewed timestamps: stored and decided",
        all(stored.get(j) == 1 and per_job_decisions.get(j) == 1 for j in skewed),
        f"skewed jobs={len(skewed)}",
    )
    # 10. No poison messages; no secret in any log line or event.
    leaks = []
    for path in log_files:
        text = path.read_text(errors="replace")
        leaks += [(path.name, s) for s in SECRETS if s in text]
    leaks += [("events", s) for s in SECRETS if all_text and s in all_text]
    add("no message rejected as poison", not rejected, f"MessageRejected={len(rejected)}")
    add("secrets never in logs or events", not leaks, f"leaks={leaks[:3]}")

    retries_by_kind = Counter(kinds.get(int(r["job_id"]), "?") for r in requested)
    stats = {
        "webhooks_accepted": sum(1 for a in answers if 200 <= a.final < 300),
        "webhook_statuses": {str(k): v for k, v in sorted(finals.items())},
        "webhook_attempts": sum(len(a.attempts) for a in answers),
        "jobs_stored": len(stored),
        "verdicts": len(verdicts),
        "retry_requested": len(requested),
        "retry_skipped": len(skipped),
        "retry_issued": len(issued),
        "retry_issued_found_existing": len(found),
        "retry_failed": len(failed),
        "retry_failed_details": sorted({f.get("detail", "")[:120] for f in failed})[:5],
        "provider_retry_calls": acc.total,
        "found_existing_explained_by": acc.explanations(),
        # When each found call was read, from the start of the fault that explains it: > 0 is
        # a call read after its fault began (the old 30-s rule called those unexplained).
        "found_existing_call_after_fault_start": sorted(
            f"{acc.found[k]} {s:+.2f}s" for k, s in acc.found_offset.items()
        ),
        "retries_by_kind": dict(retries_by_kind),
        "events": len(event_ids),
        **chain_stats,
    }
    return inv, stats


# --- the outage phase (issue 13) --------------------------------------------------------------

#: The schedules every run's services use (``outage_env``): short enough for a CI-sized outage
#: phase to outlast them, long enough to be schedules. act gives up a request after
#: ACT_MAX_FAILURES failed executions (above), waiting ACT_FAILURE_BACKOFF s doubling between.
CONSUMER_MAX_DELIVER = 4
CONSUMER_BACKOFF_BASE = 0.2
CONSUMER_BACKOFF_CAP = 1.0
ACT_FAILURE_BACKOFF = 1.0
#: Deliveries JetStream made of a failing message before issue 13 (max_deliver + 5), after
#: which it stopped delivering it without a word.
OLD_SERVER_DELIVERIES = CONSUMER_MAX_DELIVER + 5

_BUS_ATTEMPT = re.compile(r'"?(classify|act): \w+ on [0-9a-f-]{36} \(bus attempt (\d+)\)')
_JOB_PATH = re.compile(r"/jobs/(\d+)/")


def outage_env() -> dict[str, str]:
    return {
        "CIRETRY_CONSUMER_MAX_DELIVER": str(CONSUMER_MAX_DELIVER),
        "CIRETRY_CONSUMER_BACKOFF_BASE": str(CONSUMER_BACKOFF_BASE),
        "CIRETRY_CONSUMER_BACKOFF_CAP": str(CONSUMER_BACKOFF_CAP),
        "CIRETRY_CONSUMER_CATCH_UP_GRACE": "5",
        "CIRETRY_CONSUMER_CATCH_UP_INTERVAL": "1",
        "CIRETRY_ACT_MAX_FAILURES": str(ACT_MAX_FAILURES),
        "CIRETRY_ACT_FAILURE_BACKOFF": str(ACT_FAILURE_BACKOFF),
        "CIRETRY_ACT_SCHEDULER_INTERVAL": "1",
    }


def consumer_schedule_s() -> float:
    """How long JetStream kept delivering a failing message before issue 13: the longest nak
    delays after each of its deliveries but the last."""
    return float(
        sum(
            min(CONSUMER_BACKOFF_CAP, CONSUMER_BACKOFF_BASE * 2.0 ** (d - 1))
            for d in range(1, OLD_SERVER_DELIVERIES)
        )
    )


def act_schedule_s() -> float:
    """The longest act waits between the failed executions of a request before it gives up
    (each execution's own retries come on top: EXECUTOR_MAX_ATTEMPTS calls, seconds apart)."""
    return float(sum(ACT_FAILURE_BACKOFF * 2.0 ** (n - 1) for n in range(1, ACT_MAX_FAILURES)))


@dataclass
class OutagePhase:
    answers: list[Answer]
    kinds: dict[int, str]
    jobs: frozenset[int]
    pipelines: frozenset[str]
    pg_window: tuple[float, float]
    provider_window: tuple[float, float]
    #: When act was paused (SIGSTOP); it runs again once PostgreSQL is stopped.
    act_paused_at: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def owns(self, path: str) -> bool:
        """Whether a provider call (by its path) is about one of the phase's jobs."""
        pipeline, job = _PIPELINE_PATH.search(path), _JOB_PATH.search(path)
        return bool(
            (pipeline and pipeline.group(1) in self.pipelines)
            or (job and int(job.group(1)) in self.jobs)
        )


def build_outage_jobs(
    n: int, retryable: int, gitlab: FakeGitLab
) -> tuple[list[Delivery], dict[int, str]]:
    """``n`` failing jobs, each in a pipeline of its own, ids apart from the main window's:
    ``retryable`` of the network kind (a provider call each), spread over both halves, the
    others compile errors (decided, no call)."""
    deliveries, kinds = [], {}
    network = {round(k * n / retryable) for k in range(retryable)} if retryable else set()
    for i in range(n):
        job_id, pipeline_id = 900_000 + i, 90_000 + i
        kind = "network" if i in network else "compile"
        gitlab.add_job(job_id, "outage", pipeline_id)
        gitlab.traces[job_id] = NETWORK_LOG if kind == "network" else COMPILE_LOG
        hook = json.loads(job_hook(job_id, pipeline_id, "outage"))
        hook.update(ref="main", sha="abc123")
        deliveries.append(Delivery(f"outage-{job_id}", job_id, json.dumps(hook).encode()))
        kinds[job_id] = kind
    return deliveries, kinds


async def _verdicts_for(dsn: str, job_ids: Iterable[int]) -> int:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "chaos"})
    try:
        return int(
            await conn.fetchval(
                "SELECT count(DISTINCT convert_from(body, 'UTF8')::json->>'job_id') FROM events "
                "WHERE type = 'VerdictReached' "
                "AND convert_from(body, 'UTF8')::json->>'job_id' = ANY($1::text[])",
                [str(j) for j in job_ids],
            )
        )
    finally:
        await conn.close()


async def run_outage_phase(
    run: ChaosRun, gitlab: ChaosGitLab, infra: EmbeddedInfra, url: str
) -> OutagePhase:
    """Both followers get messages they cannot process for longer than their whole nak
    schedule, then act's provider stays down for longer than act's failure schedule:

    1. act paused (SIGSTOP), half the jobs posted: classify verdicts them, act cannot take
       the verdicts yet; 2. classify paused too, the other half posted (committed and on the
       bus); 3. PostgreSQL stopped, the provider API down, both resumed: classify fails on
       the second half, act on the first half's verdicts, delivery after delivery, for
       ``outage_pg_s``; 4. PostgreSQL back: every job must be verdicted and decided once, and
       every request closed once (given up while the provider stays down, or decided and
       issued once it is back when act could not ask it where the job's pipeline came from)."""
    s = run.s
    if s.outage_pg_s <= consumer_schedule_s() + 1:
        raise ValueError(f"outage_pg_s must outlast the nak schedule ({consumer_schedule_s()} s)")
    deliveries, kinds = build_outage_jobs(s.outage_jobs, s.outage_retryable, gitlab)
    first, second = deliveries[: len(deliveries) // 2], deliveries[len(deliveries) // 2 :]
    paused: list[ServiceProcess] = []

    def pause(kind: str) -> None:
        for p in run.procs[kind]:
            if p.proc is not None and p.proc.poll() is None:
                p.signal(signal.SIGSTOP)
                paused.append(p)

    try:
        pause("act")
        act_paused_at = time.monotonic()
        answers = await deliver(url, first, duration=0.5)
        deadline = time.monotonic() + 60
        while await _verdicts_for(infra.dsn, [d.job_id for d in first]) < len(first):
            if time.monotonic() > deadline:
                raise TimeoutError("outage phase: classify did not verdict the first half")
            await asyncio.sleep(0.2)  # another program's database: nothing to await
        pause("classify")
        answers += await deliver(url, second, duration=0.5)
        await asyncio.to_thread(infra.pg.stop)
        down = time.monotonic()
        provider = gitlab.outage(s.outage_pg_s + s.outage_provider_extra_s)
    finally:
        for p in paused:
            p.signal(signal.SIGCONT)
    await asyncio.sleep(s.outage_pg_s)
    up = time.monotonic()
    await asyncio.to_thread(infra.pg.start)
    return OutagePhase(
        answers=answers,
        kinds=kinds,
        jobs=frozenset(kinds),
        pipelines=frozenset(str(90_000 + i) for i in range(s.outage_jobs)),
        pg_window=(down, up),
        provider_window=provider,
        act_paused_at=act_paused_at,
    )


_FLOW_EVENTS = """
SELECT event_id, type, convert_from(body, 'UTF8') AS b, idempotency_key FROM events
WHERE type IN ('JobFinished', 'VerdictReached', 'RetryRequested', 'RetrySkipped', 'RetryIssued',
               'RetryFailed')
"""


async def check_processed_exactly_once(dsn: str) -> Invariant:
    """From the log alone, event by event: every failed JobFinished has exactly one
    VerdictReached (by job_event_id), every VerdictReached exactly one decision (by
    verdict_event_id), every RetryRequested exactly one final outcome and fewer transient
    failures than act allows; and every event of a follower's topic has its tracking row
    (processed, with or without outputs: the followers' catch-up relies on it)."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "chaos"})
    try:
        rows = await conn.fetch(_FLOW_EVENTS)
        untracked = {
            consumer: await conn.fetchval(
                "SELECT count(*) FROM events e WHERE e.type = $2 AND NOT EXISTS "
                "(SELECT 1 FROM tracking t WHERE t.consumer = $1 AND t.event_id = e.event_id)",
                consumer,
                kind,
            )
            for consumer, kind in (("classify", "JobFinished"), ("act", "VerdictReached"))
        }
    finally:
        await conn.close()
    failed_jobs: set[str] = set()
    verdicts: Counter[str] = Counter()
    verdict_ids: set[str] = set()
    decisions: Counter[str] = Counter()
    requests: set[str] = set()
    outcomes: Counter[str] = Counter()
    transient: Counter[str] = Counter()
    for r in rows:
        body = json.loads(r["b"])
        kind, key = r["type"], r["idempotency_key"] or ""
        if kind == "JobFinished" and body.get("status") == "failed":
            failed_jobs.add(str(r["event_id"]))
        elif kind == "VerdictReached":
            verdicts[str(body.get("job_event_id"))] += 1
            verdict_ids.add(str(r["event_id"]))
        elif kind in ("RetryRequested", "RetrySkipped") and body.get("reason") != "dry_run":
            decisions[str(body.get("verdict_event_id"))] += 1
            if kind == "RetryRequested":
                requests.add(key)
        if key.endswith(":outcome"):
            outcomes[key.removesuffix(":outcome")] += 1
        elif kind == "RetryFailed" and ":failed:" in key:
            transient[key.rsplit(":failed:", 1)[0]] += 1
    off_verdicts = [j for j in failed_jobs if verdicts.get(j) != 1]
    stray_verdicts = [j for j in verdicts if j not in failed_jobs]
    off_decisions = [v for v in verdict_ids if decisions.get(v) != 1]
    stray_decisions = [v for v in decisions if v not in verdict_ids]
    off_outcomes = [k for k in requests if outcomes.get(k) != 1]
    over_failed = [k for k, n in transient.items() if n >= ACT_MAX_FAILURES]
    ok = not (
        off_verdicts
        or stray_verdicts
        or off_decisions
        or stray_decisions
        or off_outcomes
        or over_failed
        or any(untracked.values())
    )
    return Invariant(
        "every committed event processed exactly once (log)",
        ok,
        f"failed jobs={len(failed_jobs)} verdicts off={len(off_verdicts)} "
        f"stray={len(stray_verdicts)}; verdicts={len(verdict_ids)} decisions "
        f"off={len(off_decisions)} stray={len(stray_decisions)}; requests={len(requests)} "
        f"outcomes off={len(off_outcomes)} over {ACT_MAX_FAILURES - 1} failures="
        f"{len(over_failed)}; untracked={untracked}",
    )


async def check_outage_phase(
    dsn: str, gitlab: ChaosGitLab, phase: OutagePhase, log_files: list[Path]
) -> list[Invariant]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "chaos"})
    try:
        rows = await conn.fetch(_FLOW_EVENTS)
    finally:
        await conn.close()
    per_job: dict[int, Counter[str]] = {j: Counter() for j in phase.jobs}
    given_up: set[int] = set()
    for r in rows:
        body = json.loads(r["b"])
        job = int(body["job_id"]) if str(body.get("job_id", "")).isdigit() else -1
        if job not in per_job:
            continue
        key = r["idempotency_key"] or ""
        kind = r["type"]
        if kind == "RetryFailed":
            kind = "RetryFailed(final)" if key.endswith(":outcome") else "RetryFailed(transient)"
            if key.endswith(":outcome"):
                given_up.add(job)
        per_job[job][kind] += 1
    retryable = {j for j in per_job if phase.kinds.get(j) == "network"}
    off = [
        j
        for j, c in per_job.items()
        if c["JobFinished"] != 1
        or c["VerdictReached"] != 1
        or c["RetryRequested"] + c["RetrySkipped"] != 1
        or c["RetryIssued"] + c["RetryFailed(final)"] != c["RetryRequested"]
        or (j in retryable) != (c["RetryRequested"] == 1)
    ]
    # Deliveries past the point where JetStream used to stop, in the services' own logs.
    most: dict[str, int] = {"classify": 0, "act": 0}
    for path in log_files:
        for m in _BUS_ATTEMPT.finditer(path.read_text(errors="replace")):
            most[m.group(1)] = max(most[m.group(1)], int(m.group(2)))
    down_s = phase.pg_window[1] - phase.pg_window[0]
    provider_s = phase.provider_window[1] - phase.provider_window[0]
    # Provider calls about the phase's jobs: EXECUTOR_MAX_ATTEMPTS per execution, at most
    # ACT_MAX_FAILURES executions per request (one more after a crash or a redelivery).
    posts = Counter(c.path for c in gitlab.record if c.method == "POST" and phase.owns(c.path))
    bound = EXECUTOR_MAX_ATTEMPTS * (ACT_MAX_FAILURES + 1)
    hot = [p for p, n in posts.items() if n > bound]
    start = phase.provider_window[0]
    calls = [c for c in gitlab.record if phase.owns(c.path)]
    transient = [c["RetryFailed(transient)"] for c in per_job.values()]
    issued_late = sum(
        1
        for c in calls
        if c.method == "POST" and not c.injected and 200 <= c.status < 300
        and c.t >= phase.provider_window[1]
    )  # fmt: skip
    phase.stats.update(
        jobs=len(phase.jobs),
        pg_down_s=round(down_s, 1),
        consumer_schedule_s=round(consumer_schedule_s(), 1),
        provider_down_s=round(provider_s, 1),
        act_wait_schedule_s=act_schedule_s(),
        retryable=len(retryable),
        issued=sum(c["RetryIssued"] for c in per_job.values()),
        given_up=len(given_up),
        max_bus_attempt=most,
        transient_failures_per_job=dict(sorted(Counter(transient).items())),
        provider_calls=len(calls),
        injected=sum(c.injected for c in calls),
        first_call_s=round(min((c.t - start for c in calls), default=-1), 1),
        last_injected_s=round(max((c.t - start for c in calls if c.injected), default=-1), 1),
    )
    return [
        Invariant(
            "outage: deliveries went on past JetStream's old limit",
            down_s > consumer_schedule_s()
            and all(n > OLD_SERVER_DELIVERIES for n in most.values()),
            f"postgres down {down_s:.1f}s > nak schedule {consumer_schedule_s():.1f}s; most "
            f"deliveries of one message: {most} (JetStream used to stop at "
            f"{OLD_SERVER_DELIVERIES})",
        ),
        Invariant(
            "outage: every job verdicted, decided, closed once",
            # A request is given up while the provider stays down, or (when act could not ask
            # the provider where the job's pipeline came from) decided and issued only once the
            # provider is back: never decided on a guess.
            not off and not hot and (bool(given_up) or issued_late == phase.stats["issued"] > 0),
            f"jobs={len(per_job)} (retryable {len(retryable)}) off={len(off)} {off[:3]}; provider "
            f"down {provider_s:.0f}s: issued={phase.stats['issued']} (after it: {issued_late}) given up="
            f"{len(given_up)} (after "
            f"{ACT_MAX_FAILURES} failures); most calls per job path="
            f"{max(posts.values(), default=0)} (bound {bound})",
        ),
    ]


def act_disruptions(faults: Iterable[Fault], phase: OutagePhase | None) -> list[Disruption]:
    """The times act may have lost a call's outcome: its kills, PostgreSQL's restarts, and the
    outage phase's pause (from SIGSTOP until PostgreSQL is back)."""
    kinds = {"kill:act": "killed", "pg": "database"}
    out = [Disruption(kinds[f.kind], f.start, f.end) for f in faults if f.kind in kinds]
    if phase is not None:
        out.append(Disruption("paused", phase.act_paused_at, phase.pg_window[1]))
    return out


async def run_chaos(settings: ChaosSettings, workdir: Path | None = None) -> ChaosResult:
    tmp = workdir or Path(tempfile.mkdtemp(prefix="ciretry-chaos-logs-"))
    return await ChaosRun(settings, tmp).run()


def by_kind(faults: list[Fault]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for f in faults:
        out[f.kind] += 1
    return dict(out)


__all__ = [
    "API_TOKEN",
    "ChaosGitLab",
    "ChaosResult",
    "ChaosRun",
    "ChaosSettings",
    "DEFAULT_SEED",
    "EmbeddedInfra",
    "GITLAB_TOKEN",
    "SECRETS",
    "WEBHOOK_SECRET",
    "chaos_seed",
    "deliver",
    "run_chaos",
]
