"""The retry-storm breaker, pure: when one failure signature spikes across many pipelines at once
(a registry answering 5xx, a mirror down, a zone reclaiming spot nodes), stop spending budgets
on it, record one incident, and decide the parked jobs again once the signature stops appearing.

``StormWatch`` is a fold over the log (in log order), like ``ciretry.common.learning``'s
``Learner``: it proposes events, each with an idempotency key, and its state changes only when
they are read back, so replicas proposing the same event store it once and ``ciretry replay``
folds the log to the same state.

* **Opening** (``fold``, the log's clock): a retryable verdict with a signature counts its
  pipeline (source, project, pipeline id) in that signature's window; when ``pipelines`` distinct
  pipelines fell within ``window_s`` seconds of the latest one (``recorded_at``), it proposes
  ``StormStarted`` (key = storm id = ``storm:<signature>:<n>``, n-th storm of the signature).
* **Open**: from the ``StormStarted`` read back, until its ``StormEnded``. Each verdict of the
  signature counts its pipeline as affected and moves ``last_seen``. ``open_for`` is what act's
  decisions read (in memory: no round trip per decision).
* **Ending** (``expire``, the process's clock, injected): a storm whose signature has not been
  seen for ``quiet_s`` seconds gets ``StormEnded`` (key ``<storm id>:ended``); with the breaker
  ``off`` every open storm ends at once (``breaker_off``). The window of the signature restarts
  empty, so only new verdicts can open the next storm.
* **Parked jobs**: ``RetryParked`` events (act's decisions) name their storm; those of an ended
  storm wait in ``releasable`` until a later decision on their verdict (``RetryRequested`` or
  ``RetrySkipped``, or a park by a newer storm) is read back. A park appended after its storm
  ended (a replica that had not read the end yet) is released too.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from ciretry.common.events import (
    STORM_PIPELINES_LISTED,
    NewEvent,
    ParkedJob,
    RecordedEvent,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    StormEnded,
    StormPipeline,
    StormStarted,
    VerdictReached,
    storm_stream,
)
from ciretry.common.events import Metadata as EventMetadata

from .policy import StormSettings

#: The event types the storm fold reads (``detect``: with the breaker on).
STORM_TYPES: Final = ("StormStarted", "StormEnded", "RetryParked", "RetryRequested", "RetrySkipped")
DETECT_TYPES: Final = ("VerdictReached", *STORM_TYPES)

PipelineKey = tuple[str, str, str]  # (source, project, pipeline id)


def storm_id(signature: str, n: int) -> str:
    """The id (and idempotency key) of the ``n``-th storm of ``signature``."""
    return f"storm:{signature}:{n}"


def counts(verdict: VerdictReached) -> bool:
    """Whether a verdict counts towards a storm: retryable, with a retry action and a signature.
    Failures nobody retries cost no budget, so they make no storm."""
    return verdict.retryable and verdict.action != "none" and verdict.signature is not None


@dataclass(slots=True)
class Storm:
    started: StormStarted
    #: Every pipeline it touched (the ones that opened it, then each verdict's while open).
    pipelines: dict[PipelineKey, None] = field(default_factory=dict)
    last_seen: dt.datetime | None = None
    #: verdict event id -> its park, in log order.
    parked: dict[uuid.UUID, RetryParked] = field(default_factory=dict)
    ended: StormEnded | None = None

    @property
    def id(self) -> str:
        return self.started.storm_id


@dataclass(slots=True)
class StormWatch:
    """The storm fold over the log (pure). Feed events in log order with ``fold``; call
    ``expire`` with the time now; read ``open_for``, ``has_ended`` and ``releasable``."""

    settings: StormSettings
    #: signature -> pipeline -> when it last appeared (verdicts not in a storm, in the window).
    windows: dict[str, dict[PipelineKey, dt.datetime]] = field(default_factory=dict)
    #: signature -> its open storm.
    open: dict[str, Storm] = field(default_factory=dict)
    #: storm id -> storm, every storm folded (storms are rare: incidents).
    storms: dict[str, Storm] = field(default_factory=dict)
    #: signature -> storms recorded so far (the next one's number is this + 1).
    recorded: dict[str, int] = field(default_factory=dict)
    #: verdict event id -> the ended storm whose park of it is not decided again yet.
    waiting: dict[uuid.UUID, str] = field(default_factory=dict)
    #: verdict event id -> the newest storm that parked it.
    parked_by: dict[uuid.UUID, str] = field(default_factory=dict)
    #: The log's clock (latest ``recorded_at`` folded) and position.
    now: dt.datetime | None = None
    position: int = 0

    @property
    def detects(self) -> bool:
        return self.settings.mode != "off"

    # --- reads (act's decisions) ------------------------------------------------------------

    def open_for(self, verdict: VerdictReached) -> str | None:
        """The id of the open storm of the verdict's signature, when the breaker parks it."""
        if not self.settings.parks or verdict.signature is None or not counts(verdict):
            return None
        storm = self.open.get(verdict.signature.id)
        return storm.id if storm is not None else None

    def has_ended(self, storm: str) -> bool:
        """Whether the storm's end was read back (a park under it may be decided again)."""
        found = self.storms.get(storm)
        return found is not None and found.ended is not None

    def releasable(self) -> list[RetryParked]:
        """Parks of ended storms whose verdict has no later decision yet, oldest storm first."""
        return [self.storms[sid].parked[vid] for vid, sid in self.waiting.items()]

    # --- the fold ---------------------------------------------------------------------------

    def fold(self, event: RecordedEvent) -> list[NewEvent]:
        """Fold one event (log order); returns the events it proposes to append."""
        self.position = max(self.position, event.position)
        at = event.recorded_at
        if self.now is None or at > self.now:
            self.now = at
        data = event.data
        if isinstance(data, VerdictReached):
            return self._verdict(data, at)
        if isinstance(data, StormStarted):
            self._started(data)
        elif isinstance(data, StormEnded):
            self._ended(data)
        elif isinstance(data, RetryParked):
            self._parked(data)
        elif isinstance(data, RetryRequested | RetrySkipped) and data.verdict_event_id:
            self._decided(data.verdict_event_id)
        return []

    def _verdict(self, verdict: VerdictReached, at: dt.datetime) -> list[NewEvent]:
        if not counts(verdict) or verdict.signature is None:
            return []
        sig = verdict.signature.id
        key = (verdict.source, verdict.project, verdict.pipeline_id)
        storm = self.open.get(sig)
        if storm is not None:
            storm.pipelines[key] = None
            storm.last_seen = at if storm.last_seen is None else max(storm.last_seen, at)
            return []
        if not self.detects:
            return []
        window = self.windows.setdefault(sig, {})
        window[key] = at
        horizon = at - dt.timedelta(seconds=self.settings.window_s)
        for old in [k for k, t in window.items() if t < horizon]:
            del window[old]
        if len(window) < self.settings.pipelines:
            return []
        n = self.recorded.get(sig, 0) + 1
        sid = storm_id(sig, n)
        pipelines = list(window)
        started = StormStarted(
            storm_id=sid,
            signature=sig,
            category=verdict.category,
            rules=verdict.rules,
            example=verdict.signature.examples[0] if verdict.signature.examples else None,
            pipelines=_listed(pipelines),
            pipeline_count=len(pipelines),
            threshold=self.settings.pipelines,
            window_s=self.settings.window_s,
            first_seen=min(window.values()),
            last_seen=at,
            mode=self.settings.mode,
        )
        return [_new(storm_stream(sig), started, sid)]

    def _started(self, started: StormStarted) -> None:
        sig = started.signature
        self.recorded[sig] = self.recorded.get(sig, 0) + 1
        if started.storm_id in self.storms:
            return
        storm = Storm(started, last_seen=started.last_seen)
        for p in started.pipelines:
            storm.pipelines[(p.source, p.project, p.pipeline_id)] = None
        # Verdicts folded between the proposal and its read-back belong to the storm.
        for key, t in self.windows.pop(sig, {}).items():
            storm.pipelines[key] = None
            storm.last_seen = t if storm.last_seen is None else max(storm.last_seen, t)
        self.storms[started.storm_id] = storm
        previous = self.open.get(sig)
        if previous is None or previous.ended is not None:
            self.open[sig] = storm

    def _ended(self, ended: StormEnded) -> None:
        storm = self.storms.get(ended.storm_id)
        if storm is None or storm.ended is not None:
            return
        storm.ended = ended
        if self.open.get(ended.signature) is storm:
            del self.open[ended.signature]
        self.windows.pop(ended.signature, None)  # the next storm counts from here
        for verdict_id in storm.parked:
            if self.parked_by.get(verdict_id) == storm.id:
                self.waiting[verdict_id] = storm.id

    def _parked(self, park: RetryParked) -> None:
        storm = self.storms.get(park.storm_id)
        if storm is None:
            return  # a park names a storm recorded before it; replay reports one that does not
        vid = park.verdict_event_id
        storm.parked.setdefault(vid, park)
        self.parked_by[vid] = storm.id
        self.waiting.pop(vid, None)  # parked again by a newer storm: that one releases it
        if storm.ended is not None:
            self.waiting[vid] = storm.id  # parked by a replica that had not read the end yet

    def _decided(self, verdict_id: uuid.UUID) -> None:
        if self.parked_by.pop(verdict_id, None) is not None:
            self.waiting.pop(verdict_id, None)

    # --- the clock --------------------------------------------------------------------------

    def expire(self, now: dt.datetime) -> list[NewEvent]:
        """``StormEnded`` for every open storm quiet for ``quiet_s`` seconds at ``now`` (every
        open storm, with the breaker off). Also forgets windows that can no longer open one."""
        out: list[NewEvent] = []
        quiet = dt.timedelta(seconds=self.settings.quiet_s)
        for storm in self.open.values():
            last = storm.last_seen or storm.started.last_seen or now
            if not self.detects:
                reason: Literal["quiet", "breaker_off"] = "breaker_off"
            elif now - last >= quiet:
                reason = "quiet"
            else:
                continue
            out.append(self._end(storm, reason, now))
        horizon = now - dt.timedelta(seconds=self.settings.window_s)
        for sig in [s for s, w in self.windows.items() if max(w.values(), default=now) < horizon]:
            del self.windows[sig]
        return out

    def _end(self, storm: Storm, reason: Literal["quiet", "breaker_off"], now: dt.datetime
             ) -> NewEvent:  # fmt: skip
        parked = [
            ParkedJob(source=p.source, project=p.project, pipeline_id=p.pipeline_id,
                      job_id=p.job_id, job_name=p.job_name)
            for p in storm.parked.values()
        ]  # fmt: skip
        ended = StormEnded(
            storm_id=storm.id,
            signature=storm.started.signature,
            reason=reason,
            started_at=storm.started.last_seen,
            last_seen=storm.last_seen,
            ended_at=now,
            quiet_s=self.settings.quiet_s,
            jitter_s=self.settings.jitter_s,
            pipelines=_listed(list(storm.pipelines)),
            pipeline_count=len(storm.pipelines),
            parked=tuple(parked[:STORM_PIPELINES_LISTED]),
            parked_count=len(parked),
        )
        return _new(storm_stream(storm.started.signature), ended, f"{storm.id}:ended")

    def summary(self) -> dict[str, int]:
        return {
            "storms": len(self.storms),
            "open": len(self.open),
            "parked": sum(len(s.parked) for s in self.storms.values()),
            "waiting_release": len(self.waiting),
        }


def _listed(keys: list[PipelineKey]) -> tuple[StormPipeline, ...]:
    return tuple(
        StormPipeline(source=s, project=p, pipeline_id=i)  # type: ignore[arg-type]
        for s, p, i in keys[:STORM_PIPELINES_LISTED]
    )


def _new(stream: str, data: StormStarted | StormEnded, key: str) -> NewEvent:
    return NewEvent(stream=stream, data=data, metadata=EventMetadata(idempotency_key=key))


# --- replay -----------------------------------------------------------------------------------


@dataclass(slots=True)
class StormCheck:
    """What ``ciretry replay`` finds when it folds the storm events again."""

    watch: StormWatch
    started: int = 0
    ended: int = 0
    parked: int = 0
    #: Storms recorded that the fold would not have opened at their place in the log.
    unexplained: list[str] = field(default_factory=list)
    #: Parks naming a storm not recorded before them.
    unbacked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.unbacked


def verify_storms(events: list[RecordedEvent], settings: StormSettings) -> StormCheck:
    """Fold the storm events (log order) as act's followers did and check the record: every
    ``StormStarted`` is one the fold proposes from the verdicts before it (with the policy's
    thresholds, or with those the event records, as far as the policy's window keeps the
    verdicts), every ``RetryParked`` names a storm recorded before it (pure)."""
    watch = StormWatch(_detecting(settings))
    check = StormCheck(watch)
    proposed: set[str] = set()
    for event in events:
        data = event.data
        if isinstance(data, StormStarted):
            check.started += 1
            if (
                data.storm_id not in proposed
                and data.storm_id not in watch.storms
                and not _within(watch, data)
            ):
                check.unexplained.append(f"@{event.position} {data.storm_id}")
        elif isinstance(data, StormEnded):
            check.ended += 1
        elif isinstance(data, RetryParked):
            check.parked += 1
            if data.storm_id not in watch.storms:
                check.unbacked.append(f"@{event.position} park of job {data.job_id}")
        for new in watch.fold(event):
            if new.metadata.idempotency_key is not None:
                proposed.add(new.metadata.idempotency_key)
    return check


def _within(watch: StormWatch, started: StormStarted) -> bool:
    """Whether the verdicts folded so far reach the storm's own recorded thresholds (a storm
    opened under an earlier policy's numbers)."""
    window = watch.windows.get(started.signature, {})
    if not window or started.threshold < 2:
        return False
    latest = max(window.values())
    horizon = latest - dt.timedelta(seconds=started.window_s)
    return sum(1 for t in window.values() if t >= horizon) >= started.threshold


def _detecting(settings: StormSettings) -> StormSettings:
    """Replay checks storms with detection on whatever the policy says now: a storm recorded
    while the breaker was on is checked against the thresholds (today's)."""
    if settings.mode != "off":
        return settings
    return msgspec.structs.replace(settings, mode="watch")


__all__ = [
    "DETECT_TYPES",
    "STORM_TYPES",
    "Storm",
    "StormCheck",
    "StormWatch",
    "counts",
    "storm_id",
    "verify_storms",
]
