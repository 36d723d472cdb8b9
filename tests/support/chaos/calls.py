"""The fake provider's record against the log's outcomes: the chaos run's "nothing is retried
twice", counted so that no call can drop out of the count.

Every retry the fake provider carried out (a job retried, a pipeline created: a POST it answered
201 outside an injected outage) is put to the request it was made for: a job's retry to the
request for that job (one decision per job), a created pipeline to the request whose key is in
its ``CIRETRY_RETRY_OF`` variable. A call no request accounts for is counted as such, never left
out. Then:

* no request was called more than once, and no job more often than its limit;
* every RetryIssued has exactly one call behind it, and every call its RetryIssued.

A RetryIssued with ``found_existing`` means act made the call and then could not record it
itself: the next holder found it at the provider. That needs a reason near the call: the caller
was killed or paused, its database went away (a claim and an append both die with it), or its
call got no answer (act logged a timeout or a dropped connection for the request) after the
provider had acted. The call is timed when the fake provider read it, which can be after a fault
began: a POST sent just before a SIGKILL is read by the harness's loop after it (later still
when the machine is loaded), and a holder's call goes on while PostgreSQL is down. A fault
therefore explains a call made up to ``grace`` seconds before it began and until ``slack``
seconds after it ended. An unexplained one is no double call (those are counted above) but act
losing an outcome for no reason, and fails the run too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Words of act's log lines when a provider call got no answer (``TransportError``).
NO_ANSWER = re.compile(r"no answer|Timeout|Disconnected|ClientOSError|ConnectionReset")


@dataclass
class ProviderCall:
    t: float
    method: str
    path: str
    status: int  # 0: connection dropped
    injected: bool
    key: str | None = None  # CIRETRY_RETRY_OF of a pipeline creation


@dataclass(frozen=True)
class Disruption:
    """A time act may have lost what it was doing: ``killed`` (SIGKILL, until restarted),
    ``database`` (PostgreSQL stopped, until started again), ``paused`` (SIGSTOP, until
    PostgreSQL is back in the outage phase). Times are the harness's ``time.monotonic``."""

    kind: str
    start: float
    end: float


@dataclass
class CallAccount:
    #: Successful retry calls per request key.
    calls: Counter[str] = field(default_factory=Counter)
    #: Successful retry calls no request accounts for (described).
    unattributed: list[str] = field(default_factory=list)
    #: Keys called more than once; jobs called more often than their limit.
    double: list[str] = field(default_factory=list)
    over_limit: list[int] = field(default_factory=list)
    #: RetryIssued keys without exactly one call behind them; called keys without RetryIssued.
    issued_not_called_once: list[str] = field(default_factory=list)
    called_not_issued: list[str] = field(default_factory=list)
    #: Each RetryIssued(found_existing) by key: what explains it (``unexplained`` when nothing),
    #: and when its call was read relative to the start of the fault that explains it (s).
    found: dict[str, str] = field(default_factory=dict)
    found_offset: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.calls.values()) + len(self.unattributed)

    @property
    def unexplained(self) -> list[str]:
        return [k for k, why in self.found.items() if why == "unexplained"]

    @property
    def never_twice(self) -> bool:
        return not self.double and not self.over_limit and not self.unattributed

    @property
    def one_call_per_issued(self) -> bool:
        return (
            not self.issued_not_called_once
            and not self.called_not_issued
            and not self.unattributed
            and not self.unexplained
        )

    def explanations(self) -> dict[str, int]:
        return dict(sorted(Counter(self.found.values()).items()))


def timed_out_keys(log_lines: Iterable[str], keys: Iterable[str]) -> set[str]:
    """The request keys for which act logged a provider call that got no answer."""
    wanted = set(keys)
    out: set[str] = set()
    for line in log_lines:
        if "act:" not in line and "again in" not in line:
            continue
        if not NO_ANSWER.search(line):
            continue
        out.update(k for k in wanted if k in line)
    return out


def account_calls(
    record: Sequence[ProviderCall],
    requested: Sequence[Mapping[str, Any]],
    issued: Sequence[Mapping[str, Any]],
    *,
    job_limit: int,
    disruptions: Sequence[Disruption] = (),
    timed_out: set[str] | frozenset[str] = frozenset(),
    grace: float = 30.0,
    slack: float = 5.0,
) -> CallAccount:
    """Put every successful retry call of ``record`` to its request and check it against the
    RetryRequested (``requested``) and RetryIssued (``issued``) bodies (module doc)."""
    acc = CallAccount()
    key_by_job = {int(r["job_id"]): str(r["idempotency_key"]) for r in requested}
    job_by_key = {k: j for j, k in key_by_job.items()}
    first_call: dict[str, float] = {}
    for c in record:
        if c.injected or c.method != "POST" or c.status not in (200, 201):
            continue
        key: str | None
        if c.path.endswith("/retry"):
            job = c.path.rsplit("/", 2)[-2]
            key = key_by_job.get(int(job)) if job.isdigit() else None
        elif c.path.endswith("/pipeline"):
            key = c.key if c.key in job_by_key else None
        else:
            continue  # not a retry (a note, a status)
        if key is None:
            acc.unattributed.append(f"{c.method} {c.path} key={c.key} at {c.t:.1f}")
            continue
        acc.calls[key] += 1
        first_call.setdefault(key, c.t)
    acc.double = sorted(k for k, n in acc.calls.items() if n > 1)
    requests_per_job = Counter(int(r["job_id"]) for r in requested)
    per_job: Counter[int] = Counter()
    for key, n in acc.calls.items():
        per_job[job_by_key[key]] += n
    acc.over_limit = sorted(
        j for j, n in per_job.items() if n > min(job_limit, requests_per_job.get(j, 0))
    )
    issued_keys = Counter(str(i["idempotency_key"]) for i in issued)
    acc.issued_not_called_once = sorted(
        k for k, n in issued_keys.items() if n != 1 or acc.calls.get(k, 0) != 1
    )
    acc.called_not_issued = sorted(k for k in acc.calls if k not in issued_keys)
    for i in issued:
        if not i.get("found_existing"):
            continue
        key = str(i["idempotency_key"])
        t = first_call.get(key)
        fault = next(
            (d for d in disruptions if t is not None and d.start - grace <= t <= d.end + slack),
            None,
        )
        if fault is not None and t is not None:
            acc.found[key] = fault.kind
            acc.found_offset[key] = round(t - fault.start, 3)
        elif t is not None and key in timed_out:
            acc.found[key] = "no answer"
        else:  # nothing near it, or nothing was called at all (someone else's retry found)
            acc.found[key] = "unexplained"
    return acc


__all__ = [
    "CallAccount",
    "Disruption",
    "ProviderCall",
    "account_calls",
    "timed_out_keys",
]
