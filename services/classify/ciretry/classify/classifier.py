"""The pure classification step behind the service: scan the log with the rule set, fold.

The service runs it in worker threads; one ``Scanner`` serves them all (its Hyperscan scratch
space is kept per thread).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ciretry.common.events import JobFinished, PodTerminated, VerdictReached

from .engine import Scanner
from .fold import fold_verdict
from .logsource import LogFetched
from .rules import RuleSet
from .signatures import signature_for


class RuleClassifier:
    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.scanner = Scanner(ruleset)

    def classify(
        self, job: JobFinished, pods: Sequence[PodTerminated], fetched: LogFetched
    ) -> VerdictReached:
        matches = []
        facts = None
        total_lines = None
        if fetched.chunks is not None:
            scan = self.scanner.scan(fetched.chunks, first_line=fetched.first_line)
            matches = scan.matches()
            facts = scan.facts
            total_lines = scan.total_lines
        verdict = fold_verdict(
            job,
            pods,
            matches,
            self.ruleset,
            log_available=fetched.available,
            log_note=fetched.note,
            log_facts=facts,
        )
        signature = signature_for(
            verdict,
            fetched.chunks,
            first_line=fetched.first_line,
            facts=facts,
            total_lines=total_lines,
        )
        return msgspec.structs.replace(verdict, signature=signature)
