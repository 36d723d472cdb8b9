"""k8s/helm-values/: the upstream charts' values agree with what ciretry's manifests expect
(names of the database Secret and Service, pod labels the NetworkPolicies allow, the external
metric the HPAs ask for, which ciretry really exports)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

import yaml
from prometheus_client import REGISTRY, generate_latest

from ciretry.common.config import Config
from ciretry.common.metrics import instruments

from .conftest import K8S, by_name, of_kind

Docs = list[dict[str, Any]]
VALUES = K8S / "helm-values"


def values(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((VALUES / name).read_text())
    return data


def release(name: str) -> str:
    """The Helm release name the values file's own install command uses."""
    text = (VALUES / name).read_text()
    m = re.search(r"helm upgrade --install (\S+) (\S+/\S+) ", text)
    assert m, f"{name}: document the install command"
    return m.group(1)


def test_nats_is_a_three_node_jetstream_cluster() -> None:
    v = values("nats.yaml")
    assert v["config"]["jetstream"]["enabled"] is True
    assert v["config"]["jetstream"]["fileStore"]["enabled"] is True
    assert v["config"]["cluster"]["enabled"] is True
    replicas = v["config"]["cluster"]["replicas"]
    assert replicas >= 3 and replicas % 2 == 1, "JetStream's Raft groups want an odd quorum"


def test_nats_service_is_the_one_ciretry_connects_to(rendered: dict[str, Docs]) -> None:
    for name in ("dev", "prod"):
        [cm] = [
            c
            for c in of_kind(rendered[name], "ConfigMap")
            if c["metadata"]["name"].startswith("ciretry-config")
        ]
        url = urlparse(cm["data"]["CIRETRY_NATS_URL"])
        assert url.hostname == release("nats.yaml"), (
            "the chart's Service is named after the release"
        )
        assert url.port == 4222


def test_postgres_names_match_the_manifests(rendered: dict[str, Docs]) -> None:
    v = values("postgresql.yaml")
    cluster = v["fullnameOverride"]
    assert v["cluster"]["initdb"]["database"] and v["cluster"]["initdb"]["owner"]
    assert v["cluster"]["instances"] >= 2, "a standby for failover"
    docs = rendered["prod"]
    # The services' role (issue 18): managed by the operator from its Secret, the one the
    # Deployments read; the name is the one `ciretry migrate` grants to.
    [role] = v["cluster"]["roles"]
    assert role["name"] == Config().database_runtime_role and role["login"]
    assert not role["superuser"] and not role["createrole"]
    runtime_secret = role["passwordSecret"]["name"]
    for d in [*of_kind(docs, "Deployment"), *of_kind(docs, "Job")]:
        [c] = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        ref = env["CIRETRY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        if d["kind"] == "Job":
            # The migration runs as the owner: CloudNativePG's application Secret.
            assert ref == {"name": f"{cluster}-app", "key": "uri"}
        else:
            assert ref == {"name": runtime_secret, "key": "uri"}, d["metadata"]["name"]
    egress = by_name(docs, "NetworkPolicy")["ciretry-egress-internal"]["spec"]["egress"]
    pg_selectors = [
        peer["podSelector"]["matchLabels"]
        for rule in egress
        for peer in rule["to"]
        if "cnpg.io/cluster" in peer.get("podSelector", {}).get("matchLabels", {})
    ]
    assert pg_selectors == [{"cnpg.io/cluster": cluster}]


def test_external_metric_is_served_and_exported(rendered: dict[str, Docs]) -> None:
    v = values("prometheus-adapter.yaml")
    rules = v["rules"]["external"]
    served = {r["name"]["as"]: r for r in rules}
    wanted = {
        m["external"]["metric"]["name"]
        for h in of_kind(rendered["prod"], "HorizontalPodAutoscaler")
        for m in h["spec"]["metrics"]
        if m["type"] == "External"
    }
    assert wanted and wanted <= set(served), f"HPAs ask for {wanted}, adapter serves {set(served)}"
    for name in wanted:
        assert name in served[name]["seriesQuery"]
    # ...and ciretry exports that very series, with the `consumer` label the HPAs select on.
    lag = instruments().samples.consumer_lag
    lag["deploy-test"] = 5
    try:
        text = generate_latest(REGISTRY).decode()
    finally:
        del lag["deploy-test"]
    for name in wanted:
        assert re.search(rf'^{name}\{{[^}}]*consumer="deploy-test"', text, re.M), text
