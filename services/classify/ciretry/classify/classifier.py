"""The pure classification step behind the service: scan the log with the rule set, fold.

One ``Scanner`` per thread: Hyperscan scratch space must not be shared between concurrent
scans, and the service runs scans in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ciretry.common.events import JobFinished, PodTerminated, VerdictReached

from .engine import Scanner
from .fold import fold_verdict
from .logsource import LogFetched
from .rules import RuleSet


class RuleClassifier:
    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self._local = threading.local()

    def _scanner(self) -> Scanner:
        scanner: Scanner | None = getattr(self._local, "scanner", None)
        if scanner is None:
            scanner = Scanner(self.ruleset)
            self._local.scanner = scanner
        return scanner

    def classify(
        self, job: JobFinished, pods: Sequence[PodTerminated], fetched: LogFetched
    ) -> VerdictReached:
        matches = []
        if fetched.data is not None:
            scan = self._scanner().scan([fetched.data], first_line=fetched.first_line)
            matches = scan.matches()
        return fold_verdict(
            job,
            pods,
            matches,
            self.ruleset,
            log_available=fetched.available,
            log_note=fetched.note,
        )
