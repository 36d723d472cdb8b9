"""The seeded fault-injection run, CI-sized: real service processes on an embedded PostgreSQL and
NATS of their own, webhooks delivered 3x out of order, kill -9 of every service several times,
PostgreSQL and NATS restarted, the provider API down for a while, skewed clocks. The invariants
are computed from the event log, the bus and the fake provider afterwards; the table is printed
(``pytest -s`` shows it; it is also in the failure message).

Repeat a run with ``CIRETRY_CHAOS_SEED=<seed>``; the long version is ``bench/chaos.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.chaos import ChaosSettings, chaos_seed, run_chaos


@pytest.mark.slow
async def test_invariants_hold_under_faults(tmp_path: Path) -> None:
    seed = chaos_seed()
    print(f"\nchaos seed: {seed}")
    result = await run_chaos(ChaosSettings(seed=seed), tmp_path)
    table = result.table()
    print(table)
    assert result.stats["kills"], "the nemesis killed nothing"
    assert result.ok, table
