"""Policy files: the shipped default loads, scopes match first-wins, bad input names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciretry.act.policy import PolicyError, load_policy, parse_policy


def test_shipped_default_loads_with_release_scope() -> None:
    p = load_policy()
    assert p.version == 1 and p.ident == "default@1"
    assert p.scope_for("any/project", "main").name == "default"
    release = p.scope_for("any/project", "release/2.0")
    assert release.name == "release" and release.settings.pipeline.percent == 10.0
    # Merged over [default]: what the scope does not say is inherited.
    assert release.settings.attempts.system == 3
    assert p.default.settings.backoff_for("infra_network").base_s == 30.0
    assert p.default.settings.backoff_for("preempted").base_s == 0.0


def test_first_matching_scope_wins(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(
        'version = 1\n[[scopes]]\nname = "a"\nprojects = ["grp/*"]\ndry_run = true\n'
        '[[scopes]]\nname = "b"\nprojects = ["grp/x"]\n'
    )
    p = load_policy(f)
    assert p.scope_for("grp/x", None).name == "a"
    assert p.scope_for("grp/x", None).settings.dry_run is True
    assert p.scope_for("other", None).name == "default"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "version: required"),
        ("version = 2", "version: 2 not supported"),
        ('version = 1\n[default.attempts]\nsystem = "x"', "default.attempts.system"),
        ("version = 1\n[default]\nsytem = 3", "sytem"),
        ('version = 1\n[[scopes]]\nname = "s"\n[scopes.pipeline]\nfloor = 1.5', "scopes[0] (s)"),
        ('version = 1\n[[scopes]]\nname = "s"\nrefs = "main"', "scopes[0] (s).refs"),
        ("version = 1\nbogus = 1", "bogus"),
        ("version = [", "not valid TOML"),
    ],
)
def test_bad_input_names_the_key(text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.toml")
    assert needle in str(info.value) and str(info.value).startswith("p.toml")


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "nope.toml")


def test_mostly_broken_and_pipeline_limit_math() -> None:
    s = parse_policy("version = 1").default.settings
    assert s.pipeline.limit(1000) == 50 and s.pipeline.limit(10) == 3
    assert s.mostly_broken.broken(6, 1000) and not s.mostly_broken.broken(5, 1000)
    assert s.mostly_broken.broken(3, 5)


def test_learned_retries_have_their_own_limit_and_the_learning_table_is_checked() -> None:
    policy = load_policy()
    attempts = policy.default.settings.attempts
    assert (attempts.learned, attempts.limit_for("learned"), attempts.limit_for("system")) == (
        1,
        1,
        3,
    )
    text = "version = 1\n[default.attempts]\nlearned = 2\n[learning]\nmin_passes = 5\n"
    assert parse_policy(text).default.settings.attempts.limit_for("learned") == 2
    with pytest.raises(PolicyError, match="learning"):
        parse_policy("version = 1\n[learning]\nmin_passes = 0\n")
    with pytest.raises(PolicyError, match="learning"):
        parse_policy("version = 1\n[learning]\nk = 3\n")
