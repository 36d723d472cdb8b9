"""Dockerfile and .dockerignore, without a Docker engine: hadolint, the BuildKit parser, and the
build context the allow-list lets through."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest

from .conftest import ROOT, tool

DOCKERFILE = ROOT / "Dockerfile"


def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for c in commands():
        if c.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(c)
    return out


def global_args() -> dict[str, str]:
    args = {}
    for c in commands():
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG" and "=" in c.value[0]:
            k, v = c.value[0].split("=", 1)
            args[k] = v
    return args


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_slim_python_final_stage() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "builder + runtime"
    args = global_args()

    def image(stage: list[dockerfile.Command]) -> str:
        ref = stage[0].value[0]
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)

    final = all_stages[-1]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image(final)), image(final)
    builder_names = {s[0].value[2] for s in all_stages[:-1] if len(s[0].value) == 3}
    copies_from = [
        c for c in final if c.cmd == "COPY" and any(f.startswith("--from=") for f in c.flags)
    ]
    assert (
        copies_from and {f.split("=", 1)[1] for c in copies_from for f in c.flags} <= builder_names
    )
    # Only the built environment crosses over: no source tree in the final image.
    assert not [c for c in final if c.cmd in ("COPY", "ADD") and not c.flags]


def test_final_stage_runs_as_a_non_root_user() -> None:
    final = stages()[-1]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert user.isdigit(), "a numeric UID lets Kubernetes' runAsNonRoot verify it"


def test_entrypoint_and_default_command() -> None:
    final = stages()[-1]
    [entry] = [c for c in final if c.cmd == "ENTRYPOINT"]
    [cmd] = [c for c in final if c.cmd == "CMD"]
    assert entry.json and list(entry.value) == ["ciretry"], "exec form: SIGTERM reaches ciretry"
    assert cmd.json and list(cmd.value) == ["serve", "ingest"]
    env = " ".join(" ".join(c.value) for c in final if c.cmd == "ENV")
    assert "CIRETRY_HTTP_HOST" in env and "0.0.0.0" in env


def test_no_secret_is_baked_in() -> None:
    for c in commands():
        if c.cmd in ("ENV", "ARG", "LABEL"):
            names = [v.split("=", 1)[0] for v in c.value]
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|_URL$", name.upper()), c.original
        if c.cmd in ("COPY", "ADD"):
            assert not any(".env" in v for v in c.value), c.original


def test_dependency_list_command_matches_pyproject() -> None:
    """The builder installs dependencies from pyproject before copying the code: run the very
    command the Dockerfile runs and compare."""
    [run] = [c for c in commands() if c.cmd == "RUN" and "tomllib" in c.value[0]]
    m = re.search(r'python -c "(.*?)"\s', run.value[0], re.S)
    assert m, run.original
    script = m.group(1)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out == deps


# --- .dockerignore ------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out += pattern[i : j + 1]
            i = j + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        rx = _pattern_regex(pat.strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerignore_sends_only_the_build_inputs(ignore_patterns: list[str]) -> None:
    sent = [
        "pyproject.toml",
        "README.md",
        "libs/common/ciretry/common/config.py",
        "libs/common/ciretry/common/migrations/0001_event_log.sql",
        "services/act/ciretry/act/policy/default.toml",
    ]
    kept_out = [
        ".venv/bin/python",
        ".git/HEAD",
        "compose/.env",
        "libs/common/.env",
        "tests/conftest.py",
        "k8s/base/kustomization.yaml",
        "libs/common/ciretry/common/__pycache__/config.cpython-311.pyc",
        ".ciretry/pg/postgresql.conf",
    ]
    for p in sent:
        assert not dockerignore_excludes(p, ignore_patterns), f"{p} would not reach the build"
    for p in kept_out:
        assert dockerignore_excludes(p, ignore_patterns), f"{p} would be sent to the build"


def test_everything_the_wheel_needs_is_copied(ignore_patterns: list[str]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel_paths = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"]
    copied = [
        src.rstrip("/")
        for c in commands()
        if c.cmd == "COPY" and not c.flags
        for src in c.value[:-1]
    ]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
        assert not dockerignore_excludes(src, ignore_patterns), f"COPY {src} is .dockerignored"
    for path in wheel_paths:
        assert any(path == s or path.startswith(s + "/") for s in copied), f"{path} not copied"
    assert pyproject["project"]["readme"] in copied
    for f in ("pyproject.toml",):
        assert f in copied


def test_dockerignore_check_can_fail(ignore_patterns: list[str]) -> None:
    assert not dockerignore_excludes("compose/.env", ["*", "!compose/"])
    assert dockerignore_excludes("libs/x/__pycache__/a.pyc", ignore_patterns)
    assert not dockerignore_excludes(".venv/bin/python", [".git"])


def test_no_path_in_dockerfile_refers_outside_the_context() -> None:
    for c in commands():
        if c.cmd in ("COPY", "ADD") and not c.flags:
            for src in c.value[:-1]:
                assert not Path(src).is_absolute() and ".." not in Path(src).parts, c.original
