"""Many mutated webhooks, fast: seeded random mutations of the real fixture payloads for every
ingest endpoint, sent with valid credentials so they reach the normalizers and the database.

``tests/ingest/test_fuzz.py`` explores the same space with hypothesis (shrinking, a few thousand
cases per CI run); this generator is for volume (the long chaos run sends 100,000), where
hypothesis would spend its time generating rather than sending.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from tests.ingest.helpers import (
    failed_job_hook,
    github_event,
    github_fixtures,
    gitlab_fixtures,
    load,
    pod,
    pulse_messages,
    task_message,
)

ENDPOINTS = ("gitlab", "github", "pulse", "kubernetes")
#: Buildkite's documented payloads (tests/fixtures/external/SOURCES.txt): fuzzed by
#: tests/ingest/test_fuzz.py, not (yet) by the chaos run's ``Fuzzer``.
BUILDKITE_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "external" / "buildkite"
ODD_TEXT = (
    "", " ", "\x00", "a\x00b", "\u202e", "💥💥💥", "\ufeff", "0", "-1", "1e999", "null",
    "x" * 5000, "9999-12-31T23:59:59-10:00", "0001-01-01T00:00:00+14:00",
    "2024-13-45T99:99:99Z", "' OR 1=1 --", "<script>", "../../etc/passwd", "𝕏" * 40,
)  # fmt: skip
ODD_SCALARS: tuple[Any, ...] = (
    None, True, False, 0, -1, 2**63, -(2**63) - 1, 2**70, 1.5, -0.0, 1e308, [], {},
    [[[[[]]]]], {"": {"": None}},
)  # fmt: skip


def bases() -> dict[str, list[tuple[Any, str]]]:
    """Per endpoint: (document, event header) pairs to mutate, from the shared fixtures."""
    gl = [(load(p), "Job Hook") for p in gitlab_fixtures()] + [(failed_job_hook(), "Job Hook")]
    gh = [(load(p), github_event(p)) for p in github_fixtures()]
    envelopes = list(pulse_messages().values())
    tc = [
        (e, "") for e in envelopes[:5] + [e for e in envelopes if "completed" in e["exchange"]][:3]
    ]
    tc += [
        ({"exchange": f"exchange/taskcluster-queue/v1/{x}", "payload": task_message()}, "")
        for x in ("task-exception", "task-failed")
    ]
    k8s = [(pod(), ""), (pod(pod_reason="Evicted", disruption="PreemptionByScheduler"), "")]
    bk = [
        (doc, doc["event"])
        for doc in (json.loads(p.read_text()) for p in sorted(BUILDKITE_FIXTURES.glob("*.json")))
    ]
    return {"gitlab": gl, "github": gh, "pulse": tc, "kubernetes": k8s, "buildkite": bk}


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):
            out.extend(paths(v, (*prefix, i)))
    return out


def _value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(ODD_TEXT)
    if roll < 0.8:
        return copy.deepcopy(rng.choice(ODD_SCALARS))
    if roll < 0.9:
        # Any code point but surrogates (not encodable; lone surrogate *escapes* in raw JSON
        # are sent by tests/security/test_hostile_webhooks.py).
        chars = (rng.randrange(0x20, 0x2FFFF) for _ in range(rng.randrange(1, 30)))
        return "".join(chr(c) for c in chars if not 0xD800 <= c <= 0xDFFF)
    return {rng.choice(ODD_TEXT): rng.choice(ODD_TEXT) for _ in range(rng.randrange(1, 4))}


def mutate(rng: random.Random, doc: Any) -> Any:
    """One to four mutations at random places: a field dropped or replaced by an odd value."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randrange(1, 5)):
        path = rng.choice(paths(doc))
        if not path:
            doc = _value(rng)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if rng.random() < 0.25:
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent.pop(path[-1])
        else:
            parent[path[-1]] = _value(rng)
    return doc


@dataclass
class Fuzzer:
    """Sends mutated requests to one ingest server (``base_url``) with its credentials."""

    base_url: str
    gitlab_secret: str
    github_secret: str
    api_token: str
    seed: int
    statuses: Counter[int] = field(default_factory=Counter)
    #: (endpoint, status, body excerpt) of every 5xx.
    errors: list[tuple[str, int, str]] = field(default_factory=list)

    def request(self, rng: random.Random, i: int) -> tuple[str, str, bytes, dict[str, str]]:
        endpoint = ENDPOINTS[i % len(ENDPOINTS)]
        doc, event = rng.choice(BASES[endpoint])
        if rng.random() < 0.05:  # not JSON at all
            body = rng.randbytes(rng.randrange(0, 300))
        else:
            body = msgspec.json.encode(mutate(rng, doc))
        headers = {"Content-Type": "application/json"}
        if endpoint == "gitlab":
            path = "/webhooks/gitlab"
            headers.update(
                {
                    "X-Gitlab-Token": self.gitlab_secret,
                    "X-Gitlab-Event": event,
                    "X-Gitlab-Event-UUID": f"fuzz-{self.seed}-{i}",
                }
            )
        elif endpoint == "github":
            path = "/webhooks/github"
            sig = hmac.new(self.github_secret.encode(), body, hashlib.sha256).hexdigest()
            headers.update(
                {
                    "X-GitHub-Event": event,
                    "X-GitHub-Delivery": f"fuzz-{self.seed}-{i}",
                    "X-Hub-Signature-256": f"sha256={sig}",
                }
            )
        else:
            path = "/pulse" if endpoint == "pulse" else "/webhooks/kubernetes"
            headers["Authorization"] = f"Bearer {self.api_token}"
        return endpoint, path, body, headers

    async def run(self, n: int, *, concurrency: int = 32) -> None:
        rng = random.Random(self.seed)
        requests = (self.request(rng, i) for i in range(n))
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                for endpoint, path, body, headers in requests:
                    status, text = await self._post(session, path, body, headers)
                    self.statuses[status] += 1
                    if status >= 500:
                        self.errors.append((endpoint, status, text[:300]))

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _post(
        self, session: aiohttp.ClientSession, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str]:
        async with session.post(self.base_url + path, data=body, headers=headers) as r:
            return r.status, await r.text()


BASES = bases()
