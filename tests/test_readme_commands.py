"""The README's two commands from a fresh clone in a private (0700) directory (issue 14, item 1).

That is where a root user clones to (``/root``): PostgreSQL refuses to run as root, the
unprivileged user it runs as cannot enter the directory, and both commands used to fail there.
This test clones this checkout (committed state plus uncommitted changes) into a new 0700
directory and runs ``./run test`` (one test on embedded servers) and ``./run up`` in it, with
no server configured, as whoever runs the suite: root on CI, a normal user elsewhere.

Cost: ``./run`` creates the clone's virtualenv (pip, from its cache), about a minute.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.commands import Command, clean_env, free_base_port, run

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def _clone_with_changes(into: Path) -> None:
    """``git clone`` of this checkout's HEAD, then its uncommitted changes on top, so the test
    runs the code under test (on CI the checkout is clean and this is a plain clone)."""
    _git("clone", "--quiet", "--no-checkout", str(REPO), str(into), cwd=REPO)
    _git("fetch", "--quiet", str(REPO), "HEAD", cwd=into)
    _git("checkout", "--quiet", "FETCH_HEAD", cwd=into)
    changed = _git("ls-files", "--modified", "--others", "--exclude-standard", "-z", cwd=REPO)
    for name in filter(None, changed.split("\0")):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    deleted = _git("ls-files", "--deleted", "-z", cwd=REPO)
    for name in filter(None, deleted.split("\0")):
        with contextlib.suppress(FileNotFoundError):
            (into / name).unlink()


@pytest.fixture
def private_clone() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="ciretry-home-"))
    os.chmod(home, 0o700)
    clone = home / "ciretry"
    _clone_with_changes(clone)
    yield clone
    shutil.rmtree(home, ignore_errors=True)


def test_the_readme_commands_from_a_clone_in_a_private_home(private_clone: Path) -> None:
    assert private_clone.parent.stat().st_mode & 0o777 == 0o700
    # No configured servers; the clone's own virtualenv, made by ./run with this Python.
    env = clean_env(PYTHON=sys.executable, CIRETRY_LOG_JSON="false")
    env.pop("VIRTUAL_ENV", None)

    tested = run(
        ["./run", "test", "-q", "-p", "no:cacheprovider",
         "tests/common/test_eventlog_contract.py::test_append_and_read_stream_in_order[postgres]"],
        env, cwd=private_clone, within=600,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "1 passed" in tested.stdout

    base = free_base_port()
    up = Command(["./run", "up", "--base-port", str(base)], env, cwd=private_clone)
    pgdata: Path | None = None
    try:
        up.wait_for_line("ciretry is ready", within=300)
        found = re.search(r"data in (\S+)\)", up.wait_for_line("embedded PostgreSQL"))
        assert found is not None
        pgdata = Path(found.group(1))
        dashboard = up.wait_for_line(r"^\s+dashboard\s+http").split()[-1]
        with urllib.request.urlopen(dashboard, timeout=10) as r:
            assert r.status == 200

        # The tools, run in the clone, find the stack without any URL.
        tool = run(["./run", "ciretry", "audit", "events", "--json"], env, cwd=private_clone)
        assert tool.returncode == 0, tool.stderr
        assert "using the dev stack" in tool.stderr

        up.signal(signal.SIGINT)
        assert up.finish(within=120) == 0, up.text()
        assert "ciretry stopped" in up.text()
    finally:
        up.kill()
        if pgdata is not None and not pgdata.is_relative_to(private_clone):
            shutil.rmtree(pgdata, ignore_errors=True)  # root: the cluster lives under $TMPDIR
