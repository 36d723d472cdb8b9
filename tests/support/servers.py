"""PostgreSQL and NATS for the tests and the benchmarks, on a fresh checkout too.

``servers()`` uses ``CIRETRY_DATABASE_URL`` / ``CIRETRY_NATS_URL`` when set, else starts
embedded servers from the PyPI wheels in a temporary directory (stopped on exit). The tests'
session fixture (``tests/conftest.py``) adds testcontainers as a middle choice.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ciretry.common.embedded import EmbeddedNats, EmbeddedPostgres


@dataclass(frozen=True)
class Servers:
    database_url: str
    nats_url: str
    how: str


@contextlib.contextmanager
def servers(*, nats: bool = True, prefix: str = "ciretry-bench-") -> Iterator[Servers]:
    db, nats_url = os.environ.get("CIRETRY_DATABASE_URL"), os.environ.get("CIRETRY_NATS_URL")
    if db and (nats_url or not nats):
        yield Servers(db, nats_url or "", "configured")
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.chmod(tmp, 0o755)  # the unprivileged PostgreSQL user must traverse it when root
        # Started from the main thread, which lives as long as the run: a killed test run
        # takes its servers along.
        pg = EmbeddedPostgres(Path(tmp), die_with_parent=True) if not db else None
        ns = EmbeddedNats(Path(tmp), die_with_parent=True) if nats and not nats_url else None
        try:
            yield Servers(
                db or (pg.start() if pg else ""),
                nats_url or (ns.start() if ns else ""),
                "embedded",
            )
        finally:
            if ns:
                ns.stop()
            if pg:
                pg.stop()
