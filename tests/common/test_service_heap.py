"""A serving process's collector: the heap alive after start-up frozen out of its reach, the
young generation collected less often, and cyclic garbage still collected.

Each case runs in a fresh interpreter: the collector's state is process-global."""

from __future__ import annotations

import json
import subprocess
import sys

from ciretry.common.service import SERVING_GC_THRESHOLDS

PROBE = """
import gc, json, weakref
from ciretry.common.service import settle_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

left_by_startup = cycle()          # garbage in a cycle when the service starts serving
kept = Node()                      # alive: frozen
before = gc.get_freeze_count()
settle_heap()
frozen = gc.get_freeze_count()
made_while_serving = cycle()
collections = sum(s["collections"] for s in gc.get_stats())
for _ in range(20_000):            # 40,000 container objects in cycles: past the threshold
    cycle()
print(json.dumps({
    "before": before,
    "frozen": frozen,
    "thresholds": list(gc.get_threshold()),
    "startup_cycle_collected": left_by_startup() is None,
    "serving_cycle_collected": made_while_serving() is None,
    "collected_without_asking": sum(s["collections"] for s in gc.get_stats()) > collections,
}))
"""


def probe() -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def test_the_startup_heap_is_frozen_after_its_garbage_is_collected() -> None:
    got = probe()
    assert got["before"] == 0
    assert isinstance(got["frozen"], int) and got["frozen"] > 1000  # modules, classes, ...
    assert got["startup_cycle_collected"] is True  # collected first, not frozen alive
    assert got["thresholds"] == list(SERVING_GC_THRESHOLDS)


def test_cycles_made_while_serving_are_still_collected_on_their_own() -> None:
    got = probe()
    assert got["collected_without_asking"] is True
    assert got["serving_cycle_collected"] is True
