from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ciretry.classify.engine import Scanner
from ciretry.classify.rules import RuleSet, load_ruleset

from .fakes import FakeProvider

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
if not FIXTURES.is_dir():  # running from another checkout layout
    FIXTURES = Path("/work/shared/fixtures")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def ruleset() -> RuleSet:
    return load_ruleset()


@pytest.fixture(scope="session")
def scanner(ruleset: RuleSet) -> Scanner:
    return Scanner(ruleset)


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    """A fake provider serving job logs over real HTTP (GitLab, GitHub and Taskcluster paths)."""
    p = await FakeProvider().started()
    yield p
    await p.close()
