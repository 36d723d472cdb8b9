"""The event vocabulary of ciretry.

Every fact ciretry knows is one of these immutable values. Each type carries a ``type`` tag (its
class name, stored beside the body) and a ``schema_version``: the pair selects the decoder, so an
old body is never read with a new schema by accident, and an unknown pair is a loud
``UnknownEventType``, never a silent drop.

Streams group events by aggregate (see ``job_stream`` / ``pipeline_stream``):

* the **pipeline stream** holds what budgets are folded from: every ``JobFinished`` of the
  pipeline (each attempt of each job), ``PipelineFinished`` and every decision of ``act``;
* the **job stream** holds what concerns one job attempt only: ``PodTerminated`` (correlated to it),
  ``VerdictReached``, and feedback on verdicts;
* the **review stream** (``review_stream``) holds a merge request's / pull request's labels, per
  source branch, which opt-out by label reads.

Attempt chains: a retry that leaves its pipeline (GitLab ``recreate_pipeline`` and
``rerun_with_resources`` create a new one) carries the request's idempotency key to the provider
(``RETRY_OF_VARIABLE``) and back (``PipelineLinked``). The pipeline the chain started from is its
*origin*: every decision about any job of the chain is appended to the origin's pipeline stream
(``decision_stream``), so the chain has one budget however many pipelines it spans.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar, Literal

import msgspec

from .errors import MALFORMED_JSON
from .ids import uuid7

Source = Literal["gitlab", "github", "taskcluster", "kubernetes", "buildkite"]
Category = Literal[
    "oom",
    "preempted",
    "infra_network",
    "infra_disk",
    "runner_system",
    "timeout",
    "flaky_test",
    "deterministic",
    "cancelled",
    "unknown",
    # No rule explains it, but retries of its signature kept passing (issue 15).
    "learned_spurious",
]
#: ``learned``: retries granted by what ciretry learned from outcomes, with their own limit.
BudgetClass = Literal["system", "user", "learned"]
#: How a failure ended (issue 15): its next attempt of the same job on the same commit passed,
#: failed with the same signature, failed with another, or there was none within the horizon.
OutcomeKind = Literal["passed_on_retry", "failed_again_same", "failed_differently", "never_retried"]
Action = Literal["retry_job", "recreate_pipeline", "rerun_with_resources", "none"]
SkipReason = Literal[
    "not_retryable",
    "job_budget_exhausted",
    "pipeline_budget_exhausted",
    "pipeline_mostly_broken",
    "opted_out",
    "dry_run",
    "resource_cap_reached",
    "resize_unsupported",
    "superseded",
]

#: CI variable set on every pipeline act creates, to the idempotency key of the request that
#: created it: people see where the pipeline came from, act's check before acting recognizes it,
#: and ingest reads it back from the pipeline's hooks to link the chain (``PipelineLinked``).
RETRY_OF_VARIABLE = "CIRETRY_RETRY_OF"


class UnknownEventType(Exception):
    """A stored or received event whose (type, schema_version) this code does not know."""

    def __init__(self, type_name: str, schema_version: int) -> None:
        super().__init__(
            f"unknown event type {type_name!r} schema version {schema_version}: "
            "upgrade ciretry or add an upcaster"
        )
        self.type_name = type_name
        self.schema_version = schema_version


class EventDecodeError(Exception):
    """A body that does not match the schema its type and version name."""


_REGISTRY: dict[tuple[str, int], type[Event]] = {}


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every domain event. Subclasses are registered by (class name, schema_version)."""

    schema_version: ClassVar[int] = 1
    #: First subject token after the prefix on the bus (``<prefix>.<topic>.<type>``); consumers
    #: filter on it, so each service subscribes to one subject.
    topic: ClassVar[str] = "misc"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        key = (cls.type_name(), cls.schema_version)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise TypeError(f"event type {key} registered twice")
        _REGISTRY[key] = cls

    @classmethod
    def type_name(cls) -> str:
        tag = cls.__struct_config__.tag
        return tag if isinstance(tag, str) else cls.__name__


# --- value objects used inside events -------------------------------------------------------


class LogLocator(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a job's log can be fetched. ``kind`` selects the fetcher."""

    kind: Literal["gitlab", "github", "taskcluster", "url", "buildkite"]
    url: str | None = None
    project: str | None = None
    job_id: str | None = None
    run_id: int | None = None


class JobRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    job_id: str
    name: str
    stage: str | None = None
    status: str
    failure_reason: str | None = None


class Evidence(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why a verdict was reached: a rule and, for log rules, the line it matched."""

    rule: str
    line: int | None = None
    text: str | None = None
    signal: str | None = None


class Resources(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A container's size. Memory in MiB (rounded up from the exact quantity, so a size read
    back is never below what ran), CPU in millicores."""

    memory_request_mb: int | None = None
    memory_limit_mb: int | None = None
    cpu_request_millis: int | None = None
    cpu_limit_millis: int | None = None

    @property
    def memory_mb(self) -> int | None:
        """The memory the container could use: its limit, else its request."""
        return self.memory_limit_mb or self.memory_request_mb

    @property
    def cpu_millis(self) -> int | None:
        return self.cpu_limit_millis or self.cpu_request_millis


class ContainerFacts(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One terminated container of a pod: how it ended and the size it was given."""

    name: str
    #: An init container (``initContainerStatuses``): it ran before the job's own containers.
    init: bool = False
    reason: str | None = None
    exit_code: int | None = None
    resources: Resources | None = None


class FailureSignature(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A failed job's decisive lines, normalized (``ciretry.common.signature``): ``id`` is the
    cluster id (``<algorithm>:<hash of text>``), ``examples`` a few of the lines as logged."""

    id: str
    algorithm: str
    text: str
    examples: tuple[str, ...] = ()


class LearnedEvidence(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The numbers behind a learned verdict or a demotion, from the outcomes in the log."""

    retries: int = 0
    passes: int = 0
    failed_again: int = 0
    failed_differently: int = 0
    commits: int = 0
    since: dt.datetime | None = None
    rate_low: float = 0.0
    rate_high: float = 1.0


# --- job, pipeline, pod -----------------------------------------------------------------------


class JobFinished(Event, frozen=True, kw_only=True, omit_defaults=True):
    """One attempt of one CI job reached a terminal status (success, failed, canceled, ...)."""

    topic: ClassVar[str] = "job"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    status: str
    stage: str | None = None
    #: Provider's attempt number when it has a reliable one (GitHub run_attempt, Taskcluster runId,
    #: Buildkite retries_count + 1).
    attempt: int | None = None
    provider_failure_reason: str | None = None
    #: Canonical name of the provider reason (old and new provider names map to one).
    failure_reason: str | None = None
    exit_code: int | None = None
    runner: str | None = None
    ref: str | None = None
    sha: str | None = None
    user: str | None = None
    commit_message: str | None = None
    #: Unused since runner tags moved to ``runner_tags``; events stored before that hold runner
    #: tags here, which opt-out by label no longer reads.
    labels: tuple[str, ...] = ()
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    allow_failure: bool = False
    manual_retry: bool = False
    log: LogLocator | None = None
    #: Runner tags / runner labels (GitLab ``tag_list``, GitHub ``labels`` of the job): where the
    #: job may run. Never merge request labels: those are ``MergeRequestUpdated.labels``.
    runner_tags: tuple[str, ...] = ()


class PipelineFinished(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "pipeline"

    source: Source
    project: str
    pipeline_id: str
    status: str
    ref: str | None = None
    sha: str | None = None
    user: str | None = None
    commit_message: str | None = None
    jobs: tuple[JobRef, ...] = ()
    finished_at: dt.datetime | None = None


class PipelineLinked(Event, frozen=True, kw_only=True, omit_defaults=True):
    """A pipeline act created (``recreate_pipeline``, ``rerun_with_resources``) was seen: it
    carries the idempotency key of the request that created it, which links its jobs into the
    request's attempt chain. Recorded by ingest from the pipeline's hooks, or by act from the
    provider's API when no hook has told yet; the idempotency key stores it once either way."""

    topic: ClassVar[str] = "pipeline"

    source: Source
    project: str
    pipeline_id: str
    #: The ``RetryRequested.idempotency_key`` of the request that created this pipeline.
    retry_of: str
    #: The size the pipeline asked for (its resource variables), when it set any.
    resources: Resources | None = None


class MergeRequestUpdated(Event, frozen=True, kw_only=True, omit_defaults=True):
    """A merge request (GitLab) or pull request (GitHub) as of one update: what opt-out by
    label reads. Stored in the review stream of its source branch."""

    topic: ClassVar[str] = "review"

    source: Source
    project: str
    number: str
    source_branch: str
    state: str
    labels: tuple[str, ...] = ()
    target_branch: str | None = None
    sha: str | None = None
    updated_at: dt.datetime | None = None


class PodTerminated(Event, frozen=True, kw_only=True, omit_defaults=True):
    """A Kubernetes pod that ran a CI job ended; the reasons classify needs for OOM/preemption,
    and the size of the container that died (what a rerun with more memory must exceed)."""

    topic: ClassVar[str] = "pod"

    namespace: str
    pod: str
    source: Source
    project: str
    job_id: str
    pipeline_id: str | None = None
    container: str | None = None
    container_reason: str | None = None
    exit_code: int | None = None
    pod_reason: str | None = None
    disruption_reason: str | None = None
    finished_at: dt.datetime | None = None
    #: ``container`` is an init container.
    container_init: bool = False
    #: Requests and limits of ``container`` (the one that tells how the job ended).
    resources: Resources | None = None
    #: Every terminated container and init container, with its size.
    containers: tuple[ContainerFacts, ...] = ()


# --- classify ---------------------------------------------------------------------------------


class VerdictReached(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "verdict"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    category: Category
    retryable: bool
    budget: BudgetClass
    action: Action
    confidence: float
    rules: tuple[str, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    signals: Mapping[str, str | int | None] = msgspec.field(default_factory=dict)
    log_available: bool = True
    log_note: str | None = None
    ruleset_version: str | None = None
    #: The JobFinished event this verdict is about.
    job_event_id: uuid.UUID | None = None
    #: The size of the container that died, from the job's pod events (None when unknown).
    observed: Resources | None = None
    #: The failure's signature (issue 15); absent on verdicts recorded before it existed.
    signature: FailureSignature | None = None
    #: Set when the verdict is retryable because of what ciretry learned from outcomes (the
    #: signature's or rule's record), not because of a rule alone.
    learned: LearnedEvidence | None = None


class VerdictDisputed(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "feedback"

    verdict_event_id: uuid.UUID
    who: str
    why: str
    correct_category: Category | None = None


class VerdictConfirmed(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "feedback"

    verdict_event_id: uuid.UUID
    who: str
    why: str | None = None


# --- learning (issue 15) -----------------------------------------------------------------------


class OutcomeRecorded(Event, frozen=True, kw_only=True, omit_defaults=True):
    """How one failed job attempt ended, from the next attempt of the same job on the same
    commit (a retry by ciretry or by a person, in the same pipeline or a new one)."""

    topic: ClassVar[str] = "learning"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    outcome: OutcomeKind
    #: The verdict this outcome scores (its signature, rules and category).
    verdict_event_id: uuid.UUID
    signature: str | None = None
    category: Category = "unknown"
    rules: tuple[str, ...] = ()
    #: The verdict said to retry (a rule's or a learned verdict).
    retryable: bool = False
    #: The verdict was retryable because of learning (a learned verdict is scored too).
    learned: bool = False
    sha: str | None = None
    ref: str | None = None
    runner: str | None = None
    next_job_id: str | None = None
    next_pipeline_id: str | None = None
    next_signature: str | None = None
    failed_at: dt.datetime | None = None
    decided_at: dt.datetime | None = None


class LearnedVerdictChanged(Event, frozen=True, kw_only=True, omit_defaults=True):
    """A signature became retryable from its outcomes, or a signature or rule lost the right to
    retry (its retries stopped passing, or a person disputed it): explain-only from now on."""

    topic: ClassVar[str] = "learning"

    kind: Literal["signature", "rule"]
    subject: str
    state: Literal["retryable", "explain_only"]
    reason: Literal["passed_on_retry", "retries_stopped_passing", "disputed"]
    evidence: LearnedEvidence
    #: What a person reads: "7 of 7 retries passed across 5 commits since 2026-11-02".
    text: str
    category: Category = "learned_spurious"
    #: For ``disputed``: the VerdictDisputed event.
    dispute_event_id: uuid.UUID | None = None
    #: The OutcomeRecorded (or dispute) that tipped it.
    cause_event_id: uuid.UUID | None = None


# --- act --------------------------------------------------------------------------------------


class BudgetSnapshot(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The numbers a decision was made with, so "why" can be answered from the event alone."""

    job_attempts: int = 0
    job_limit: int = 0
    pipeline_retries: int = 0
    pipeline_limit: int = 0
    pipeline_jobs: int = 0
    deterministic_failures: int = 0


class RetryRequested(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "action"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    action: Action
    idempotency_key: str
    category: Category
    budget: BudgetClass
    snapshot: BudgetSnapshot
    not_before: dt.datetime | None = None
    resources: Resources | None = None
    dry_run: bool = False
    verdict_event_id: uuid.UUID | None = None
    policy: str | None = None
    #: What the provider will do, when it is not obvious from the action (a GitLab rerun is a
    #: new pipeline on the tip of the branch, with the size in its variables).
    detail: str | None = None
    #: The chain's origin pipeline when it is not ``pipeline_id``: the decision is stored in
    #: the origin's stream (``decision_stream``), whose budget pays for every rerun of it.
    origin_pipeline_id: str | None = None


class RetrySkipped(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "action"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    reason: SkipReason
    detail: str
    category: Category
    snapshot: BudgetSnapshot
    would_action: Action | None = None
    verdict_event_id: uuid.UUID | None = None
    policy: str | None = None
    #: The chain's origin pipeline when it is not ``pipeline_id``: the decision is stored in
    #: the origin's stream (``decision_stream``), whose budget pays for every rerun of it.
    origin_pipeline_id: str | None = None


class RetryIssued(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "action"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    idempotency_key: str
    new_job_id: str | None = None
    new_pipeline_id: str | None = None
    #: True when the provider already had a newer attempt and no call was made.
    found_existing: bool = False
    #: The chain's origin pipeline when it is not ``pipeline_id``: the decision is stored in
    #: the origin's stream (``decision_stream``), whose budget pays for every rerun of it.
    origin_pipeline_id: str | None = None


class RetryFailed(Event, frozen=True, kw_only=True, omit_defaults=True):
    topic: ClassVar[str] = "action"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    idempotency_key: str
    status: int | None
    detail: str
    will_retry: bool = False
    #: The chain's origin pipeline when it is not ``pipeline_id``: the decision is stored in
    #: the origin's stream (``decision_stream``), whose budget pays for every rerun of it.
    origin_pipeline_id: str | None = None


class RetryParked(Event, frozen=True, kw_only=True, omit_defaults=True):
    """act would have retried this job, but its failure signature is in a retry storm (one
    signature failing in many pipelines at once: a registry down, a zone reclaiming nodes): the
    retry waits until the storm ends, without spending any budget. Stored like a decision, in
    the chain's origin stream; once the storm ends the verdict is decided again (with jitter)."""

    topic: ClassVar[str] = "action"

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    category: Category
    #: The storm (``StormStarted.storm_id``) that parked it.
    storm_id: str
    signature: str
    would_action: Action
    verdict_event_id: uuid.UUID
    snapshot: BudgetSnapshot
    detail: str = ""
    policy: str | None = None
    origin_pipeline_id: str | None = None


class StormPipeline(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A pipeline a retry storm touched."""

    source: Source
    project: str
    pipeline_id: str


class ParkedJob(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job a retry storm parked."""

    source: Source
    project: str
    pipeline_id: str
    job_id: str
    job_name: str


class StormStarted(Event, frozen=True, kw_only=True, omit_defaults=True):
    """One failure signature appeared in ``threshold`` or more distinct pipelines within
    ``window_s`` seconds (the log's clock): an incident. act parks the retries of that signature
    while it lasts (``[storm] mode = "park"``). Stored once (idempotency key ``storm_id``) in
    the signature's storm stream (``storm_stream``)."""

    topic: ClassVar[str] = "storm"

    storm_id: str
    signature: str
    category: Category
    rules: tuple[str, ...] = ()
    #: A line of the failure as logged (the signature's first example), for people.
    example: str | None = None
    #: The pipelines within the window when it opened (at most ``STORM_PIPELINES_LISTED``).
    pipelines: tuple[StormPipeline, ...] = ()
    pipeline_count: int = 0
    threshold: int = 0
    window_s: float = 0.0
    #: When the signature was first and last seen within the window (the log's clock).
    first_seen: dt.datetime | None = None
    last_seen: dt.datetime | None = None
    #: ``park``: retries of the signature are parked; ``watch``: only recorded.
    mode: str = "park"


class StormEnded(Event, frozen=True, kw_only=True, omit_defaults=True):
    """The storm's signature has not appeared for ``quiet_s`` seconds (or the breaker was
    switched off): its parked jobs are decided again, spread over ``jitter_s`` seconds."""

    topic: ClassVar[str] = "storm"

    storm_id: str
    signature: str
    #: ``quiet``: no verdict of the signature for ``quiet_s``; ``breaker_off``: the policy
    #: switched the breaker off while the storm was open.
    reason: Literal["quiet", "breaker_off"] = "quiet"
    started_at: dt.datetime | None = None
    last_seen: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    quiet_s: float = 0.0
    jitter_s: float = 0.0
    #: Every pipeline the storm touched (at most ``STORM_PIPELINES_LISTED`` listed).
    pipelines: tuple[StormPipeline, ...] = ()
    pipeline_count: int = 0
    #: The jobs parked during the storm, as this replica had folded them (late parks are
    #: released too; the audit counts ``RetryParked`` events).
    parked: tuple[ParkedJob, ...] = ()
    parked_count: int = 0


class ExplanationPosted(Event, frozen=True, kw_only=True, omit_defaults=True):
    """act told people where they look: an MR note / PR comment, a commit status or a check run
    now shows the explanation of a pipeline (``act.explain``). Like a retry it is an action:
    decided from the log, checked at the provider before posting (our own note is found by its
    marker), and recorded with the provider's id. Stored in the target's explain stream
    (``explain_stream``); the idempotency key names the target and the content posted."""

    topic: ClassVar[str] = "explain"

    source: Source
    project: str
    pipeline_id: str
    #: ``mr_note``, ``pr_comment``, ``commit_status`` or ``check_run``.
    target: str
    #: What the target hangs on: ``mr-<iid>`` / ``pr-<number>`` for notes, the commit SHA else.
    subject: str
    #: The provider's id of the note, comment, status or check run.
    provider_id: str | None = None
    #: Content hash of what was posted (``act.explain.digest``).
    digest: str
    #: ``created``, ``edited``, or ``found`` (the provider already showed this content: a post
    #: whose record a crash lost).
    how: str
    #: The state shown (status state, check-run conclusion), when the target has one.
    state: str | None = None
    #: When act posted (its clock): the rate limit per target counts from it.
    posted_at: dt.datetime | None = None


# --- operations -------------------------------------------------------------------------------


class MessageRejected(Event, frozen=True, kw_only=True, omit_defaults=True):
    """A bus message a consumer could not process and terminated (poison message)."""

    topic: ClassVar[str] = "system"

    consumer: str
    subject: str
    reason: str
    message_id: str | None = None
    deliveries: int = 0
    payload_excerpt: str | None = None


# --- envelope ---------------------------------------------------------------------------------


class Metadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Cross-cutting facts about an event: where it came from and which trace it belongs to."""

    idempotency_key: str | None = None
    causation_id: str | None = None
    correlation_id: str | None = None
    source_delivery_id: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event about to be appended. The id is assigned here, so it is known before the commit."""

    stream: str
    data: Event
    metadata: Metadata = Metadata()
    event_id: uuid.UUID = msgspec.field(default_factory=uuid7)


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as the log holds it: with its place in its stream and in the global order."""

    event_id: uuid.UUID
    stream: str
    stream_version: int
    position: int
    recorded_at: dt.datetime
    data: Event
    metadata: Metadata

    @property
    def type(self) -> str:
        return self.data.type_name()


class WireEvent(msgspec.Struct, frozen=True, kw_only=True):
    """RecordedEvent as it travels on the bus: the body stays raw until its type is checked."""

    event_id: uuid.UUID
    stream: str
    stream_version: int
    position: int
    recorded_at: dt.datetime
    type: str
    schema_version: int
    metadata: Metadata
    data: msgspec.Raw


# --- codec ------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_metadata_decoder = msgspec.json.Decoder(Metadata)
_wire_decoder = msgspec.json.Decoder(WireEvent)


def event_class(type_name: str, schema_version: int) -> type[Event]:
    try:
        return _REGISTRY[(type_name, schema_version)]
    except KeyError:
        raise UnknownEventType(type_name, schema_version) from None


@cache
def _decoder(cls: type[Event]) -> msgspec.json.Decoder[Event]:
    return msgspec.json.Decoder(cls)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode_event(type_name: str, schema_version: int, body: bytes | memoryview) -> Event:
    cls = event_class(type_name, schema_version)
    try:
        return _decoder(cls).decode(body)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(f"{type_name} v{schema_version}: {exc}") from exc
    except MALFORMED_JSON as exc:
        raise EventDecodeError(f"{type_name} v{schema_version}: malformed body: {exc}") from exc


def decode_metadata(body: bytes | memoryview | None) -> Metadata:
    if not body:
        return Metadata()
    return _metadata_decoder.decode(body)


def to_wire(event: RecordedEvent) -> bytes:
    return _encoder.encode(
        WireEvent(
            event_id=event.event_id,
            stream=event.stream,
            stream_version=event.stream_version,
            position=event.position,
            recorded_at=event.recorded_at,
            type=event.data.type_name(),
            schema_version=event.data.schema_version,
            metadata=event.metadata,
            data=msgspec.Raw(_encoder.encode(event.data)),
        )
    )


def from_wire(payload: bytes) -> RecordedEvent:
    """Decode a bus message; raises EventDecodeError / UnknownEventType on anything off."""
    try:
        wire = _wire_decoder.decode(payload)
    except MALFORMED_JSON + (msgspec.ValidationError,) as exc:
        raise EventDecodeError(f"malformed envelope: {exc}") from exc
    return RecordedEvent(
        event_id=wire.event_id,
        stream=wire.stream,
        stream_version=wire.stream_version,
        position=wire.position,
        recorded_at=wire.recorded_at,
        data=decode_event(wire.type, wire.schema_version, wire.data),
        metadata=wire.metadata,
    )


def registered_types() -> dict[tuple[str, int], type[Event]]:
    return dict(_REGISTRY)


# --- stream names -----------------------------------------------------------------------------


def job_stream(source: str, project: str, job_id: str) -> str:
    return f"job-{source}-{project}-{job_id}"


def pipeline_stream(source: str, project: str, pipeline_id: str) -> str:
    return f"pipeline-{source}-{project}-{pipeline_id}"


def learning_stream(kind: str, subject: str) -> str:
    """Where a signature's or rule's learned state changes are recorded."""
    return f"learned-{kind}-{subject}"


def review_stream(source: str, project: str, branch: str) -> str:
    """Merge requests / pull requests from one source branch (what opt-out by label reads)."""
    return f"review-{source}-{project}-{branch}"


def explain_stream(source: str, project: str, target: str, subject: str) -> str:
    """Where act records what it posted on one target (one MR note, one commit's status)."""
    return f"explain-{source}-{project}-{target}-{subject}"


def storm_stream(signature: str) -> str:
    """Where a failure signature's retry storms (``StormStarted``/``StormEnded``) are recorded."""
    return f"storm-{signature}"


#: Most pipelines a storm event lists (the count is always exact).
STORM_PIPELINES_LISTED = 500


def link_key(source: str, project: str, pipeline_id: str) -> str:
    """Idempotency key of a pipeline's ``PipelineLinked``: one link per pipeline, whoever (ingest
    from a hook, act from the API) records it first."""
    return f"link:{source}:{project}:{pipeline_id}"


def decision_stream(
    decision: RetryRequested | RetrySkipped | RetryIssued | RetryFailed | RetryParked,
) -> str:
    """Where act stores a decision and its outcome: the pipeline stream of the chain's origin."""
    return pipeline_stream(
        decision.source, decision.project, decision.origin_pipeline_id or decision.pipeline_id
    )


def subject_for(prefix: str, event: Event) -> str:
    return f"{prefix}.{event.topic}.{event.type_name()}"
