"""The long chaos run: tests/chaos at scale, for ``--minutes`` of posting and faults.

Same harness as ``tests/chaos`` (``tests/support/chaos/``): its own embedded PostgreSQL and
NATS (a temp dir under /tmp, never the machine's shared servers), 1 ingest, 2 classify and 3 act
processes, a fake GitLab that records every call. Per minute: 1000 failing jobs, each webhook
delivered 3x out of order; ~2.5 SIGKILLs of each service kind (restarted each time); and every
~3 minutes a PostgreSQL restart, a NATS restart and a provider outage (503 / 429 / dropped
connections). At the end of the posting window, the outage phase: jobs committed while classify
and act are paused, PostgreSQL down for longer than the consumers' whole nak schedule and the
provider for longer than act's failure schedule; every committed event must still be processed
exactly once. The invariants are checked from the event log, the bus and the fake provider.
Then 10,000 mutated webhooks per minute go to an ingest of their own: none may get a 5xx.

    .venv/bin/python bench/chaos.py                 # 1 minute (the default)
    .venv/bin/python bench/chaos.py --minutes 10    # the issue's long run
    CIRETRY_CHAOS_SEED=42 .venv/bin/python bench/chaos.py   # another seed (--seed too)

Prints webhooks accepted, duplicates, kills per service, restarts, provider faults and the
invariant table; the last line is ``BENCH {json}`` with those numbers and ``ratio`` = the
fraction of invariants holding (1.0 = all). Exit status 1 if any invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.chaos import ChaosSettings, chaos_seed, run_chaos  # noqa: E402


def settings_for(minutes: float, seed: int, jobs: int | None = None) -> ChaosSettings:
    jobs = jobs or max(300, int(1000 * minutes))
    post = max(30.0, 36.0 * minutes)
    every3 = max(1, round(minutes / 3))
    return ChaosSettings(
        seed=seed,
        jobs=jobs,
        pipelines=max(30, jobs // 3),
        copies=3,
        classify=2,
        act=3,
        kills_per_service=max(3, round(2.5 * minutes)),
        pg_restarts=every3,
        nats_restarts=every3,
        provider_outages=every3,
        post_seconds=post,
        settle_timeout=max(150.0, 0.5 * post + 120),
        fuzz_requests=max(2000, int(10_000 * minutes)),
        log_level="WARNING",
        **outage_settings(minutes),
    )


def outage_settings(minutes: float) -> dict[str, float | int]:
    """The outage phase at the end of the posting window (issue 13): PostgreSQL down longer
    than the consumers' nak schedule, the provider down longer than act's failure schedule for
    3 retryable requests (act's scheduler retries them one after the other)."""
    return {
        "outage_jobs": max(30, int(100 * minutes)),
        "outage_retryable": 3,
        "outage_pg_s": 15.0,
        "outage_provider_extra_s": 70.0,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="posting window (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="default: $CIRETRY_CHAOS_SEED")
    parser.add_argument("--jobs", type=int, default=None, help="default: 1000 per minute")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else chaos_seed()
    settings = settings_for(args.minutes, seed, args.jobs)
    print(f"chaos seed: {seed} (repeat with --seed {seed})", flush=True)
    print(
        f"{settings.jobs} jobs x {settings.copies} deliveries over {settings.post_seconds:.0f}s; "
        f"{settings.kills_per_service} kill -9 per service kind; "
        f"{settings.pg_restarts} PostgreSQL / {settings.nats_restarts} NATS restarts, "
        f"{settings.provider_outages} provider outages",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="ciretry-chaos-bench-"))
    result = await run_chaos(settings, workdir)
    s = result.stats
    print(f"webhooks posted:   {s['webhooks_posted']} ({s['duplicates_posted']} duplicates)")
    print(f"webhooks accepted: {s['webhooks_accepted']} (final statuses {s['webhook_statuses']})")
    print(f"jobs stored:       {s['jobs_stored']}")
    print(f"kills per service: {s['kills']}")
    print(f"restarts:          {s['restarts']}")
    print(f"provider faults:   {s['provider_faults']}")
    print(
        f"retries: requested {s['retry_requested']}, issued {s['retry_issued']} "
        f"({s['retry_issued_found_existing']} found after a crash), failed events "
        f"{s['retry_failed']}, provider retry calls {s['provider_retry_calls']}"
    )
    print(f"fuzzed requests:   {s.get('fuzzed_requests', 0)} (statuses {s.get('fuzz_statuses')})")
    if "outage_phase" in s:
        print(f"outage phase:      {s['outage_phase']}")
    print(f"service logs:      {workdir}")
    print(result.table())
    bench = {
        "seed": seed,
        "minutes": args.minutes,
        "elapsed_s": round(result.elapsed, 1),
        "jobs": settings.jobs,
        "webhooks_posted": s["webhooks_posted"],
        "webhooks_accepted": s["webhooks_accepted"],
        "duplicates": s["duplicates_posted"],
        "jobs_stored": s["jobs_stored"],
        "kills": s["kills"],
        "restarts": s["restarts"],
        "provider_faults": s["provider_faults"],
        "provider_retry_calls": s["provider_retry_calls"],
        "retry_issued": s["retry_issued"],
        "retry_issued_found_existing": s["retry_issued_found_existing"],
        "fuzzed_requests": s.get("fuzzed_requests", 0),
        "fuzz_statuses": s.get("fuzz_statuses", {}),
        "outage_phase": s.get("outage_phase", {}),
        "invariants": {i.name: i.ok for i in result.invariants},
        "ratio": round(result.ratio, 4),
    }
    print("BENCH " + json.dumps(bench))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
