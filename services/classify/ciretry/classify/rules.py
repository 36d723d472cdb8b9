"""Classification rules as data: TOML files with their own examples, checked on load.

A rule file holds ``[[rule]]`` tables::

    [[rule]]
    id = "gitlab-runner-system-failure"
    description = "GitLab says the runner, not the script, failed"
    category = "runner_system"          # DESIGN taxonomy
    budget = "system"                   # which retry budget a retry draws on
    action = "retry_job"                # retry_job | rerun_with_resources | recreate_pipeline | none
    retryable = true                    # optional; default from the category
    priority = 900                      # higher wins when several rules fire
    confidence = 0.95                   # optional, 0..1
    failure_reasons = ["runner_system_failure"]   # canonical JobFinished.failure_reason
    exit_codes = [137]                  # JobFinished / PodTerminated exit code, else the log's
    signals = { exit_code = 137, signal = "KILL", stage = "script" }   # typed signals (below)
    pod_reasons = ["OOMKilled"]         # container reason, pod reason or disruption reason
    log = '^ERROR: Job failed \\(system failure\\)'   # RE2 regex, one line at a time
    log_not = 'expected'                # a matching line that also matches this is ignored
    scope = { last_lines = 200 }        # or { section = "get_sources" } (fnmatch pattern)
                                        # or { failure = 40 }: where the job died (below)
    [rule.examples]
    match = ["ERROR: Job failed (system failure): ...", { exit_code = 137, log = "Killed" }]
    no_match = ["..."]

Every matcher given must hold (AND); a rule needs at least one. ``signals`` holds typed
signals, each a value or a list of values: ``exit_code`` (the job's or pod's exit code when the
provider gave one, else the one the runner printed in the log), ``signal`` (``KILL``, ``TERM``,
``SEGV``, ``ABRT``: from the status, 128 + n, or a "Killed" notice next to the failure) and
``stage`` (``setup``, ``fetch``, ``script``, ``upload``: where the job died; see
``logsignals``). ``scope = { failure = N }`` keeps only log matches within N lines before the
runner's failure report (or the end of the log when there is none), and never matches a log
whose last verdict is a success: generic text that test suites print on purpose counts only
where the job died.

Example strings are log text: provider matchers (``failure_reasons``, ``pod_reasons``, and
``exit_codes`` when the text reports no status) are taken as satisfied, while ``signals`` and
the failure scope are judged from the text itself, as on a real log. Tables give signals
explicitly (``exit_code``, ``failure_reason``, ``pod_reason``, ``signal``, ``stage``,
``log``). A file whose examples disagree
with its rules is refused, naming the rule, so a contributor cannot add a false positive
unnoticed. Later files may replace a rule (``override = true``) or switch one off
(``id = "...", disabled = true``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.resources
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from ciretry.common.events import Action, BudgetClass, Category

from . import logtext
from .logsignals import STAGES, LogFacts, facts_of_lines
from .patterns import PatternError, compile_linear

CATEGORIES: frozenset[str] = frozenset(get_args(Category))
BUDGETS: frozenset[str] = frozenset(get_args(BudgetClass))
ACTIONS: frozenset[str] = frozenset(get_args(Action))

#: What a category implies when a rule does not say otherwise.
RETRYABLE_BY_CATEGORY: Mapping[str, bool] = {
    "oom": True,
    "preempted": True,
    "infra_network": True,
    "infra_disk": True,
    "runner_system": True,
    "timeout": False,
    "flaky_test": True,
    "deterministic": False,
    "cancelled": False,
    "unknown": False,
}

_RULE_KEYS = frozenset(
    {
        "id", "description", "category", "budget", "action", "retryable", "priority",
        "confidence", "failure_reasons", "exit_codes", "pod_reasons", "log", "log_not",
        "scope", "examples", "override", "disabled", "notes", "refs", "signals",
    }
)  # fmt: skip
_EXAMPLE_KEYS = frozenset({"log", "exit_code", "failure_reason", "pod_reason", "signal", "stage"})
_SIGNAL_KEYS = frozenset({"exit_code", "signal", "stage"})
SIGNAL_NAMES: frozenset[str] = frozenset({"KILL", "TERM", "SEGV", "ABRT", "INT"})
_STATUS_SIGNALS = {137: "KILL", 143: "TERM", 139: "SEGV", 134: "ABRT", 130: "INT"}


class RuleFileError(ValueError):
    """A rule file that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True, slots=True)
class Signals:
    """The facts a rule's signal matchers judge: the provider's, completed by the log's."""

    exit_code: int | None = None
    failure_reason: str | None = None
    pod_reasons: frozenset[str] = frozenset()
    signal: str | None = None
    stage: str | None = None

    def with_log(self, facts: LogFacts | None) -> Signals:
        """These signals completed by what the log says: the provider's exit code wins."""
        if facts is None:
            return self
        return Signals(
            exit_code=self.exit_code if self.exit_code is not None else facts.exit_code,
            failure_reason=self.failure_reason,
            pod_reasons=self.pod_reasons,
            signal=self.signal or facts.signal,
            stage=self.stage or facts.stage,
        )

    @property
    def effective_signal(self) -> str | None:
        if self.signal is not None:
            return self.signal
        return _STATUS_SIGNALS.get(self.exit_code) if self.exit_code is not None else None


@dataclass(frozen=True, slots=True)
class Example:
    log: str | None
    signals: Signals | None  # None: a plain log example, signal matchers taken as satisfied


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    id: str
    description: str
    category: Category
    budget: BudgetClass
    action: Action
    retryable: bool
    priority: int
    confidence: float
    failure_reasons: frozenset[str]
    exit_codes: frozenset[int]
    pod_reasons: frozenset[str]
    log: str | None
    log_not: str | None
    scope_last_lines: int | None
    scope_section: str | None
    scope_failure: int | None
    signal_names: frozenset[str]
    stages: frozenset[str]
    examples_match: tuple[Example, ...]
    examples_no_match: tuple[Example, ...]
    source: str
    _log_re: Any = field(repr=False)
    _log_not_re: Any = field(repr=False)

    @property
    def has_signals(self) -> bool:
        return bool(
            self.failure_reasons or self.exit_codes or self.pod_reasons or self.signal_names
            or self.stages
        )  # fmt: skip

    def signals_match(self, s: Signals, *, assume_provider: bool = False) -> bool:
        """Do the signal matchers hold? ``assume_provider``: judging a plain log example, where
        the provider's facts are not known (taken as satisfied; an exit code the log itself
        reports is still judged)."""
        if self.failure_reasons and not assume_provider:
            if s.failure_reason not in self.failure_reasons:
                return False
        if self.exit_codes and not (assume_provider and s.exit_code is None):
            if s.exit_code not in self.exit_codes:
                return False
        if self.signal_names and s.effective_signal not in self.signal_names:
            return False
        if self.stages and s.stage not in self.stages:
            return False
        if self.pod_reasons and not assume_provider:
            return bool(self.pod_reasons & s.pod_reasons)
        return True

    def line_matches(self, text: str) -> bool:
        """Does one cleaned line (timestamp prefix stripped) satisfy log and log_not?"""
        if self._log_re is None or self._log_re.search(text) is None:
            return False
        return self._log_not_re is None or self._log_not_re.search(text) is None

    def in_section(self, sections: tuple[str, ...]) -> bool:
        if self.scope_section is None:
            return True
        return any(fnmatch.fnmatchcase(name, self.scope_section) for name in sections)

    def in_tail(self, line: int, total_lines: int) -> bool:
        return self.scope_last_lines is None or line > total_lines - self.scope_last_lines

    def in_failure_scope(self, line: int, facts: LogFacts, total_lines: int) -> bool:
        return self.scope_failure is None or facts.in_failure_window(
            line, self.scope_failure, total_lines
        )

    def fires_on(self, example: Example) -> bool:
        """The rule's verdict on one example, with the same semantics as a real log."""
        lines = list(logtext.iter_lines([example.log.encode()])) if example.log is not None else []
        facts, total = facts_of_lines((ln.number, ln.text, ln.sections) for ln in lines)
        if example.signals is None:
            s = Signals().with_log(facts)
            if not self.signals_match(s, assume_provider=True):
                return False
        elif not self.signals_match(example.signals.with_log(facts)):
            return False
        if self.log is None:
            return True
        if example.log is None:
            return False
        return any(
            self.in_section(ln.sections) and self.in_tail(ln.number, total)
            and self.in_failure_scope(ln.number, facts, total) and self.line_matches(ln.text)
            for ln in lines
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    version: str
    sources: tuple[str, ...]
    _by_id: dict[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {r.id: r for r in self.rules})

    def __getitem__(self, rule_id: str) -> Rule:
        return self._by_id[rule_id]

    def get(self, rule_id: str) -> Rule | None:
        return self._by_id.get(rule_id)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def log_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.log is not None)


# --- parsing --------------------------------------------------------------------------------


def _fail(source: str, rule_id: str | None, msg: str) -> RuleFileError:
    where = f"{source}: rule {rule_id!r}" if rule_id else source
    return RuleFileError(f"{where}: {msg}")


def _str_list(raw: dict[str, Any], key: str, source: str, rid: str) -> frozenset[str]:
    val = raw.get(key, [])
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
        raise _fail(source, rid, f"{key} must be a list of strings")
    return frozenset(val)


def _parse_example(raw: Any, source: str, rid: str) -> Example:
    if isinstance(raw, str):
        return Example(log=raw, signals=None)
    if not isinstance(raw, dict):
        raise _fail(source, rid, f"an example must be a string or a table, not {raw!r}")
    unknown = set(raw) - _EXAMPLE_KEYS
    if unknown:
        raise _fail(source, rid, f"unknown example keys {sorted(unknown)}")
    exit_code = raw.get("exit_code")
    if exit_code is not None and not isinstance(exit_code, int):
        raise _fail(source, rid, "example exit_code must be an integer")
    pod = raw.get("pod_reason")
    log = raw.get("log")
    return Example(
        log=log if isinstance(log, str) else None,
        signals=Signals(
            exit_code=exit_code,
            failure_reason=raw.get("failure_reason"),
            pod_reasons=frozenset([pod]) if isinstance(pod, str) else frozenset(),
            signal=raw.get("signal"),
            stage=raw.get("stage"),
        ),
    )


def _describe(example: Example) -> str:
    parts = []
    if example.signals is not None:
        s = example.signals
        if s.exit_code is not None:
            parts.append(f"exit_code={s.exit_code}")
        if s.failure_reason is not None:
            parts.append(f"failure_reason={s.failure_reason}")
        if s.pod_reasons:
            parts.append(f"pod_reason={','.join(sorted(s.pod_reasons))}")
        if s.signal is not None:
            parts.append(f"signal={s.signal}")
        if s.stage is not None:
            parts.append(f"stage={s.stage}")
    if example.log is not None:
        text = example.log if len(example.log) <= 120 else example.log[:117] + "..."
        parts.append(repr(text))
    return " ".join(parts)


def _values(val: Any) -> list[Any]:
    return val if isinstance(val, list) else [val]


def _parse_signals(
    raw: dict[str, Any], exit_codes: list[int], source: str, rid: str
) -> tuple[frozenset[int], frozenset[str], frozenset[str]]:
    """The ``signals`` table: exit codes (added to ``exit_codes``), signal names, stages."""
    sig = raw.get("signals", {})
    if not isinstance(sig, dict) or set(sig) - _SIGNAL_KEYS:
        raise _fail(source, rid, f"signals must be a table with keys from {sorted(_SIGNAL_KEYS)}")
    codes = _values(sig.get("exit_code", []))
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise _fail(source, rid, "signals.exit_code must be an integer or a list of them")
    names = _values(sig.get("signal", []))
    if not all(n in SIGNAL_NAMES for n in names):
        raise _fail(source, rid, f"signals.signal must be among {sorted(SIGNAL_NAMES)}")
    stages = _values(sig.get("stage", []))
    if not all(s in STAGES for s in stages):
        raise _fail(source, rid, f"signals.stage must be among {list(STAGES)}")
    return frozenset(exit_codes) | frozenset(codes), frozenset(names), frozenset(stages)


def parse_rule(raw: dict[str, Any], source: str) -> Rule:
    """Build one rule from its TOML table, checking everything except its examples."""
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid:
        raise _fail(source, None, f"a rule without an id: {sorted(raw)}")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise _fail(source, rid, f"unknown keys {sorted(unknown)}")
    category = raw.get("category")
    if category not in CATEGORIES:
        raise _fail(source, rid, f"category must be one of {sorted(CATEGORIES)}, not {category!r}")
    budget = raw.get("budget", "system" if category in ("preempted", "runner_system") else "user")
    if budget not in BUDGETS:
        raise _fail(source, rid, f"budget must be one of {sorted(BUDGETS)}, not {budget!r}")
    retryable = raw.get("retryable", RETRYABLE_BY_CATEGORY[category])
    if not isinstance(retryable, bool):
        raise _fail(source, rid, "retryable must be true or false")
    action = raw.get("action", "retry_job" if retryable else "none")
    if action not in ACTIONS:
        raise _fail(source, rid, f"action must be one of {sorted(ACTIONS)}, not {action!r}")
    if retryable and action == "none":
        raise _fail(source, rid, "a retryable rule needs an action other than 'none'")
    if not retryable and action != "none":
        raise _fail(source, rid, f"a rule that is not retryable cannot recommend {action!r}")
    priority = raw.get("priority", 0)
    confidence = raw.get("confidence", 0.8)
    if not isinstance(priority, int):
        raise _fail(source, rid, "priority must be an integer")
    if not isinstance(confidence, int | float) or not 0.0 <= confidence <= 1.0:
        raise _fail(source, rid, "confidence must be a number between 0 and 1")
    exit_codes_raw = raw.get("exit_codes", [])
    if not isinstance(exit_codes_raw, list) or not all(isinstance(c, int) for c in exit_codes_raw):
        raise _fail(source, rid, "exit_codes must be a list of integers")

    log_re = log_not_re = None
    log, log_not = raw.get("log"), raw.get("log_not")
    for key, pat in (("log", log), ("log_not", log_not)):
        if pat is not None and (not isinstance(pat, str) or not pat):
            raise _fail(source, rid, f"{key} must be a non-empty string")
    try:
        if log is not None:
            log_re = compile_linear(log)
        if log_not is not None:
            if log is None:
                raise PatternError("log_not only makes sense together with log")
            log_not_re = compile_linear(log_not)
        if log_re is not None and log_re.search("") is not None:
            raise PatternError("matches the empty line, so it would fire on every log")
    except PatternError as exc:
        raise _fail(source, rid, f"regex {exc}") from None

    scope = raw.get("scope", {})
    if not isinstance(scope, dict) or set(scope) - {"last_lines", "section", "failure"}:
        raise _fail(source, rid, "scope must be a table with last_lines, section and/or failure")
    last_lines, section = scope.get("last_lines"), scope.get("section")
    failure = scope.get("failure")
    for key, val in (("last_lines", last_lines), ("failure", failure)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
            raise _fail(source, rid, f"scope.{key} must be a positive integer")
    if section is not None and not isinstance(section, str):
        raise _fail(source, rid, "scope.section must be a string")
    if scope and log is None:
        raise _fail(source, rid, "scope only applies to log rules")

    failure_reasons = _str_list(raw, "failure_reasons", source, rid)
    pod_reasons = _str_list(raw, "pod_reasons", source, rid)
    exit_codes, signal_names, stages = _parse_signals(raw, exit_codes_raw, source, rid)
    if log is None and not (failure_reasons or exit_codes or pod_reasons or signal_names or stages):
        raise _fail(source, rid, "a rule needs at least one matcher")

    examples = raw.get("examples", {})
    if not isinstance(examples, dict) or set(examples) - {"match", "no_match"}:
        raise _fail(source, rid, "examples must be a table with match and no_match lists")
    match = [_parse_example(e, source, rid) for e in examples.get("match", [])]
    no_match = [_parse_example(e, source, rid) for e in examples.get("no_match", [])]
    if not match or not no_match:
        raise _fail(
            source, rid, "every rule needs at least one examples.match and one examples.no_match"
        )
    return Rule(
        id=rid,
        description=str(raw.get("description", "")),
        category=category,
        budget=budget,
        action=action,
        retryable=retryable,
        priority=priority,
        confidence=float(confidence),
        failure_reasons=failure_reasons,
        exit_codes=exit_codes,
        pod_reasons=pod_reasons,
        log=log,
        log_not=log_not,
        scope_last_lines=last_lines,
        scope_section=section,
        scope_failure=failure,
        signal_names=signal_names,
        stages=stages,
        examples_match=tuple(match),
        examples_no_match=tuple(no_match),
        source=source,
        _log_re=log_re,
        _log_not_re=log_not_re,
    )


def check_examples(rule: Rule) -> None:
    for ex in rule.examples_match:
        if not rule.fires_on(ex):
            raise _fail(rule.source, rule.id, f"example does not match: {_describe(ex)}")
    for ex in rule.examples_no_match:
        if rule.fires_on(ex):
            raise _fail(rule.source, rule.id, f"no_match example matches: {_describe(ex)}")


def parse_rule_text(text: str, source: str) -> tuple[list[Rule], list[str], str]:
    """Rules, ids to disable, and the file's declared version, from one TOML document."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, None, f"not valid TOML: {exc}") from None
    unknown = set(doc) - {"rule", "meta"}
    if unknown:
        raise _fail(source, None, f"unknown top-level keys {sorted(unknown)}")
    entries = doc.get("rule", [])
    if not isinstance(entries, list):
        raise _fail(source, None, "rules must be [[rule]] tables")
    rules: list[Rule] = []
    disabled: list[str] = []
    for raw in entries:
        if raw.get("disabled") is True:
            if not isinstance(raw.get("id"), str):
                raise _fail(source, None, "a disabled entry needs an id")
            disabled.append(raw["id"])
            continue
        rule = parse_rule(raw, source)
        check_examples(rule)
        if raw.get("override") is True:
            disabled.append(rule.id)
        rules.append(rule)
    meta = doc.get("meta", {})
    return rules, disabled, str(meta.get("version", ""))


DEFAULT_RULES = "default.toml"


def default_rules_text() -> str:
    return (
        importlib.resources.files("ciretry.classify")
        .joinpath("rules", DEFAULT_RULES)
        .read_text(encoding="utf-8")
    )


def load_ruleset(paths: Iterable[str | Path] = (), *, include_default: bool = True) -> RuleSet:
    """The shipped default rules (unless excluded) followed by each file in ``paths``.

    A directory contributes its ``*.toml`` files in name order. Raises RuleFileError naming
    the file and rule on any problem, including an example that disagrees with its rule.
    """
    documents: list[tuple[str, str]] = []
    if include_default:
        documents.append((f"<default>/{DEFAULT_RULES}", default_rules_text()))
    for p in paths:
        path = Path(p)
        files = sorted(path.glob("*.toml")) if path.is_dir() else [path]
        for f in files:
            try:
                documents.append((str(f), f.read_text(encoding="utf-8")))
            except OSError as exc:
                raise _fail(str(f), None, f"cannot read: {exc.strerror}") from None
    return ruleset_from_texts(documents)


def ruleset_from_texts(documents: Sequence[tuple[str, str]]) -> RuleSet:
    """Build a rule set from (source name, TOML text) pairs, in order."""
    by_id: dict[str, Rule] = {}
    digest = hashlib.sha256()
    versions: list[str] = []
    for source, text in documents:
        digest.update(source.rsplit("/", 1)[-1].encode() + b"\0" + text.encode() + b"\0")
        rules, disabled, version = parse_rule_text(text, source)
        if version:
            versions.append(version)
        for rid in disabled:
            if rid not in by_id and rid not in {r.id for r in rules}:
                raise _fail(source, rid, "overrides or disables a rule that no earlier file has")
            by_id.pop(rid, None)
        for rule in rules:
            if rule.id in by_id:
                raise _fail(
                    source, rule.id,
                    f"duplicate id (first defined in {by_id[rule.id].source}); "
                    "set override = true to replace it",
                )  # fmt: skip
            by_id[rule.id] = rule
    version = "+".join(versions + [digest.hexdigest()[:12]])
    return RuleSet(
        rules=tuple(by_id.values()),
        version=version,
        sources=tuple(s for s, _ in documents),
    )
