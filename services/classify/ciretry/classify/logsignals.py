"""Typed signals read from the log itself: the exit status the runner reports, and the stage
the job died in.

A webhook does not always carry an exit code, and a Kubernetes event is not always at hand;
but every CI system prints its own verdict at the end of a job, each in its own words::

    ##[error]Process completed with exit code 137.          GitHub Actions
    ERROR: Job failed: exit code 137                         GitLab
    Exited with code exit status 137                         CircleCI
    The command "mvn test" exited with 137.                  Travis CI
    ERROR: script returned exit code 137                     Jenkins
    Exited with status -1 (agent lost)                       Buildkite
    Unsuccessful task run with exit code: 137 ...            Taskcluster

and marks where it is: GitLab's ``section_start:...:get_sources`` markers and stage headers
("Getting source from Git repository"), Travis folds (``git.checkout``), GitHub's
``##[group]Run actions/checkout@v4``, Jenkins' SCM lines ("Cloning the remote Git
repository"). ``SIGNAL_PATTERNS`` are those phrasings; the engine scans for them in the same
pass as the rules (they cost no extra pass over the log) and ``LogFacts.from_hits`` folds the
hits into typed facts:

* ``exit_code``: the status of the step or job that failed, as the runner reported it (its
  own report wins over a tool's, e.g. yarn's "Command failed with exit code 137");
* ``signal``: ``KILL`` when the shell reported a process ``Killed`` next to the failure or
  the status is 137 (128 + 9), likewise ``TERM``, ``SEGV``, ``ABRT``;
* ``stage``: ``setup`` (the runner prepares the machine), ``fetch`` (sources, caches and
  artifacts come in), ``script`` (the job's own commands), ``upload`` (artifacts and caches go
  out): the last stage entered at or before the failure report. Stages that only run because
  the job already failed (``after_script``, "Uploading artifacts for failed job", cleanup)
  never count as where it died;
* ``failure_line``: the line of that failure report, which ``scope = { failure = N }`` rules
  measure from ("where the job died");
* ``outcome``: ``passed`` when the log's last verdict is a success (a rule scoped to the
  failure never fires on such a log), ``failed`` when it is a failure, else unknown.

Everything here is pure and line-oriented: the same code judges a rule's examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import re2

Stage = Literal["setup", "fetch", "script", "upload"]
STAGES: Final = ("setup", "fetch", "script", "upload")
#: A stage that runs because the job already failed (or always at the very end): never the
#: stage a job died in.
POST = "post"

#: How many lines before the failure report a "Killed" notice still explains it.
KILL_NOTICE_WINDOW: Final = 60
#: Lines after the failure report still counted as the failure (CircleCI prints "CircleCI
#: received exit code 137" after "Exited with code exit status 137").
AFTER_FAILURE_LINES: Final = 2

# Signal pattern kinds.
EXIT = "exit"  # the runner's own report of a step's or job's status (group 1: the code)
BUILD_EXIT = "build_exit"  # a build-level summary (Travis "Your build exited with N")
TOOL_EXIT = "tool_exit"  # a tool's report of a child's status (yarn, lerna, make, git action)
FAILED = "failed"  # the runner says the job failed, without a code
PASSED = "passed"  # the runner says the job succeeded
KILLED = "killed"  # the shell or a tool says a process was killed by SIGKILL
#: A command echoed by the runner (``$ make``) outside any runner-owned section: the job's own
#: script is running (Travis does not fold its script phase).
COMMAND = "command"
STAGE_PREFIX = "stage:"

#: (kind, RE2 pattern on one cleaned line). Order does not matter; each is checked on its own.
SIGNAL_PATTERNS: Final[tuple[tuple[str, str], ...]] = (
    # --- runner reports of a step's or job's exit status ---
    (EXIT, r"^(?:##\[error\]|Error: )?Process completed with exit code (-?\d+)\.?$"),
    (EXIT, r"^ERROR: Job failed: (?:command terminated with )?exit (?:code|status) (-?\d+)"),
    (EXIT, r"^Exited with code (?:exit status )?(-?\d+)"),
    (EXIT, r"^CircleCI received exit code (-?\d+)"),
    (EXIT, r'^The command ".*" (?:failed and )?exited with (-?\d+)(?: during [\w .]*)?\.$'),
    (EXIT, r"^(?:ERROR: )?script returned exit code (-?\d+)$"),
    (EXIT, r"^(?:\S+ )?(?:Error: The command exited|Exited) with status (-?\d+)"),
    (EXIT, r"(?:^|\] )(?:Unsuccessful|Successful) task run with exit code: (-?\d+)"),
    (EXIT, r"^(?:\[taskcluster(?::error)?\] )?Exit [Cc]ode: (-?\d+)$"),
    (BUILD_EXIT, r"^Done\. Your build exited with (-?\d+)\.$"),
    # --- the runner's verdict without a code ---
    (FAILED, r"^Finished: (?:FAILURE|ABORTED)$"),
    (FAILED, r"^Build step '[^']+' marked build as failure$"),
    (FAILED, r"^ERROR: Job failed(?: \(system failure\))?: (?:[^e]|e[^x])"),
    (FAILED, r"Job failed: Failed: "),
    (PASSED, r"^Job succeeded$"),
    (PASSED, r"^Finished: SUCCESS$"),
    # --- tools reporting a child's status (weaker than the runner's own report) ---
    (TOOL_EXIT, r"^(?:\S+: )?error Command failed with exit code (-?\d+)\.$"),
    (TOOL_EXIT, r"^lerna ERR! .* exited (-?\d+) in "),
    (TOOL_EXIT, r"^ERROR: Last command exited with (-?\d+)$"),
    (TOOL_EXIT, r"Process exited \(exit code (-?\d+)\)"),
    (TOOL_EXIT, r"^(?:\S+ )?make(?:\[\d+\])?: \*\*\* \[[^\]]*\] Error (\d+)$"),
    (TOOL_EXIT, r"The process '[^']+' failed with exit code (-?\d+)$"),
    (TOOL_EXIT, r"failed with exit status (-?\d+)$"),
    # --- a process killed by SIGKILL (the OOM killer, in CI) ---
    (KILLED, r"^(?:\S+: )?line \d+: +\d+ Killed +\S"),
    (KILLED, r"^(?:\S+: |\[[^\]]+\]: )?Killed$"),
    (KILLED, r"^(?:\S+ )?make(?:\[\d+\])?: \*\*\* \[[^\]]*\] Killed$"),
    (KILLED, r"failed due to signal 9 \(Killed\)"),
    # --- stage headers printed by the runner ---
    (STAGE_PREFIX + "setup", r'^Preparing the "[\w+-]+" executor'),
    (STAGE_PREFIX + "setup", r"^Preparing environment$"),
    (STAGE_PREFIX + "setup", r"^Job is about to start running on the (?:hosted )?runner"),
    (STAGE_PREFIX + "setup", r"^Building (?:remotely )?on \S+.* in workspace "),
    (STAGE_PREFIX + "fetch", r"^Getting source from Git repository$"),
    (STAGE_PREFIX + "fetch", r"^(?:Restoring cache|Downloading artifacts)$"),
    (
        STAGE_PREFIX + "fetch",
        r"^(?:Cloning the remote Git repository|Fetching upstream changes from )",
    ),
    (STAGE_PREFIX + "script", r'^Executing "\w+" stage of the job script$'),
    (STAGE_PREFIX + "script", r"^\[[^\]]+\] \$ /bin/(?:ba)?sh "),
    (COMMAND, r"^\$ \S"),
    (STAGE_PREFIX + "script", r"^=== Task Starting ===$"),
    (STAGE_PREFIX + "upload", r"^(?:Saving cache|Uploading artifacts) for successful job$"),
    (STAGE_PREFIX + "upload", r"^(?:Recording test results|Archiving artifacts)$"),
    (STAGE_PREFIX + POST, r"^(?:Saving cache|Uploading artifacts) for failed job$"),
    (STAGE_PREFIX + POST, r"^Running after.script$"),
    (STAGE_PREFIX + POST, r"^Cleaning up (?:project directory and )?file based variables$"),
    (STAGE_PREFIX + POST, r"^=== Task Finished ===$"),
)

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False
_COMPILED: Final = tuple((kind, re2.compile(p, _OPTIONS)) for kind, p in SIGNAL_PATTERNS)

# --- sections (GitLab sections, Travis folds, GitHub groups) to stages ---

_GITLAB_SECTIONS: Final[dict[str, str]] = {
    "prepare_executor": "setup", "prepare_script": "setup", "resolve_secrets": "setup",
    "get_sources": "fetch", "restore_cache": "fetch", "download_artifacts": "fetch",
    "after_script": POST, "archive_cache": "upload", "archive_cache_on_failure": POST,
    "upload_artifacts_on_success": "upload", "upload_artifacts_on_failure": POST,
    "cleanup_file_variables": POST,
    # Travis folds
    "git.checkout": "fetch", "git.submodule": "fetch", "git.submodules": "fetch", "cache.1": "fetch",
    "worker_info": "setup", "system_info": "setup", "services": "setup", "apt": "setup",
    "before_install": "script", "install": "script", "before_script": "script", "script": "script",
    "after_failure": POST, "after_success": POST, "cache.2": "upload",
    "deploy": "upload",
}  # fmt: skip
#: GitHub Actions groups of the "Set up job" phase.
_GHA_SETUP_GROUPS: Final = frozenset(
    {"Operating System", "Runner Image", "Runner Image Provisioner", "Virtual Environment",
     "VM Image", "GITHUB_TOKEN Permissions", "Secret source"}
)  # fmt: skip


def section_stage(name: str) -> str | None:
    """The stage a section, fold or group stands for, or None (a user group: no stage)."""
    if name in _GITLAB_SECTIONS:
        return _GITLAB_SECTIONS[name]
    if name.startswith(("step_", "build_script", "user_script")):
        return "script"
    base = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
    if base in _GITLAB_SECTIONS and base not in ("cache",):
        return _GITLAB_SECTIONS[base]
    if name.startswith("Run actions/checkout@") or name.startswith("Run actions/cache@"):
        return "fetch"
    if name.startswith(("Run actions/upload-artifact@", "Run actions/deploy-pages@")):
        return "upload"
    if name.startswith(("Post ", "Post job cleanup")):
        return POST
    if name.startswith("Run "):
        return "script"
    if name in _GHA_SETUP_GROUPS:
        return "setup"
    return None


def stack_stage(stack: Sequence[str]) -> str | None:
    """The stage of the innermost enclosing section that has one."""
    for name in reversed(stack):
        stage = section_stage(name)
        if stage is not None:
            return stage
    return None


@dataclass(frozen=True, slots=True)
class SignalHit:
    """One line that matched a signal pattern (or a section change, kind ``stage:*``)."""

    line: int
    kind: str
    code: int | None = None


def line_signals(text: str) -> list[tuple[str, int | None]]:
    """The signal kinds (and codes) one cleaned line carries."""
    out: list[tuple[str, int | None]] = []
    for kind, rx in _COMPILED:
        m = rx.search(text)
        if m is not None:
            code = None
            if m.groups() and m.group(1) is not None:
                try:
                    code = int(m.group(1))
                except ValueError:  # pragma: no cover - the patterns only capture digits
                    code = None
            out.append((kind, code))
    return out


_SIGNALS_BY_STATUS: Final = {137: "KILL", 143: "TERM", 139: "SEGV", 134: "ABRT", 130: "INT"}


@dataclass(frozen=True, slots=True)
class LogFacts:
    """What the log says about how the job ended (see the module docstring)."""

    exit_code: int | None = None
    signal: str | None = None
    stage: str | None = None
    failure_line: int | None = None
    outcome: str | None = None  # "passed" | "failed" | None

    @staticmethod
    def from_hits(hits: Iterable[SignalHit], total_lines: int) -> LogFacts:
        ordered = sorted(hits, key=lambda h: h.line)
        # The runner's verdict: the last step/job report, a build summary only if there is none.
        verdicts = [h for h in ordered if h.kind in (EXIT, FAILED, PASSED)]
        build = [h for h in ordered if h.kind == BUILD_EXIT]
        outcome: str | None = None
        failure: SignalHit | None = None
        last = verdicts[-1] if verdicts else (build[-1] if build else None)
        if last is not None:
            passed = last.kind == PASSED or (last.kind in (EXIT, BUILD_EXIT) and last.code == 0)
            if build and build[-1].line >= last.line:
                passed = build[-1].code == 0
            outcome = "passed" if passed else "failed"
        if outcome == "failed":
            failing = [h for h in verdicts if h.kind != PASSED and h.code != 0]
            # The first report of the final failure run: "Exited with code 137" comes before
            # "CircleCI received exit code 137"; a runner's code beats a code-less verdict.
            if failing:
                end = failing[-1].line
                block = [h for h in failing if end - h.line <= KILL_NOTICE_WINDOW]
                coded = [h for h in block if h.code is not None]
                failure = coded[-1] if coded else block[-1]
                failure = next((h for h in block if h.code == failure.code), failure)
            elif build:
                failure = build[-1]
        exit_code = failure.code if failure is not None else None
        anchor = failure.line if failure is not None else total_lines
        near = [h for h in ordered if anchor - KILL_NOTICE_WINDOW <= h.line <= anchor + 1]
        if exit_code is None or exit_code == 1:
            # A tool's code is better than none, and more telling than a wrapper's 1.
            tools = [h for h in near if h.kind == TOOL_EXIT and h.code not in (None, 0, 1)]
            if tools and outcome != "passed":
                exit_code = tools[-1].code
        signal = _SIGNALS_BY_STATUS.get(exit_code) if exit_code is not None else None
        if signal is None and outcome != "passed" and any(h.kind == KILLED for h in near):
            signal = "KILL"
        stage = None
        for h in ordered:
            if h.line > anchor:
                break
            if h.kind == COMMAND:
                stage = "script"
            elif h.kind.startswith(STAGE_PREFIX):
                s = h.kind[len(STAGE_PREFIX) :]
                if s != POST:
                    stage = s
        return LogFacts(
            exit_code=exit_code,
            signal=signal,
            stage=stage,
            failure_line=failure.line if failure is not None else None,
            outcome=outcome,
        )

    def in_failure_window(self, line: int, lines: int, total_lines: int) -> bool:
        """Is ``line`` within ``lines`` lines before where the job died (its failure report,
        else the end of the log)? Never on a log whose verdict is a pass."""
        if self.outcome == "passed":
            return False
        end = self.failure_line if self.failure_line is not None else total_lines
        return end - lines < line <= end + AFTER_FAILURE_LINES

    def as_map(self) -> dict[str, str | int]:
        """The facts known, as a verdict's signals show them (``log_`` keys)."""
        known = {
            "log_exit_code": self.exit_code,
            "log_signal": self.signal,
            "log_stage": self.stage,
            "log_outcome": self.outcome,
        }
        return {k: v for k, v in known.items() if v is not None}


def facts_of_lines(lines: Iterable[tuple[int, str, tuple[str, ...]]]) -> tuple[LogFacts, int]:
    """Facts of a log given as (number, cleaned text, sections) lines, and its line count.
    The slow, simple path (rule examples, tests); the engine finds the same hits in its scan."""
    hits: list[SignalHit] = []
    total = 0
    prev_stage: str | None = None
    for number, text, sections in lines:
        total = number
        stage = stack_stage(sections)
        if stage is not None and stage != prev_stage:
            hits.append(SignalHit(number, STAGE_PREFIX + stage))
        prev_stage = stage
        for kind, code in line_signals(text):
            if kind == COMMAND and stage is not None:
                continue  # a command inside a runner-owned section (Travis git.checkout)
            hits.append(SignalHit(number, kind, code))
    return LogFacts.from_hits(hits, total), total
