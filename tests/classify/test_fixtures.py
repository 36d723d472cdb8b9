"""The must-show: labelled real CI logs, and logs of successful jobs.

Run ``python -m tests.classify.test_fixtures`` (from the repo root) to print the confusion
table.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ciretry.classify.cli import classify_file, main
from ciretry.classify.fold import fold_verdict
from ciretry.classify.rules import RuleSet, load_ruleset

from .helpers import job


def labelled(fixtures: Path) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = json.loads((fixtures / "logs" / "labels.json").read_text())
    return entries


def confusion(ruleset: RuleSet, fixtures: Path) -> tuple[Counter[tuple[str, str]], list[str]]:
    table: Counter[tuple[str, str]] = Counter()
    rows = []
    for e in labelled(fixtures):
        v = classify_file(ruleset, fixtures / e["file"])
        got = "retry" if v.retryable else "no retry"
        table[(e["retryable"], got)] += 1
        rows.append(
            f"{e['file']:<52} label={e['retryable']:<6} ({e['category']:<13}) -> "
            f"{v.category:<13} {got:<8} {','.join(v.rules[:2])}"
        )
    return table, rows


def format_table(table: Counter[tuple[str, str]]) -> str:
    lines = [f"{'label':<10}{'retry':>8}{'no retry':>10}"]
    for label in ("yes", "no", "either"):
        lines.append(f"{label:<10}{table[(label, 'retry')]:>8}{table[(label, 'no retry')]:>10}")
    return "\n".join(lines)


def test_labelled_logs(
    ruleset: RuleSet, fixtures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table, rows = confusion(ruleset, fixtures)
    with capsys.disabled():
        print("\n" + "\n".join(rows) + "\n" + format_table(table))
    assert table[("no", "retry")] == 0, "a log labelled not retryable was classified retryable"
    assert table[("yes", "no retry")] == 0, "a log labelled retryable was not"
    assert table[("yes", "retry")] >= 3 and table[("no", "no retry")] >= 15


def test_labelled_categories_match_where_the_label_is_firm(
    ruleset: RuleSet, fixtures: Path
) -> None:
    for e in labelled(fixtures):
        if e["retryable"] == "either":
            continue
        v = classify_file(ruleset, fixtures / e["file"])
        assert v.category == e["category"], e["file"]
        assert v.evidence, e["file"]


def test_success_logs_fire_no_rule(fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rules", "check", "--against", str(fixtures / "logs" / "success")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 rule match(es) in 13 passed log(s)" in out


def test_success_logs_are_not_retryable(ruleset: RuleSet, fixtures: Path) -> None:
    for log in sorted((fixtures / "logs" / "success").iterdir()):
        v = classify_file(ruleset, log)
        assert not v.retryable and v.rules == (), log.name


def test_ghc_spuriobot_testdata(ruleset: RuleSet, fixtures: Path) -> None:
    data = fixtures / "ghc_spuriobot" / "testdata"
    sysfail = json.loads((data / "spurio-system_failure.json").read_text())
    v = fold_verdict(job(failure_reason=sysfail["failure_reason"]), [], [], ruleset,
                     log_available=False)  # fmt: skip
    assert v.retryable and v.category == "runner_system"
    info = json.loads((data / "jobinfo.json").read_text())
    v = fold_verdict(job(failure_reason=info["failure_reason"]), [], [], ruleset,
                     log_available=False)  # fmt: skip
    assert not v.retryable and v.category == "unknown"  # unknown reasons are surfaced, not guessed


if __name__ == "__main__":
    from .conftest import FIXTURES

    t, r = confusion(load_ruleset(), FIXTURES)
    print("\n".join(r))
    print(format_table(t))
