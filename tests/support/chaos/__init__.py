"""The fault-injection machinery, in one place for the tests and the benchmarks.

* ``harness`` — the seeded chaos run against real ``ciretry serve`` processes (jobs, the
  nemesis, the provider's outages, the invariants computed afterwards): ``tests/chaos``,
  ``tests/security/test_secrets.py`` and ``bench/chaos.py`` run it;
* ``reruns`` — retries that fail again, and the budget invariant counted from raw events;
* ``processes`` — ``ciretry serve`` subprocesses and NATS clusters;
* ``netfault`` — a TCP proxy that can cut a connection (a dependency away).
"""

from __future__ import annotations

from .harness import SECRETS, ChaosResult, ChaosSettings, chaos_seed, run_chaos

__all__ = ["SECRETS", "ChaosResult", "ChaosSettings", "chaos_seed", "run_chaos"]
