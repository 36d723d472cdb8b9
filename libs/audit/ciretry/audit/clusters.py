"""Clusters of failures by signature, and a rule stub for each (pure; issue 15).

``shape`` turns the store's cluster rows into the API's JSON; ``rule_stub`` writes the rule a
maintainer would start from to make a cluster a rule: a regex from the cluster's most specific
normalized line (placeholders become the patterns they stand for, the rest is escaped and
anchored as logged), its real lines as ``match`` examples, and the nearest other clusters'
lines (most words in common) as ``no_match``, so the stub is checked against what it must not
catch the moment its file loads.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ciretry.common.learning import wilson

#: What each placeholder of ``ciretry.common.signature`` stands for, as RE2.
PLACEHOLDERS: Final = {
    "<ts>": r"\S+(?: \S+)?",
    "<uuid>": r"[0-9a-fA-F-]{36}",
    "<tmp>": r"\S+",
    "<ip>": r"\S+",
    "<hex>": r"[0-9a-fA-Fx]+",
    "<id>": r"[\w-]+",
    "<dur>": r"[\d.]+ ?\w+",
    "<n>": r"[\d.,]+",
}
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
_WORD = re.compile(r"[A-Za-z_]{3,}")
#: Signals appended to a signature's text (not log lines).
_SIGNAL_PREFIXES: Final = ("reason=", "exit=", "pod=")


def log_lines(text: str) -> list[str]:
    """The normalized log lines of a signature's text (its signals left out)."""
    return [x for x in text.split("\n") if x and not x.startswith(_SIGNAL_PREFIXES)]


def regex_for(normalized: str) -> str:
    """A regex matching the lines a normalized line stands for."""
    out, last = [], 0
    for m in _PLACEHOLDER.finditer(normalized):
        out.append(re.escape(normalized[last : m.start()]))
        out.append(PLACEHOLDERS[m.group(0)])
        last = m.end()
    out.append(re.escape(normalized[last:]))
    # Normalizing collapsed runs of white space into one space: any run matches. re.escape
    # escapes punctuation RE2 does not need escaped; unescaped, the stub reads better.
    text = "".join(out).replace("\\-", "-").replace("\\:", ":")
    return text.replace("\\ ", r"\s+")


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def _specific(lines: Sequence[str]) -> str | None:
    """The line with the most literal words (the least generic); None without one."""
    best = max(lines, key=lambda x: (len(_words(_PLACEHOLDER.sub("", x))), len(x)), default=None)
    return best


def _toml_str(value: str) -> str:
    """A TOML string as a person would write it: literal (no escapes) where it can be."""
    if "\n" not in value and "'" not in value:
        return f"'{value}'"
    if "\n" not in value and "'''" not in value:
        return "'''" + value + "'''"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def rule_stub(cluster: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> str | None:
    """A TOML rule to start from for ``cluster`` (None when it has no log line to match)."""
    lines = log_lines(str(cluster["text"]))
    line = _specific(lines)
    if line is None:
        return None
    examples = [x for x in cluster.get("examples") or () if x][:3]
    mine = _words(line)
    near = sorted(
        (o for o in others if o["signature"] != cluster["signature"]),
        key=lambda o: -len(mine & _words(str(o["text"]))),
    )
    no_match: list[str] = []
    for other in near[:3]:
        other_examples = [x for x in other.get("examples") or () if x]
        if other_examples:
            no_match.append(other_examples[-1])
    slug = "-".join(sorted(mine, key=len, reverse=True)[:3]) or "cluster"
    body = [
        "[[rule]]",
        f'id = "learned-{slug}"',
        f'description = "From cluster {cluster["signature"]}: say what fails and why"',
        'category = "infra_network"  # choose: the cluster says what happened, not why',
        'budget = "system"',
        "priority = 450",
        "confidence = 0.7",
        f"log = {_toml_str(regex_for(line))}",
        "[rule.examples]",
        "match = [" + ", ".join(_toml_str(x) for x in examples) + "]",
        "no_match = [" + ", ".join(_toml_str(x) for x in no_match) + "]",
    ]
    return "\n".join(body) + "\n"


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def shape(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The API's clusters from the store's rows, each with its rule stub."""
    out = []
    for r in rows:
        passed, again = int(r["passed_on_retry"]), int(r["failed_again_same"])
        scored = passed + again
        low, high = wilson(passed, scored)
        item = {
            "signature": r["signature"],
            "algorithm": r["algorithm"],
            "text": r["text"],
            "examples": list(r["examples"] or []),
            "first_seen": _iso(r["first_seen"]),
            "last_seen": _iso(r["last_seen"]),
            "impact": {
                "jobs": int(r["jobs"]),
                "pipelines": int(r["pipelines"]),
                "commits": int(r["commits"]),
                "people": int(r["people"]),
            },
            "trend": {"1d": int(r["jobs_1d"]), "7d": int(r["jobs_7d"]), "30d": int(r["jobs_30d"])},
            "outcomes": {
                "passed_on_retry": passed,
                "failed_again_same": again,
                "failed_differently": int(r["failed_differently"]),
                "never_retried": int(r["never_retried"]),
                "pass_rate": round(passed / scored, 3) if scored else None,
                # 95 % Wilson interval of the pass-on-retry rate (0..1 before any retry).
                "pass_rate_low": round(low, 3),
                "pass_rate_high": round(high, 3),
            },
            "learned": int(r["learned"]),
            "categories": sorted(r["categories"] or []),
            "top_jobs": list(r["top_jobs"] or []),
            "top_runners": list(r["top_runners"] or []),
            "top_projects": list(r["top_projects"] or []),
        }
        out.append(item)
    for item in out:
        item["rule_stub"] = rule_stub(item, out)
    return out
