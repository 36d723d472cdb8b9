from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ciretry.classify.cli import main, register


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_register_adds_subcommands_with_func() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["classify", "--log", "x.log", "--exit-code", "137", "--json"])
    assert callable(args.func) and args.exit_code == 137 and args.json
    args = parser.parse_args(["rules", "check", "a.toml", "--against", "d"])
    assert callable(args.func) and args.paths == [Path("a.toml")]


def test_classify_json_on_a_gz_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "job.log.gz"
    log.write_bytes(
        gzip.compress(b"building\n" * 100 + b"/usr/bin/bash: line 3:  99 Killed   make\n")
    )
    code, out, _ = run(["classify", "--log", str(log), "--exit-code", "137", "--json"], capsys)
    assert code == 0
    v = json.loads(out)
    assert v["category"] == "oom" and v["retryable"] is True
    assert v["budget"] == "system" and v["action"] == "rerun_with_resources"
    assert v["rules"] == ["oom-killed-137", "oom-sigkill-reported"]  # the log reports it too
    text = "/usr/bin/bash: line 3:  99 Killed   make"
    assert v["evidence"] == [
        {"rule": "oom-killed-137", "line": 101, "text": text},
        {"rule": "oom-sigkill-reported", "line": 101, "text": text},
    ]


def test_classify_human_output_with_signals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "job.log"
    log.write_text("Running with gitlab-runner 17.0\n")
    code, out, _ = run(["classify", "--log", str(log), "--failure-reason", "runner_system_failure"],
                       capsys)  # fmt: skip
    assert code == 0
    assert "category:   runner_system" in out and "retryable:  yes" in out
    assert "gitlab-runner-system-failure  signal failure_reason=runner_system_failure" in out
    code, out, _ = run(["classify", "--log", str(log), "--pod-reason", "Evicted"], capsys)
    assert "category:   preempted" in out


def test_classify_with_extra_rules_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "job.log"
    log.write_text("mirror.example.com returned 503\n")
    rules = tmp_path / "site.toml"
    rules.write_text(
        '[[rule]]\nid = "site-mirror"\ncategory = "infra_network"\nbudget = "system"\n'
        "log = 'mirror\\.example\\.com returned 5\\d\\d'\n"
        '[rule.examples]\nmatch = ["mirror.example.com returned 502"]\nno_match = ["mirror.example.com returned 200"]\n'
    )
    code, out, _ = run(["classify", "--log", str(log), "--rules", str(rules), "--json"], capsys)
    assert code == 0 and json.loads(out)["rules"] == ["site-mirror"]
    code, _, err = run(["classify", "--log", str(tmp_path / "missing.log")], capsys)
    assert code == 2 and "no such log file" in err


def test_rules_check_validates_and_names_bad_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["rules", "check"], capsys)
    assert code == 0 and "rules OK" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rule]]\nid = "greedy"\ncategory = "oom"\naction = "rerun_with_resources"\nlog = "oom"\n'
        '[rule.examples]\nmatch = ["oom"]\nno_match = ["zoom meeting"]\n'
    )
    code, _, err = run(["rules", "check", str(bad)], capsys)
    assert code == 2 and "greedy" in err and "zoom meeting" in err


def test_rules_check_against_reports_matching_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "ok"
    logs.mkdir()
    (logs / "a.log").write_text("all good\n")
    (logs / "b.log.gz").write_bytes(gzip.compress(b"x\nsrc/a.c:1:2: error: nope\n"))
    (logs / "notes.json").write_text('{"error": "src/a.c:1:2: error: ignored, not a log"}')
    code, out, _ = run(["rules", "check", "--against", str(logs)], capsys)
    assert code == 1
    assert "b.log.gz: rule compile-error (deterministic) matches 1 line(s), first at line 2" in out
    assert "1 rule match(es) in 2 passed log(s)" in out


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    log = tmp_path / "j.log"
    log.write_text("##[error]The operation was canceled.\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from ciretry.classify.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "classify", "--log", str(log), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["category"] == "cancelled"
