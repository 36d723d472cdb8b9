"""The retry-storm fold (``act.storms``), pure: thresholds, the sliding window, the quiet end,
re-opening, several signatures, parks and their release, the replay check; and ``decide``'s
part (a park spends nothing; a release is spread over the jitter)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import msgspec

from ciretry.act.budget import BudgetState, decide
from ciretry.act.policy import StormSettings, parse_policy
from ciretry.act.storms import StormWatch, storm_id, verify_storms
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    FailureSignature,
    Metadata,
    NewEvent,
    RecordedEvent,
    RetryParked,
    RetryRequested,
    StormEnded,
    StormStarted,
    VerdictReached,
)

from .helpers import NOW, job, verdict

SETTINGS = StormSettings(mode="park", pipelines=3, window_s=60.0, quiet_s=120.0, jitter_s=30.0)
SIG = "sig-v1:registry"


def sig(ident: str = SIG) -> FailureSignature:
    return FailureSignature(id=ident, algorithm="sig-v1", text="pull <n> 503",
                            examples=("pull 42 503",))  # fmt: skip


def failed(pipeline: int, job_id: int | None = None, ident: str = SIG, **kw: Any) -> VerdictReached:
    return verdict(job_id or pipeline * 10, "build", kw.pop("category", "infra_network"),
                   pipeline_id=str(pipeline), signature=sig(ident), **kw)  # fmt: skip


class Log:
    """A log in memory for the pure fold: events with positions and times, in order."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []
        self.keys: set[str] = set()

    def add(self, data: Event, at: float, key: str | None = None) -> RecordedEvent | None:
        if key is not None and key in self.keys:
            return None  # the log's idempotency: stored once
        if key is not None:
            self.keys.add(key)
        rec = RecordedEvent(event_id=uuid.uuid4(), stream="s", stream_version=1,
                            position=len(self.events) + 1,
                            recorded_at=NOW + dt.timedelta(seconds=at), data=data,
                            metadata=Metadata(idempotency_key=key))  # fmt: skip
        self.events.append(rec)
        return rec

    def store(self, proposals: list[NewEvent], at: float) -> list[RecordedEvent]:
        out = []
        for p in proposals:
            rec = self.add(p.data, at, p.metadata.idempotency_key)
            if rec is not None:
                out.append(rec)
        return out


def fold_new(watch: StormWatch, log: Log) -> list[NewEvent]:
    out: list[NewEvent] = []
    for e in log.events:
        if e.position > watch.position:
            out += watch.fold(e)
    return out


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def opened(watch: StormWatch, log: Log, pipelines: list[int], t: float = 0.0) -> StormStarted:
    """Verdicts of ``pipelines`` at ``t``; the storm proposed, stored and read back."""
    for p in pipelines:
        log.add(failed(p), t)
    proposals = fold_new(watch, log)
    assert proposals, "no storm proposed"
    log.store(proposals[:1], t)
    assert fold_new(watch, log) == []
    started = proposals[0].data
    assert isinstance(started, StormStarted)
    return started


def test_a_storm_opens_at_the_threshold_of_distinct_pipelines_and_not_before() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    for p in (1, 2):
        log.add(failed(p), 0)
    log.add(failed(2, job_id=99), 1)  # the same pipeline again: still two pipelines
    assert fold_new(watch, log) == []
    log.add(failed(3), 2)
    (proposal,) = fold_new(watch, log)
    started = proposal.data
    assert isinstance(started, StormStarted)
    assert proposal.metadata.idempotency_key == started.storm_id == storm_id(SIG, 1)
    assert proposal.stream == f"storm-{SIG}"
    assert started.pipeline_count == 3 and started.threshold == 3 and started.window_s == 60.0
    assert sorted(p.pipeline_id for p in started.pipelines) == ["1", "2", "3"]
    assert started.first_seen == at(0) and started.last_seen == at(2)
    assert started.category == "infra_network" and started.example == "pull 42 503"
    # Proposed is not recorded: nothing is open until the event is read back from the log.
    assert watch.open_for(failed(4)) is None and watch.open == {}


def test_the_window_slides_old_pipelines_out() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    log.add(failed(1), 0)
    log.add(failed(2), 30)
    log.add(failed(3), 61)  # pipeline 1 left the window (60 s)
    assert fold_new(watch, log) == []
    log.add(failed(4), 70)
    assert len(fold_new(watch, log)) == 1  # 2, 3, 4 within 60 s


def test_only_retryable_verdicts_with_a_signature_count() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    log.add(failed(1, category="deterministic"), 0)  # not retryable
    log.add(failed(2, action="none"), 0)
    log.add(msgspec.structs.replace(failed(3), signature=None), 0)
    log.add(failed(4), 0)
    log.add(failed(5), 0)
    assert fold_new(watch, log) == []


def test_replicas_proposing_the_same_storm_store_it_once() -> None:
    a, b, log = StormWatch(SETTINGS), StormWatch(SETTINGS), Log()
    for p in (1, 2, 3):
        log.add(failed(p), 0)
    pa, pb = fold_new(a, log), fold_new(b, log)
    assert [p.metadata.idempotency_key for p in pa] == [p.metadata.idempotency_key for p in pb]
    assert len(log.store(pa, 1)) == 1 and log.store(pb, 1) == []
    fold_new(a, log)
    fold_new(b, log)
    assert a.open_for(failed(9)) == b.open_for(failed(9)) == storm_id(SIG, 1)


def test_open_storm_collects_pipelines_then_ends_after_quiet_with_its_parks() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    started = opened(watch, log, [1, 2, 3])
    assert watch.open_for(failed(4)) == started.storm_id
    assert watch.open_for(failed(4, ident="sig-v1:other")) is None
    log.add(failed(4), 10)
    log.add(failed(5), 50)
    vid = uuid.uuid4()
    log.add(park(failed(4), vid, started.storm_id), 11)
    fold_new(watch, log)
    assert watch.releasable() == []  # the storm is still on
    assert watch.expire(at(50 + 119)) == []  # quiet for 119 s of 120
    (end,) = watch.expire(at(50 + 120))
    ended = end.data
    assert isinstance(ended, StormEnded) and end.metadata.idempotency_key == f"{started.storm_id}:ended"
    assert ended.reason == "quiet" and ended.pipeline_count == 5 and ended.parked_count == 1
    assert ended.last_seen == at(50) and ended.ended_at == at(170)
    assert [j.job_id for j in ended.parked] == ["40"]
    # Proposed only: still open, nothing to release, until it is read back.
    assert watch.open_for(failed(6)) == started.storm_id and watch.releasable() == []
    log.store([end], 170)
    fold_new(watch, log)
    assert watch.open_for(failed(6)) is None and watch.has_ended(started.storm_id)
    assert [p.verdict_event_id for p in watch.releasable()] == [vid]
    # The parked job decided again (a request with its verdict's id): nothing left to release.
    log.add(request(failed(4), vid), 171)
    fold_new(watch, log)
    assert watch.releasable() == []


def test_after_an_end_only_new_pipelines_open_the_next_storm() -> None:
    watch, log = StormWatch(msgspec.structs.replace(SETTINGS, window_s=600.0)), Log()
    first = opened(watch, log, [1, 2, 3])
    log.store(watch.expire(at(200)), 200)
    fold_new(watch, log)
    log.add(failed(4), 201)  # within 600 s of 1..3, but they belong to the storm that ended
    assert fold_new(watch, log) == []
    second = opened(watch, log, [5, 6], t=202)
    assert first.storm_id == storm_id(SIG, 1) and second.storm_id == storm_id(SIG, 2)
    assert sorted(p.pipeline_id for p in second.pipelines) == ["4", "5", "6"]


def test_signatures_storm_on_their_own() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    for p in (1, 2):
        log.add(failed(p, ident="sig-v1:a"), 0)
        log.add(failed(p, ident="sig-v1:b"), 0)
    assert fold_new(watch, log) == []
    log.add(failed(3, ident="sig-v1:b"), 1)
    (proposal,) = fold_new(watch, log)
    assert isinstance(proposal.data, StormStarted) and proposal.data.signature == "sig-v1:b"
    log.store([proposal], 1)
    fold_new(watch, log)
    assert watch.open_for(failed(7, ident="sig-v1:b")) is not None
    assert watch.open_for(failed(7, ident="sig-v1:a")) is None


def test_a_park_after_its_storm_ended_is_released_too() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    started = opened(watch, log, [1, 2, 3])
    log.store(watch.expire(at(500)), 500)
    vid = uuid.uuid4()
    log.add(park(failed(9), vid, started.storm_id), 501)  # a replica that had not read the end
    fold_new(watch, log)
    assert [p.verdict_event_id for p in watch.releasable()] == [vid]


def test_a_park_by_a_newer_storm_is_that_storms_to_release() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    first = opened(watch, log, [1, 2, 3])
    vid = uuid.uuid4()
    log.add(park(failed(9), vid, first.storm_id), 5)
    log.store(watch.expire(at(500)), 500)
    second = opened(watch, log, [4, 5, 6], t=501)
    log.add(park(failed(9), vid, second.storm_id), 502)  # decided again while the next was on
    fold_new(watch, log)
    assert watch.releasable() == []
    log.store(watch.expire(at(1000)), 1000)
    fold_new(watch, log)
    assert [(p.storm_id, p.verdict_event_id) for p in watch.releasable()] == [
        (second.storm_id, vid)
    ]


def test_watch_mode_records_storms_but_parks_nothing_and_off_ends_them_at_once() -> None:
    watch, log = StormWatch(msgspec.structs.replace(SETTINGS, mode="watch")), Log()
    started = opened(watch, log, [1, 2, 3])
    assert started.mode == "watch" and watch.open and watch.open_for(failed(4)) is None
    off = StormWatch(msgspec.structs.replace(SETTINGS, mode="off"))
    for e in log.events:
        assert off.fold(e) == []  # off proposes no storm...
    (end,) = off.expire(at(1))  # ...and ends the open one at once
    assert isinstance(end.data, StormEnded) and end.data.reason == "breaker_off"


def test_verify_storms_accepts_the_record_and_flags_what_no_fold_explains() -> None:
    watch, log = StormWatch(SETTINGS), Log()
    started = opened(watch, log, [1, 2, 3])
    log.add(park(failed(4), uuid.uuid4(), started.storm_id), 5)
    log.store(watch.expire(at(500)), 500)
    check = verify_storms(log.events, SETTINGS)
    assert check.ok and (check.started, check.ended, check.parked) == (1, 1, 1)
    assert check.watch.summary() == {"storms": 1, "open": 0, "parked": 1, "waiting_release": 1}
    bad = Log()
    bad.add(failed(1, ident="sig-v1:x"), 0)
    bad.add(StormStarted(storm_id=storm_id("sig-v1:x", 1), signature="sig-v1:x",
                         category="infra_network"), 1, storm_id("sig-v1:x", 1))  # fmt: skip
    bad.add(park(failed(2), uuid.uuid4(), "storm:sig-v1:y:1"), 2)
    check = verify_storms(bad.events, SETTINGS)
    assert not check.ok and len(check.unexplained) == 1 and len(check.unbacked) == 1


# --- decide -------------------------------------------------------------------------------


POLICY = parse_policy(
    """
version = 1
[default.attempts]
system = 3
[default.pipeline]
floor = 100
[storm]
mode = "park"
jitter_s = 30.0
"""
)


def test_decide_parks_what_it_would_retry_and_spends_nothing() -> None:
    state = BudgetState().feed([job(500)])
    v, vid = failed(900, job_id=500, category="preempted"), uuid.uuid4()
    parked = decide(state, v, POLICY, job(500), NOW, verdict_event_id=vid, storm="storm:s:1")
    assert isinstance(parked, RetryParked)
    assert parked.storm_id == "storm:s:1" and parked.would_action == "retry_job"
    assert parked.verdict_event_id == vid and "storm:s:1" in parked.detail
    state.feed([parked])
    assert state.retries_requested == 0 and state.requests == {}
    assert vid not in state.decided_verdicts and state.parked[vid] == parked
    # What would not be retried anyway is not parked: it is skipped as usual.
    det = decide(state, failed(900, job_id=501, category="deterministic"), POLICY, job(501),
                 NOW, verdict_event_id=uuid.uuid4(), storm="storm:s:1")  # fmt: skip
    assert not isinstance(det, RetryParked) and det.reason == "not_retryable"
    # Released (no storm now): the usual request, after a share of the jitter.
    again = decide(state, v, POLICY, job(500), NOW, verdict_event_id=vid)
    assert isinstance(again, RetryRequested) and again.not_before is not None
    assert NOW < again.not_before < NOW + dt.timedelta(seconds=30)
    assert again.snapshot.job_attempts == 0 and again.snapshot.pipeline_retries == 0


def test_release_jitter_spreads_parked_jobs_over_the_window() -> None:
    state = BudgetState()
    delays = []
    for i in range(40):
        vid = uuid.uuid4()
        name = f"build-{i}"
        v = msgspec.structs.replace(failed(900, job_id=1000 + i, category="preempted"),
                                    job_name=name)  # fmt: skip
        state.feed([job(1000 + i, name), park(v, vid, "storm:s:1")])
        d = decide(state, v, POLICY, job(1000 + i, name), NOW, verdict_event_id=vid)
        assert isinstance(d, RetryRequested) and d.not_before is not None
        delays.append((d.not_before - NOW).total_seconds())
    assert all(0 <= x < 30 for x in delays)
    assert max(delays) - min(delays) > 15  # spread, not bunched


def park(v: VerdictReached, vid: uuid.UUID, storm: str) -> RetryParked:
    assert v.signature is not None
    return RetryParked(source=v.source, project=v.project, pipeline_id=v.pipeline_id,
                       job_id=v.job_id, job_name=v.job_name, category=v.category, storm_id=storm,
                       signature=v.signature.id, would_action="retry_job", verdict_event_id=vid,
                       snapshot=BudgetSnapshot())  # fmt: skip


def request(v: VerdictReached, vid: uuid.UUID) -> RetryRequested:
    return RetryRequested(source=v.source, project=v.project, pipeline_id=v.pipeline_id,
                          job_id=v.job_id, job_name=v.job_name, action="retry_job",
                          idempotency_key=f"k{vid}", category=v.category, budget="system",
                          snapshot=BudgetSnapshot(), verdict_event_id=vid)  # fmt: skip


def test_verify_storms_accepts_a_storm_opened_under_the_thresholds_it_records() -> None:
    lower = msgspec.structs.replace(SETTINGS, pipelines=2)
    watch, log = StormWatch(lower), Log()
    started = opened(watch, log, [1, 2])
    assert started.threshold == 2
    assert verify_storms(log.events, SETTINGS).ok  # today's policy asks for 3: it still stands
    forged = Log()
    forged.add(failed(1), 0)
    forged.add(msgspec.structs.replace(started, threshold=1), 1, started.storm_id)
    assert not verify_storms(forged.events, SETTINGS).ok
