"""Retry policy: versioned TOML, parsed into frozen structs; scopes by project/ref pattern.

The shipped default lives beside this module (``default.toml``) and is read with
importlib.resources, so it travels inside the wheel. A scope's tables are merged over
``[default]`` key by key before validation: a scope says only what differs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from ciretry.common.events import BudgetClass, Category
from ciretry.common.learning import LearningError, learning_settings

SUPPORTED_VERSIONS = (1,)
_T = TypeVar("_T")


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and the key."""


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class AttemptLimits(_Base, frozen=True, kw_only=True):
    system: int = 3
    user: int = 0
    #: Retries of a failure made retryable by what was learned from outcomes (issue 15).
    learned: int = 1
    #: When set, every automatic retry of a job counts against this one limit.
    combined: int | None = None

    def limit_for(self, budget: BudgetClass) -> int:
        if self.combined is not None:
            return self.combined
        if budget == "learned":
            return self.learned
        return self.system if budget == "system" else self.user


class PipelineBudget(_Base, frozen=True, kw_only=True):
    floor: int = 3
    percent: float = 5.0

    def limit(self, jobs: int) -> int:
        return max(self.floor, int(self.percent * jobs / 100.0))


class MostlyBroken(_Base, frozen=True, kw_only=True):
    #: More than this many deterministic failures: the pipeline is broken.
    count: int | None = 5
    #: More than this fraction of the pipeline's jobs failed deterministically: broken.
    fraction: float | None = 0.5

    def broken(self, deterministic: int, jobs: int) -> bool:
        if self.count is not None and deterministic > self.count:
            return True
        return bool(self.fraction is not None and jobs > 0 and deterministic / jobs > self.fraction)


class Backoff(_Base, frozen=True, kw_only=True):
    base_s: float = 0.0
    factor: float = 2.0
    cap_s: float = 600.0
    #: Fraction of the delay randomized either way (0.2: ±20%).
    jitter: float = 0.2

    def delay(self, retries_before: int, unit: float) -> float:
        """Delay before retry number ``retries_before + 1``; ``unit`` in [0, 1) picks the jitter
        (the caller derives it from the idempotency key, so a replay finds the same time)."""
        if self.base_s <= 0:
            return 0.0
        raw = min(self.cap_s, self.base_s * self.factor**retries_before)
        return max(0.0, raw * (1.0 + self.jitter * (2.0 * unit - 1.0)))


class ResourceScaling(_Base, frozen=True, kw_only=True):
    memory_factor: float = 2.0
    memory_cap_mb: int = 16384
    base_memory_mb: int = 4096
    cpu_factor: float = 1.0
    cpu_cap_millis: int = 8000
    base_cpu_millis: int = 1000


class OptOut(_Base, frozen=True, kw_only=True):
    users: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    markers: tuple[str, ...] = ("[no-retry]",)
    labels: tuple[str, ...] = ()


class OptIn(_Base, frozen=True, kw_only=True):
    markers: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()


class Settings(_Base, frozen=True, kw_only=True):
    """What a scope decides. Every field has a default, so an empty [default] is valid."""

    dry_run: bool = False
    enabled: bool = True
    #: A GitLab rerun that needs a new pipeline runs on the tip of the branch. When the branch
    #: has moved past the failed commit, the newer commit's pipeline runs the job anyway: by
    #: default such a rerun is skipped (``superseded``); true recreates it on the tip regardless.
    recreate_on_moved_ref: bool = False
    #: Where act explains its decisions (``act.explain``): ``off``; ``status`` (a GitLab commit
    #: status / GitHub check run); ``note`` (that, plus one MR note / PR comment edited in
    #: place). Off whatever it says for a scope that is not ``enabled``.
    explain: Literal["off", "status", "note"] = "off"
    #: Least seconds between two edits of one note or status (a busy pipeline is one edit
    #: per interval, the last state always posted).
    explain_interval_s: float = 10.0
    #: A chain whose last decision is older than this is not explained (seconds): switching
    #: ``explain`` on in a running deployment does not write on old merge requests.
    explain_max_age_s: float = 86400.0
    ignored_users: tuple[str, ...] = ()
    attempts: AttemptLimits = AttemptLimits()
    pipeline: PipelineBudget = PipelineBudget()
    mostly_broken: MostlyBroken = MostlyBroken()
    backoff: dict[str, Backoff] = msgspec.field(default_factory=dict)
    resources: ResourceScaling = ResourceScaling()
    opt_out: OptOut = OptOut()
    opt_in: OptIn = OptIn()

    def backoff_for(self, category: Category) -> Backoff:
        return self.backoff.get(category) or self.backoff.get("default") or Backoff()


StormMode = Literal["off", "watch", "park"]


class StormSettings(_Base, frozen=True, kw_only=True):
    """The ``[storm]`` table: the retry-storm breaker (``act.storms``). One failure signature in
    at least ``pipelines`` distinct pipelines within ``window_s`` seconds is a storm; it ends
    when the signature has not appeared for ``quiet_s`` seconds; the jobs parked meanwhile are
    then decided again, spread over ``jitter_s`` seconds."""

    #: ``off``; ``watch`` (storms are recorded, retries go on as usual); ``park`` (retries of
    #: a storm's signature wait, without spending budget, until it ends).
    mode: StormMode = "off"
    pipelines: int = 10
    window_s: float = 300.0
    quiet_s: float = 300.0
    jitter_s: float = 120.0

    @property
    def parks(self) -> bool:
        return self.mode == "park"


def _storm_settings(raw: Any, origin: str) -> StormSettings:
    if raw is None:
        return StormSettings()
    if not isinstance(raw, dict):
        raise PolicyError(f"{origin}: storm: expected a table")
    settings = _convert(raw, StormSettings, "storm", origin)
    if settings.pipelines < 2:
        raise PolicyError(f"{origin}: storm.pipelines: must be at least 2")
    for name in ("window_s", "quiet_s", "jitter_s"):
        if getattr(settings, name) < 0:
            raise PolicyError(f"{origin}: storm.{name}: must not be negative")
    return settings


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    projects: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    settings: Settings = Settings()

    def matches(self, project: str, ref: str | None) -> bool:
        if self.projects and not any(fnmatchcase(project, p) for p in self.projects):
            return False
        if self.refs and (ref is None or not any(fnmatchcase(ref, p) for p in self.refs)):
            return False
        return True


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    name: str
    scopes: tuple[Scope, ...]
    default: Scope
    #: The retry-storm breaker: deployment-wide (a storm crosses projects), not per scope.
    storm: StormSettings = StormSettings()

    def scope_for(self, project: str, ref: str | None) -> Scope:
        for scope in self.scopes:
            if scope.matches(project, ref):
                return scope
        return self.default

    @property
    def explains(self) -> bool:
        """Some scope posts explanations (``explain`` other than ``off`` in an enabled scope)."""
        return any(
            s.settings.enabled and s.settings.explain != "off" for s in (self.default, *self.scopes)
        )

    @property
    def ident(self) -> str:
        """Recorded on every decision, so "which policy said so" has an answer."""
        return f"{self.name}@{self.version}"


_SCOPE_KEYS = {"name", "projects", "refs"}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _settings(raw: Mapping[str, Any], where: str, origin: str) -> Settings:
    return _convert(raw, Settings, where, origin)


def _convert(raw: Mapping[str, Any], kind: type[_T], where: str, origin: str) -> _T:
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.attempts.system`": name the key the way the file spells it.
        msg = str(exc)
        head, sep, tail = msg.partition(" - at `$")
        key = tail.rstrip("`").lstrip(".") if sep else ""
        raise PolicyError(f"{origin}: {where}{'.' + key if key else ''}: {head}") from None


def _patterns(raw: Any, where: str, origin: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise PolicyError(f"{origin}: {where}: expected a list of patterns")
    return tuple(raw)


def parse_policy(text: str, origin: str = "<policy>") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{origin}: not valid TOML: {exc}") from None
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PolicyError(f"{origin}: version: required integer key (supported: 1)")
    if version not in SUPPORTED_VERSIONS:
        raise PolicyError(f"{origin}: version: {version} not supported (supported: 1)")
    unknown = set(doc) - {"version", "name", "default", "scopes", "learning", "storm"}
    if unknown:
        raise PolicyError(f"{origin}: {sorted(unknown)[0]}: unknown top-level key")
    try:  # read by classify's learner; checked here too, so a bad table stops act as well
        learning_settings(doc, origin)
    except LearningError as exc:
        raise PolicyError(str(exc)) from None
    name = doc.get("name", "policy")
    if not isinstance(name, str):
        raise PolicyError(f"{origin}: name: expected a string")
    base = doc.get("default", {})
    if not isinstance(base, dict):
        raise PolicyError(f"{origin}: default: expected a table")
    default = Scope(name="default", settings=_settings(base, "default", origin))
    raw_scopes = doc.get("scopes", [])
    if not isinstance(raw_scopes, list):
        raise PolicyError(f"{origin}: scopes: expected an array of tables ([[scopes]])")
    scopes: list[Scope] = []
    for i, raw in enumerate(raw_scopes):
        if not isinstance(raw, dict):
            raise PolicyError(f"{origin}: scopes[{i}]: expected a table")
        label = f"scopes[{i}]"
        scope_name = raw.get("name", label)
        if not isinstance(scope_name, str):
            raise PolicyError(f"{origin}: {label}.name: expected a string")
        where = f"scopes[{i}] ({scope_name})"
        over = {k: v for k, v in raw.items() if k not in _SCOPE_KEYS}
        scopes.append(
            Scope(
                name=scope_name,
                projects=_patterns(raw.get("projects"), f"{where}.projects", origin),
                refs=_patterns(raw.get("refs"), f"{where}.refs", origin),
                settings=_settings(_merge(base, over), where, origin),
            )
        )
    return Policy(
        version=version,
        name=name,
        scopes=tuple(scopes),
        default=default,
        storm=_storm_settings(doc.get("storm"), origin),
    )


def default_policy_text() -> str:
    return resources.files(__name__).joinpath("default.toml").read_text(encoding="utf-8")


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy at ``path``, or the shipped default when ``path`` is empty. Reloaded on
    restart (services build it once at start)."""
    if not path:
        return parse_policy(default_policy_text(), "default.toml")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_policy(text, str(p))


__all__ = [
    "AttemptLimits",
    "Backoff",
    "MostlyBroken",
    "OptIn",
    "OptOut",
    "PipelineBudget",
    "Policy",
    "PolicyError",
    "ResourceScaling",
    "Scope",
    "Settings",
    "StormMode",
    "StormSettings",
    "default_policy_text",
    "load_policy",
    "parse_policy",
]
