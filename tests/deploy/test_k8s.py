"""k8s/: every manifest file and every rendered overlay against the Kubernetes schemas, then what
the schemas cannot say: probes, resources, autoscaling targets, disruption budgets, network
isolation, the migration Job, the rules/policy ConfigMaps and where secrets come from."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ciretry.common.config import Config, load_config

from .conftest import (
    K8S,
    K8S_VERSIONS,
    OVERLAYS,
    SERVICES,
    by_name,
    component,
    kustomize,
    load_all,
    of_kind,
)
from .netpol import Peer, allowed

Docs = list[dict[str, Any]]

CONFIG_VARS = {"CIRETRY_" + name.upper() for name in Config.__struct_fields__}
#: Secrets the manifests reference but do not create: the CloudNativePG app Secret (operator) and,
#: in prod, ciretry-secrets (created out of band; docs/deployment.md).
EXTERNAL_SECRETS = {"ciretry-db-app", "ciretry-db-runtime", "ciretry-secrets"}


def schema_errors(doc: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {where}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return f"no schema: {exc.message}"
    return None


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/ that holds whole Kubernetes objects (kustomizations, patches and
    Helm values are not objects; patches are checked through the rendered overlays)."""
    files = []
    for path in sorted(K8S.rglob("*.yaml")):
        rel = path.relative_to(K8S)
        if path.name == "kustomization.yaml" or "patches" in rel.parts:
            continue
        if rel.parts[0] == "helm-values":
            continue
        files.append(path)
    return files


# --- schemas ------------------------------------------------------------------------------------


def test_there_are_manifests_to_check() -> None:
    names = {p.relative_to(K8S).as_posix() for p in manifest_files()}
    assert {"base/ingest.yaml", "base/classify.yaml", "base/act.yaml"} <= names
    assert {"base/migrate-job.yaml", "base/networkpolicies.yaml"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_file_validates(path: Path, version: str) -> None:
    docs = load_all(path.read_text())
    assert docs, f"{path} holds no object"
    errors = [e for d in docs if (e := schema_errors(d, version))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_rendered_kustomization_validates(
    rendered: dict[str, Docs], name: str, version: str
) -> None:
    docs = rendered[name]
    errors = [e for d in docs if (e := schema_errors(d, version))]
    assert not errors, "\n".join(errors)


def test_schema_validation_rejects_a_broken_manifest(rendered: dict[str, Docs]) -> None:
    """The validator is not a no-op: a wrong type, a misspelt field and an unknown kind fail."""
    deploy = copy.deepcopy(by_name(rendered["prod"], "Deployment")["ciretry-act"])
    deploy["spec"]["replicas"] = "three"
    assert schema_errors(deploy, K8S_VERSIONS[0])
    deploy = copy.deepcopy(by_name(rendered["prod"], "Deployment")["ciretry-act"])
    deploy["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert schema_errors(deploy, K8S_VERSIONS[0])
    hpa = copy.deepcopy(by_name(rendered["prod"], "HorizontalPodAutoscaler")["ciretry-act"])
    hpa["apiVersion"] = "autoscaling/v2beta3"
    assert schema_errors(hpa, K8S_VERSIONS[0])


# --- what each overlay renders ------------------------------------------------------------------


def test_overlays_render_everything(overlay: tuple[str, Docs]) -> None:
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Job",
        "NetworkPolicy",
    } <= kinds
    namespace = {"dev": "ciretry-dev", "prod": "ciretry"}[name]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespace, d["metadata"]["name"]
    assert set(by_name(docs, "Deployment")) == {f"ciretry-{s}" for s in SERVICES}


def test_overlays_differ_where_they_should(rendered: dict[str, Docs]) -> None:
    dev_hpa = by_name(rendered["dev"], "HorizontalPodAutoscaler")
    prod_hpa = by_name(rendered["prod"], "HorizontalPodAutoscaler")
    for s in SERVICES:
        assert dev_hpa[f"ciretry-{s}"]["spec"]["minReplicas"] == 1
        assert prod_hpa[f"ciretry-{s}"]["spec"]["minReplicas"] >= 2
    prod_ingress = by_name(rendered["prod"], "Ingress")["ciretry-ingest"]
    assert prod_ingress["spec"]["tls"], "prod serves webhooks over TLS"
    assert "tls" not in by_name(rendered["dev"], "Ingress")["ciretry-ingest"]["spec"]


# --- Deployments --------------------------------------------------------------------------------


def config_data(docs: Docs) -> dict[str, str]:
    [cm] = [
        c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("ciretry-config")
    ]
    data: dict[str, str] = cm["data"]
    return data


def test_deployments_have_probes_resources_and_drain_time(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    ack_wait = float(config_data(docs)["CIRETRY_CONSUMER_ACK_WAIT"])
    for d in of_kind(docs, "Deployment"):
        name = d["metadata"]["name"]
        svc = component(d)
        pod = d["spec"]["template"]["spec"]
        [c] = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["args"] == ["serve", svc], name
        env = {e["name"]: e for e in c.get("env", [])}
        assert int(env["CIRETRY_HTTP_PORT"]["value"]) == ports["http"], name
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            assert probe in c, f"{name}: no {probe}"
            assert c[probe]["httpGet"]["path"] == path, f"{name}: {probe}"
            port = c[probe]["httpGet"]["port"]
            assert port in ports or port in ports.values(), f"{name}: {probe} port {port}"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), f"{name}: {kind}"
        pre_stop = 0.0
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if pre[:1] == ["sleep"]:
            pre_stop = float(pre[1])
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= ack_wait + pre_stop + 10, (
            f"{name}: {grace}s to stop < preStop {pre_stop}s + ack wait {ack_wait}s + 10s margin"
        )


def test_pods_meet_the_restricted_pod_security_standard(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    pods = [
        (d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind(docs, "Deployment")
    ]
    pods += [(j["metadata"]["name"], j["spec"]["template"]["spec"]) for j in of_kind(docs, "Job")]
    for name, pod in pods:
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 0) != 0, name
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert sc.get("readOnlyRootFilesystem") is True, name
            seccomp = sc.get("seccompProfile") or psc.get("seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name


def test_images_are_set_by_the_overlay(rendered: dict[str, Docs]) -> None:
    def images(docs: Docs) -> set[str]:
        out = set()
        for d in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            out |= {c["image"] for c in d["spec"]["template"]["spec"]["containers"]}
        return out

    assert images(rendered["dev"]) == {"ciretry:local"}
    [prod] = images(rendered["prod"])
    repo, _, tag = prod.rpartition(":")
    assert "/" in repo and tag and tag != "latest", f"prod image not pinned: {prod}"


def test_references_resolve(overlay: tuple[str, Docs]) -> None:
    """Every ConfigMap/Secret a pod reads exists in the output (kustomize renamed generated ones
    with their hash), except the Secrets made outside this tree."""
    name, docs = overlay
    configmaps = set(by_name(docs, "ConfigMap"))
    secrets = set(by_name(docs, "Secret")) | EXTERNAL_SECRETS
    for d in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        pod = d["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (name, v)
        for c in pod["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, e
        assert pod["serviceAccountName"] in by_name(docs, "ServiceAccount")


# --- autoscaling and disruption -----------------------------------------------------------------


def test_every_service_has_an_hpa_on_cpu_and_lag(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    deployments = by_name(docs, "Deployment")
    hpas = by_name(docs, "HorizontalPodAutoscaler")
    targets = {h["spec"]["scaleTargetRef"]["name"]: h for h in hpas.values()}
    assert set(targets) == set(deployments), "one HPA per Deployment, each targeting one"
    for dname, d in deployments.items():
        hpa = targets[dname]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert "replicas" not in d["spec"], f"{dname}: the HPA owns the replica count"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = hpa["spec"]["metrics"]
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics), (
            dname
        )
        svc = component(d)
        external = [m["external"] for m in metrics if m["type"] == "External"]
        if svc in ("classify", "act"):
            [ext] = external
            assert ext["metric"]["name"] == "ciretry_consumer_lag"
            # The durable consumer of each service is named after it.
            assert ext["metric"]["selector"]["matchLabels"] == {"consumer": svc}
            assert ext["target"]["type"] == "AverageValue"
        else:
            assert not external


def test_pdbs_cover_each_service_and_allow_drains(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    pdbs = list(of_kind(docs, "PodDisruptionBudget"))
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    from .netpol import selects

    for dname, d in by_name(docs, "Deployment").items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        [pdb] = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        spec = pdb["spec"]
        if "minAvailable" in spec:
            # Otherwise a node drain waits forever at minReplicas.
            assert spec["minAvailable"] < hpas[dname]["spec"]["minReplicas"], dname
        else:
            assert spec["maxUnavailable"] not in (0, "0%"), dname


# --- the migration Job --------------------------------------------------------------------------


def test_migration_job_runs_ciretry_migrate(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    [job] = of_kind(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c.get("command", []) + c.get("args", []) == ["ciretry", "migrate"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1
    env = {e["name"]: e for e in c["env"]}
    assert env["CIRETRY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "ciretry-db-app"


# --- Service, Ingress ---------------------------------------------------------------------------


def test_only_ingest_is_exposed(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    services = by_name(docs, "Service")
    assert set(services) == {"ciretry-ingest"}
    svc = services["ciretry-ingest"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    ingest = by_name(docs, "Deployment")["ciretry-ingest"]
    labels = ingest["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    port_names = {p["name"] for p in ingest["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names

    [ingress] = of_kind(docs, "Ingress")
    paths = []
    for rule in ingress["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            backend = p["backend"]["service"]
            assert backend["name"] == "ciretry-ingest"
            assert backend["port"]["name"] in {sp["name"] for sp in svc["spec"]["ports"]}
            paths.append(p["path"])
    assert "/webhooks" in paths
    # Health and metrics endpoints stay inside the cluster.
    assert "/" not in paths and not any(
        p.startswith(("/metrics", "/healthz", "/readyz")) for p in paths
    )


# --- NetworkPolicies ----------------------------------------------------------------------------

PROMETHEUS = Peer.pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
INTERNET = Peer.outside("203.0.113.7")
GITHUB_API = Peer.outside("140.82.112.6")
PRIVATE_HOST = Peer.outside("10.20.30.40")
KUBE_DNS = Peer.pod("kube-system", {"k8s-app": "kube-dns"})


def pods(docs: Docs) -> dict[str, tuple[str, dict[str, str], dict[str, Any]]]:
    """component -> (namespace, pod labels, pod spec) for every workload."""
    out = {}
    for d in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        out[labels["app.kubernetes.io/component"]] = (
            d["metadata"]["namespace"],
            labels,
            d["spec"]["template"]["spec"],
        )
    return out


def test_network_policies_isolate_the_services(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    policies = of_kind(docs, "NetworkPolicy")
    workloads = pods(docs)
    assert set(workloads) == {*SERVICES, "migrate"}
    for svc, (ns, labels, spec) in workloads.items():
        port = spec["containers"][0].get("ports", [{"containerPort": 8080}])[0]["containerPort"]
        same_ns_pod = Peer.pod(ns, {"app": "something-else"})

        def ingress(peer: Peer, p: int, ns: str = ns, labels: dict[str, str] = labels) -> bool:
            return allowed(
                policies,
                pod_namespace=ns,
                pod_labels=labels,
                direction="Ingress",
                peer=peer,
                port=p,
            )

        def egress(
            peer: Peer, p: int, proto: str = "TCP", ns: str = ns, labels: dict[str, str] = labels
        ) -> bool:
            return allowed(
                policies,
                pod_namespace=ns,
                pod_labels=labels,
                direction="Egress",
                peer=peer,
                port=p,
                protocol=proto,
            )

        if svc == "ingest":
            assert ingress(INTERNET, port), "webhooks must reach ingest"
            assert ingress(same_ns_pod, port)
            assert not ingress(INTERNET, 22)
        elif svc in ("classify", "act"):
            assert not ingress(INTERNET, port), f"{svc} reachable from outside"
            assert not ingress(same_ns_pod, port), f"{svc} reachable from its namespace"
            assert not ingress(Peer.pod("default"), port)
            assert ingress(PROMETHEUS, port), f"Prometheus cannot scrape {svc}"
            assert not ingress(PROMETHEUS, 22)
        else:  # the migration Job serves nothing
            for peer in (INTERNET, same_ns_pod, PROMETHEUS):
                assert not ingress(peer, 8080)

        assert egress(KUBE_DNS, 53, "UDP"), f"{svc}: no DNS"
        postgres = Peer.pod(ns, {"cnpg.io/cluster": "ciretry-db"})
        assert egress(postgres, 5432), f"{svc}: no PostgreSQL"
        assert not egress(postgres, 22)
        assert not egress(PRIVATE_HOST, 443), f"{svc}: reaches private addresses"
        assert not egress(INTERNET, 80)
        if svc == "migrate":
            assert not egress(GITHUB_API, 443)
        else:
            nats = Peer.pod(
                ns, {"app.kubernetes.io/name": "nats", "app.kubernetes.io/component": "nats"}
            )
            assert egress(nats, 4222), f"{svc}: no NATS"
            assert not egress(Peer.pod(ns, {"app.kubernetes.io/name": "nats-box"}), 4222)
            assert egress(GITHUB_API, 443), f"{svc}: cannot reach the provider APIs"


def test_every_network_policy_selects_some_pod(overlay: tuple[str, Docs]) -> None:
    _, docs = overlay
    from .netpol import selects

    labels = [labels for _, labels, _ in pods(docs).values()]
    for p in of_kind(docs, "NetworkPolicy"):
        assert any(selects(p["spec"]["podSelector"], lab) for lab in labels), p["metadata"]["name"]


def test_network_policy_check_catches_an_open_service(rendered: dict[str, Docs]) -> None:
    """The isolation test can fail: an allow-all ingress policy on act is noticed."""
    docs = copy.deepcopy(rendered["prod"])
    docs.append(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "oops", "namespace": "ciretry"},
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "act"}},
                "ingress": [{}],
            },
        }
    )
    with pytest.raises(AssertionError, match="act reachable from outside"):
        test_network_policies_isolate_the_services(("prod", docs))


# --- configuration, rules, policy, secrets ------------------------------------------------------


def test_every_ciretry_variable_is_a_config_field(overlay: tuple[str, Docs]) -> None:
    """A misspelt CIRETRY_* variable would be ignored silently by the services."""
    _, docs = overlay
    names = set(config_data(docs))
    for s in of_kind(docs, "Secret"):
        names |= set(s.get("data", {})) | set(s.get("stringData", {}))
    for d in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in c.get("env", [])}
    unknown = {n for n in names if n.startswith("CIRETRY_")} - CONFIG_VARS
    assert not unknown, f"not ciretry settings: {sorted(unknown)}"


def mounted(docs: Docs, deployment: str, mount_path_prefix: str) -> dict[str, str]:
    """The ConfigMap data mounted into a deployment under a path."""
    d = by_name(docs, "Deployment")[deployment]
    pod = d["spec"]["template"]["spec"]
    [mount] = [
        m
        for m in pod["containers"][0]["volumeMounts"]
        if m["mountPath"].startswith(mount_path_prefix)
    ]
    [vol] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    data: dict[str, str] = by_name(docs, "ConfigMap")[vol["configMap"]["name"]]["data"]
    return data


def test_rules_configmap_loads_and_its_examples_hold(
    overlay: tuple[str, Docs], tmp_path: Path
) -> None:
    from ciretry.classify.rules import load_ruleset

    _, docs = overlay
    config = config_data(docs)
    rules_dir = config["CIRETRY_RULES_PATHS"]
    data = mounted(docs, "ciretry-classify", rules_dir)
    assert data and all(k.endswith(".toml") for k in data)
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    ruleset = load_ruleset([tmp_path], include_default=False)
    assert ruleset.rules


def test_policy_configmap_loads(overlay: tuple[str, Docs], tmp_path: Path) -> None:
    from ciretry.act.policy import load_policy

    _, docs = overlay
    policy_path = Path(config_data(docs)["CIRETRY_POLICY_PATH"])
    data = mounted(docs, "ciretry-act", str(policy_path.parent))
    (tmp_path / policy_path.name).write_text(data[policy_path.name])
    policy = load_policy(tmp_path / policy_path.name)
    assert policy.default.settings.dry_run is True, "deployments start in dry-run (DESIGN)"


def test_secrets_hold_no_real_values(rendered: dict[str, Docs]) -> None:
    assert not of_kind(rendered["base"], "Secret")
    assert not of_kind(rendered["prod"], "Secret"), "prod must not generate secrets"
    secrets = of_kind(rendered["dev"], "Secret")
    assert {s["metadata"]["name"].rsplit("-", 1)[0] for s in secrets} >= {"ciretry-secrets"}
    for secret in secrets:
        for key, value in secret["data"].items():
            text = base64.b64decode(value).decode()
            if key == "username":
                continue
            assert text == "" or "placeholder" in text, f"dev secret {key} is not a placeholder"
    for name in ("base", *OVERLAYS):
        for cm in of_kind(rendered[name], "ConfigMap"):
            for key in cm.get("data", {}):
                assert not any(w in key.upper() for w in ("TOKEN", "SECRET", "PASSWORD")), key


def test_kustomize_failure_is_reported(tmp_path: Path) -> None:
    """The renderer is really run: a kustomization naming a missing file fails."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["missing.yaml"]}))
    with pytest.raises(AssertionError, match="kubectl kustomize"):
        kustomize(tmp_path)


def service_environ(docs: Docs, deployment: dict[str, Any]) -> dict[str, str]:
    """A Deployment's settings as its process reads them: the ConfigMap, then the container's
    own literal ``env`` values (which win)."""
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    own = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return {**config_data(docs), **own}


def test_consumer_settings_fit_the_replica_counts(overlay: tuple[str, Docs]) -> None:
    """max_ack_pending is per durable consumer, shared by all replicas: at maxReplicas each replica
    must still get its full batch, or added replicas would sit idle."""
    from ciretry.common.bus import ConsumerSettings
    from ciretry.common.service import consumer_settings

    _, docs = overlay
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    max_ack_pending = ConsumerSettings().max_ack_pending
    checked = set()
    for d in of_kind(docs, "Deployment"):
        svc = component(d)
        if svc not in ("classify", "act"):
            continue
        # The settings as the service reads them (a wrong value raises ConfigError here too).
        settings = consumer_settings(load_config(service_environ(docs, d)))
        assert settings.batch >= settings.concurrency, f"{svc}: a batch keeps every worker busy"
        hpa = hpas[d["metadata"]["name"]]
        in_flight = hpa["spec"]["maxReplicas"] * settings.batch
        assert in_flight <= max_ack_pending, (
            f"{svc}: {hpa['spec']['maxReplicas']} replicas x batch {settings.batch} "
            f"> max_ack_pending {max_ack_pending}"
        )
        assert settings.max_deliver >= 3 and settings.ack_wait >= 10
        checked.add(svc)
    assert checked == {"classify", "act"}


#: act holds a message through the provider's check and call: about 3.5 times one request's
#: latency (350 ms at 100 ms, bench/e2e.py --provider-ms 100), and makes at least 1.2 requests
#: per retried job (docs/benchmarks.md, stop 29).
ACT_HOLD_PER_LATENCY = 3.5
ACT_REQUESTS_PER_JOB = 1.2


def test_act_holds_enough_messages_for_its_provider_requests(overlay: tuple[str, Docs]) -> None:
    """Per act replica, jobs/s <= concurrency / hold time and <= provider requests at once /
    (latency x requests per job); the latency cancels out. The messages a replica holds must not
    be the tighter bound: the HPA scales on CPU and does not see a replica that waits."""
    _, docs = overlay
    [act] = [d for d in of_kind(docs, "Deployment") if component(d) == "act"]
    config = load_config(service_environ(docs, act))
    by_messages = config.consumer_concurrency / ACT_HOLD_PER_LATENCY
    by_requests = config.provider_max_in_flight / ACT_REQUESTS_PER_JOB
    assert by_messages >= by_requests, (
        f"act: {config.consumer_concurrency} messages at once bound a replica to "
        f"{by_messages:.1f}/latency jobs/s, below its {config.provider_max_in_flight} provider "
        f"requests' {by_requests:.1f}/latency"
    )
