"""docs/deployment.md states the consumer settings the manifests really use."""

from __future__ import annotations

import re
from typing import Any

from ciretry.common.bus import ConsumerSettings

from .conftest import ROOT, of_kind

DOC = ROOT / "docs" / "deployment.md"


def documented() -> dict[str, int]:
    """`| name | value ... | `CIRETRY_X` |` rows of the consumer settings table: variable -> value."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*[\w ]+\|\s*(\d+)[^|]*\|\s*`([\w.]+)`\s*\|", line)
        if m:
            rows[m.group(2)] = int(m.group(1))
    return rows


def test_consumer_settings_table_matches_the_manifests(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    rows = documented()
    for name in ("base", "dev", "prod"):
        [cm] = [
            c
            for c in of_kind(rendered[name], "ConfigMap")
            if c["metadata"]["name"].startswith("ciretry-config")
        ]
        for var in (
            "CIRETRY_CONSUMER_ACK_WAIT",
            "CIRETRY_CONSUMER_MAX_DELIVER",
            "CIRETRY_CONSUMER_BATCH",
            "CIRETRY_CONSUMER_CONCURRENCY",
        ):
            assert var in rows, f"{var} not documented"
            assert float(cm["data"][var]) == rows[var], f"{name}: {var} differs from the doc"
    assert rows["ConsumerSettings.max_ack_pending"] == ConsumerSettings().max_ack_pending


def test_doc_covers_the_operations() -> None:
    text = DOC.read_text()
    for needle in (
        "--scale",
        "--profile nats-cluster",
        "http://localhost:16686",
        "kubectl apply -k",
        "prometheus-adapter",
        "KEDA",
        "helm-values/nats.yaml",
        "helm-values/postgresql.yaml",
    ):
        assert needle in text, needle
