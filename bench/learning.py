"""Learning from outcomes, end to end (issue 15): how many spurious failures ciretry retries by
itself with its rules alone, and with what it learned from what happened next.

``bench/learning.py [--labels FILE] [--root DIR] [--jobs N] [--seed S]`` (defaults: the shared
labelled logs, ``../shared/fixtures/logs/labels.json`` under root ``../shared/fixtures``; any file
in that format works: a JSON list of ``{"file", "retryable", ...}``, files relative to the root,
gzip-compressed or not; ``retryable`` ``yes``/``no`` are used, ``either`` is left out, other keys
are ignored).

It runs the real services (ingest, classify and act as processes, over PostgreSQL and NATS) and
a fake GitLab through a seeded history of ``--jobs`` (>= 2,000) failed jobs, twice: learning off
(``[learning] enabled = false`` in the policy) and learning on, each in a fresh schema and stream.

The history: each failure is a log drawn from the labelled corpus, altered the way a rerun of
the same failure differs (``tests/support/reruns.py``: timestamps, durations, ids, hashes, temp
paths, ports, interleaving), in a job of its own (named by a hash of the log's file name, which
may describe the failure), on a commit of one of 4 projects, in a pipeline of 1-3 failed jobs,
on one of 6 runners. It is played in waves of 100 failures, each wave once the previous one has
settled (every failed attempt decided on, every retry answered), as time passes in a real
deployment.

The simulated CI is the only place the labels are read: a retry (ciretry's, through the fake
GitLab's retry API, or a simulated person's, who retries half of the first failures ciretry
leaves alone) of a spurious failure passes; of a deterministic one it fails again with the same
log (altered again). The services see webhooks, logs and API answers only.

Reported, per run: ``recall`` = share of spurious first failures ciretry itself retried, over
the second half of the history; ``false_retries`` = retries ciretry requested of deterministic
failures, over the whole history; ``human_retries`` = retries the simulated person made. The
last line is ``BENCH {json}`` with ``ratio`` = ``recall_learned``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gzip
import hashlib
import json
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ciretry.act.policy import default_policy_text  # noqa: E402
from ciretry.common.bus import Bus  # noqa: E402
from ciretry.common.events import (  # noqa: E402
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    from_wire,
)
from ciretry.common.learning import learning_settings_from_text  # noqa: E402
from tests.support.chaos.processes import ServiceProcess  # noqa: E402
from tests.support.providers import FakeGitLab  # noqa: E402
from tests.support.reruns import rerun_log  # noqa: E402
from tests.support.scenario import FIXTURES, post_all, service_env  # noqa: E402
from tests.support.servers import servers  # noqa: E402

WAVE = 100
PROJECTS = (11, 12, 13, 14)
RUNNERS = tuple(f"runner-{i}" for i in range(6))
#: Every retryable failure may spend its budget: the run measures verdicts, not pipeline shares;
#: and a simulated pipeline holds only its failed jobs (the passing ones are not played), so its
#: share of deterministic failures says nothing about it being mostly broken.
POLICY_EXTRA = (
    '\n[[scopes]]\nname = "bench"\nprojects = ["*"]\n[scopes.pipeline]\nfloor = 100\npercent = 100.0\n'
    "[scopes.mostly_broken]\ncount = 100\nfraction = 1.0\n"
)


@dataclass(frozen=True)
class Labelled:
    name: str
    data: bytes
    spurious: bool


@dataclass
class Failure:
    """One failed job of the history (its first attempt) and the truth about it."""

    index: int
    log: Labelled
    project: int
    pipeline: int
    sha: str
    job_name: str
    runner: str

    @property
    def ref(self) -> str:
        """Each commit on its own branch, whose head it is: a rerun on the branch's tip is a
        rerun of this commit (GitLab creates reruns with more memory on the tip)."""
        return f"topic-{self.pipeline}"


@dataclass
class Run:
    retried_first: set[int] = field(default_factory=set)  # failure indexes ciretry retried
    false_retries: int = 0
    human_retries: int = 0
    ciretry_retries: int = 0
    seconds: float = 0.0
    learned_verdicts: int = 0
    spurious_skips: dict[str, int] = field(default_factory=dict)


def load_labels(labels: Path, root: Path) -> list[Labelled]:
    out = []
    for entry in json.loads(labels.read_text()):
        retryable = str(entry.get("retryable", "")).lower()
        if retryable not in ("yes", "no"):
            continue
        path = root / entry["file"]
        if not path.exists():
            path = labels.parent / entry["file"]
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
        # The services fetch the log's tail; 2 MB of it is what a failure shows at its end.
        if len(data) > 2 * 1024 * 1024:
            data = data[data.find(b"\n", len(data) - 2 * 1024 * 1024) + 1 :]
        out.append(Labelled(entry["file"], data, retryable == "yes"))
    return out


def history(logs: list[Labelled], jobs: int, seed: int) -> list[Failure]:
    rng = random.Random(seed)
    out: list[Failure] = []
    pipeline = 5000
    while len(out) < jobs:
        pipeline += 1
        project = rng.choice(PROJECTS)
        sha = f"{rng.getrandbits(160):040x}"
        runner = rng.choice(RUNNERS)
        for log in rng.sample(logs, k=min(len(logs), rng.choice((1, 1, 2, 3)))):
            if len(out) >= jobs:
                break
            # One job per log, named by a hash of the log's file name: the file names of a
            # labelled corpus may describe the failure ("runner-disk-full"), and nothing of
            # the labels may reach the services.
            job_name = "job-" + hashlib.sha256(log.name.encode()).hexdigest()[:10]
            out.append(Failure(len(out), log, project, pipeline, sha, job_name, runner))
    return out


def hook(job_id: int, pipeline: int, failure: Failure, status: str) -> bytes:
    body = copy.deepcopy(
        json.loads((FIXTURES / "gitlab_webhooks" / "go-gitlab__job.json").read_text())
    )
    body.update(
        build_id=job_id,
        build_status=status,
        build_failure_reason="script_failure" if status == "failed" else None,
        project_id=failure.project,
        pipeline_id=pipeline,
        build_name=failure.job_name,
        ref=failure.ref,
        sha=failure.sha,
    )
    body["runner"]["description"] = failure.runner
    body["commit"]["sha"] = failure.sha
    return json.dumps(body).encode()


def person_retries(seed: int, failure: Failure) -> bool:
    """Whether the simulated person retries this failure when ciretry leaves it alone: a coin
    per failure, the same in every run."""
    return random.Random(seed * 1_000_003 + failure.index).random() < 0.5


class Simulation:
    """The simulated CI and the simulated person, over one deployment of the services."""

    def __init__(self, gitlab: FakeGitLab, url: str, failures: list[Failure], seed: int) -> None:
        self.gitlab = gitlab
        self.url = url
        self.failures = failures
        self.rng = random.Random(seed + 1)
        self.seed = seed
        self.next_job = 1_000_000
        self.of_job: dict[int, Failure] = {}
        self.first_job: dict[int, int] = {}  # failure index -> its first job id
        self.decided: dict[int, str] = {}  # job id -> "requested" | "skipped"
        self.issued: dict[int, int] = {}  # old job id -> new job id (ciretry's retry)
        self.answered: set[int] = set()  # ciretry retries the CI finished
        self.waiting: set[int] = set()  # failed attempts posted, decision pending
        self.changed = asyncio.Event()
        self.run = Run()
        self.seen: set[str] = set()

    async def on_msg(self, msg: Any) -> None:
        headers = msg.headers or {}
        mid = headers.get("Nats-Msg-Id", "")
        if mid in self.seen:
            return
        self.seen.add(mid)
        event = from_wire(msg.data).data
        if isinstance(event, RetryRequested) and not event.dry_run:
            job = int(event.job_id)
            self.decided[job] = "requested"
            self.run.ciretry_retries += 1
            failure = self.of_job.get(job)
            if failure is not None:
                if not failure.log.spurious:
                    self.run.false_retries += 1
                if self.first_job.get(failure.index) == job:
                    self.run.retried_first.add(failure.index)
            if event.category == "learned_spurious" or event.budget == "learned":
                self.run.learned_verdicts += 1
        elif isinstance(event, RetrySkipped):
            job = int(event.job_id)
            self.decided[job] = "skipped"
            failure = self.of_job.get(job)
            if (
                failure is not None
                and failure.log.spurious
                and self.first_job.get(failure.index) == job
            ):
                key = f"{event.reason}:{event.category}"
                self.run.spurious_skips[key] = self.run.spurious_skips.get(key, 0) + 1
        elif isinstance(event, RetryIssued) and event.new_job_id:
            self.issued[int(event.job_id)] = int(event.new_job_id)
        elif isinstance(event, RetryIssued) and event.new_pipeline_id:
            # A rerun with more memory (or a recreated pipeline): the CI runs the job again in
            # the new pipeline, on the same commit.
            failure = self.of_job.get(int(event.job_id))
            if failure is not None:
                new_pipeline = int(event.new_pipeline_id)
                self.gitlab.pipelines[new_pipeline]["sha"] = failure.sha
                self.issued[int(event.job_id)] = self._new_job(failure, new_pipeline)
        self.changed.set()

    def person(self, failure: Failure) -> bool:
        return person_retries(self.seed, failure)

    def _new_job(self, failure: Failure, pipeline: int | None = None) -> int:
        self.next_job += 1
        job_id = self.next_job
        self.gitlab.add_job(job_id, failure.job_name, pipeline or failure.pipeline, failure.ref)
        self.gitlab.pipelines[pipeline or failure.pipeline]["sha"] = failure.sha
        self.gitlab.heads[failure.ref] = failure.sha
        self.of_job[job_id] = failure
        return job_id

    def _attempt(self, failure: Failure, job_id: int) -> tuple[str, bytes]:
        """The CI runs an attempt: the truth decides how it ends."""
        passes = failure.log.spurious and job_id != self.first_job[failure.index]
        pipeline = int(self.gitlab.jobs[job_id]["pipeline_id"])
        if passes:
            self.gitlab.jobs[job_id]["status"] = "success"
            return f"d-{job_id}", hook(job_id, pipeline, failure, "success")
        self.gitlab.jobs[job_id]["status"] = "failed"
        self.gitlab.traces[job_id] = rerun_log(failure.log.data, self.rng)
        self.waiting.add(job_id)
        return f"d-{job_id}", hook(job_id, pipeline, failure, "failed")

    async def _post(self, hooks: list[tuple[str, bytes]]) -> None:
        if hooks:
            statuses = await post_all(self.url, hooks, concurrency=16)
            assert statuses.get(202, 0) == len(hooks), statuses

    async def wave(self, batch: list[Failure]) -> None:
        hooks = []
        for failure in batch:
            job = self._new_job(failure)
            self.first_job[failure.index] = job
            hooks.append(self._attempt(failure, job))
        await self._post(hooks)
        person_done: set[int] = set()
        deadline = time.monotonic() + 600
        while True:
            hooks = []
            for job in sorted(self.waiting):
                if job not in self.decided:
                    continue
                failure = self.of_job[job]
                if self.decided[job] == "requested":
                    new = self.issued.get(job)
                    if new is None:
                        continue  # the call to the fake GitLab is on its way
                    self.waiting.discard(job)
                    if new not in self.answered:
                        self.answered.add(new)
                        # The fake GitLab created the job on retry; the CI now runs it.
                        self.of_job[new] = failure
                        self.gitlab.pipelines[failure.pipeline]["sha"] = failure.sha
                        hooks.append(self._attempt(failure, new))
                else:
                    self.waiting.discard(job)
                    first = self.first_job[failure.index] == job
                    # The person retries half of the first failures ciretry left alone: the
                    # same half in every run (a coin per failure, not per event order).
                    if first and failure.index not in person_done and self.person(failure):
                        person_done.add(failure.index)
                        self.run.human_retries += 1
                        hooks.append(self._attempt(failure, self._new_job(failure)))
            await self._post(hooks)
            if not self.waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.waiting)} failed attempts without a decision")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 2.0)
            except TimeoutError:
                pass


async def one_run(
    learning: bool,
    failures: list[Failure],
    dsn: str,
    nats_url: str,
    workdir: Path,
    seed: int,
    rules: Path | None = None,
) -> Run:
    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"bench_learning_{tag}", f"bl{tag}"
    gitlab = await FakeGitLab().started()
    policy = workdir / f"policy-{tag}.toml"
    text = default_policy_text()
    for value in ("30.0", "10.0"):  # no backoff: the run measures decisions, not waiting
        text = text.replace(f"base_s = {value}", "base_s = 0.0")
    text = text.replace(
        "[learning]\nenabled = true", f"[learning]\nenabled = {str(learning).lower()}"
    )
    policy.write_text(text + POLICY_EXTRA)
    env = service_env(pg_dsn=dsn, schema=schema, nats_url=nats_url, prefix=prefix,
                      gitlab_url=gitlab.url, policy_path=policy)  # fmt: skip
    if rules is not None:
        env["CIRETRY_RULES_PATHS"] = str(rules)
    procs = [ServiceProcess(name, env, workdir / f"{tag}-{name}.log")
             for name in ("ingest", "classify", "act")]  # fmt: skip
    nc = await nats.connect(nats_url)
    try:
        procs[0].start()
        await procs[0].wait_ready()
        for p in procs[1:]:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in procs[1:]))
        sim = Simulation(
            gitlab, f"http://127.0.0.1:{procs[0].port}/webhooks/gitlab", failures, seed
        )
        await nc.subscribe(f"{prefix.lower()}.action.>", cb=sim.on_msg)
        t0 = time.perf_counter()
        for start in range(0, len(failures), WAVE):
            await sim.wave(failures[start : start + WAVE])
            print(f"    wave {start // WAVE + 1}/{-(-len(failures) // WAVE)}: "
                  f"{len(sim.run.retried_first)} first failures retried by ciretry, "
                  f"{sim.run.human_retries} by the person", flush=True)  # fmt: skip
        sim.run.seconds = time.perf_counter() - t0
        return sim.run
    finally:
        await nc.close()
        for p in procs:
            p.stop()
        await gitlab.close()
        bus = await Bus.connect(nats_url, prefix=prefix.lower(), stream=prefix.upper())
        await bus.delete_stream()
        await bus.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def recall(run: Run, failures: list[Failure]) -> float:
    second = [f for f in failures[len(failures) // 2 :] if f.log.spurious]
    return sum(1 for f in second if f.index in run.retried_first) / max(1, len(second))


def ceiling(failures: list[Failure], rules: Run, seed: int, passes: int, commits: int) -> float:
    """The recall learning would reach if every rerun of a log had one signature and no two
    logs shared one (labels read here, in the bench, only): the first failures the rules
    retried (``rules``) and the person's coins are the runs' own; a log is retried from the
    wave after its first failures' retries passed ``passes`` times on ``commits`` commits
    (``[learning]``'s thresholds). What learning loses to signatures is the gap to it; what is
    left above it is the thresholds' price (the occurrences each failure needs to be learned)."""
    seen: dict[str, list[str]] = {}
    promoted: set[str] = set()
    retried = Run()
    for start in range(0, len(failures), WAVE):
        for f in failures[start : start + WAVE]:
            ciretry = f.index in rules.retried_first or f.log.name in promoted
            if ciretry:
                retried.retried_first.add(f.index)
            if f.log.spurious and (ciretry or person_retries(seed, f)):
                seen.setdefault(f.log.name, []).append(f.sha)
        promoted |= {
            n for n, shas in seen.items() if len(shas) >= passes and len(set(shas)) >= commits
        }
    return recall(retried, failures)


def _absolute(path: str) -> Path:
    """The services run in their own working directory: give them an absolute path."""
    return Path(path).resolve()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, default=FIXTURES / "logs" / "labels.json")
    parser.add_argument("--root", type=Path, default=FIXTURES)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument(
        "--rules",
        type=_absolute,
        default=None,
        help="an extra rule file for the services (e.g. one disabling rules, to see what "
        "learning does where the rules do not know the failures)",
    )
    args = parser.parse_args()
    logs = load_labels(args.labels, args.root)
    spurious = sum(1 for x in logs if x.spurious)
    failures = history(logs, args.jobs, args.seed)
    n_spurious = sum(1 for f in failures if f.log.spurious)
    print(f"corpus {args.labels}: {len(logs)} labelled logs ({spurious} spurious, "
          f"{len(logs) - spurious} deterministic); history of {len(failures)} failed jobs "
          f"({n_spurious} spurious) in {len({f.pipeline for f in failures})} pipelines, "
          f"{len(PROJECTS)} projects, {len(RUNNERS)} runners")  # fmt: skip
    runs: dict[str, Run] = {}
    with servers() as s, tempfile.TemporaryDirectory(prefix="ciretry-learning-") as tmp:
        print(f"servers: {s.how}; 1 ingest + 1 classify + 1 act, fake GitLab")
        for name, on in (("rules", False), ("learned", True)):
            print(f"  learning {'on' if on else 'off'}:", flush=True)
            runs[name] = await one_run(
                on, failures, s.database_url, s.nats_url, Path(tmp), args.seed, args.rules
            )
    print()
    print(
        "run       recall(2nd half)  false_retries  human_retries  ciretry_retries  learned  seconds"
    )
    for name, run in runs.items():
        print(f"{name:<9} {recall(run, failures):>16.3f}  {run.false_retries:>13}  "
              f"{run.human_retries:>13}  {run.ciretry_retries:>15}  {run.learned_verdicts:>7}  "
              f"{run.seconds:>7.1f}")  # fmt: skip
    for name, run in runs.items():
        print(f"{name}: spurious first failures left alone, by reason: {run.spurious_skips}")
    settings = learning_settings_from_text(default_policy_text())
    top = ceiling(failures, runs["rules"], args.seed, settings.min_passes, settings.min_commits)
    print(f"ceiling of learning at min_passes={settings.min_passes}, "
          f"min_commits={settings.min_commits} (one signature per log, no collision): "
          f"recall {top:.3f}")  # fmt: skip
    result = {
        "recall_rules": round(recall(runs["rules"], failures), 3),
        "recall_learned": round(recall(runs["learned"], failures), 3),
        "false_retries": runs["learned"].false_retries,
        "false_retries_rules": runs["rules"].false_retries,
        "human_retries_rules": runs["rules"].human_retries,
        "human_retries_learned": runs["learned"].human_retries,
        "recall_ceiling": round(top, 3),
        "jobs": len(failures),
    }
    result["ratio"] = result["recall_learned"]
    print("BENCH " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
