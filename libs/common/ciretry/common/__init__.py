"""Code shared by every ciretry service: the event vocabulary, the event log port and its
adapters, the bus, configuration, telemetry and the service runtime.

Map (pure: no I/O, no clock; adapters: talk to a server; wiring: starts and joins things):

* pure — ``events`` (every event type, stream names, the codec), ``eventlog`` (the ``EventLog``
  port: a Protocol and its value types and errors), ``resources`` (container sizes, Kubernetes
  quantities), ``text`` (text safe for PostgreSQL), ``errors`` (transient vs poison), ``ids``
  (UUIDv7), ``config`` (settings, validated), ``auth`` (every credential check, in constant
  time: token sets, signatures, bearer tokens, named scopes), ``providers`` (the CI providers'
  API conventions: URLs, tokens, paging);
* adapters — ``eventstore`` (the event log on PostgreSQL: every event-log SQL statement is
  there), ``memory`` (the event log in memory, for tests), ``groupcommit`` (concurrent
  appends in one transaction, concurrent reads in one query), ``bus`` (NATS JetStream: the outbox
  publisher and sweeper, pull consumers), ``catchup`` (followers catching up from the log),
  ``embedded`` (PostgreSQL and NATS from wheels, for ``ciretry up``), ``http`` (the one HTTP
  client to the CI providers, over an injectable transport: aiohttp, or a function in tests),
  ``metrics``, ``telemetry``;
* wiring — ``service`` (a service process's life: connect, migrate, serve, drain), ``startup``
  (waiting for dependencies, exit codes), ``devstack`` (what ``ciretry up`` leaves for tools).

Services import from these modules only the names listed in ``__all__`` below (a test pins the
list, ``tests/common/test_surface.py``); each is also importable from ``ciretry.common`` itself.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The surface the services use: name -> the module that defines it.
_SURFACE: dict[str, str] = {
    # the event vocabulary
    **dict.fromkeys(
        (
            "Action", "BudgetClass", "BudgetSnapshot", "Category", "ContainerFacts", "Event",
            "Evidence", "ExplanationPosted", "FailureSignature", "JobFinished", "JobRef",
            "LogLocator", "MergeRequestUpdated", "MessageRejected", "Metadata", "NewEvent",
            "OutcomeRecorded", "ParkedJob", "PipelineFinished", "PipelineLinked",
            "PodTerminated", "RETRY_OF_VARIABLE", "RecordedEvent", "Resources", "RetryFailed",
            "RetryIssued", "RetryParked", "RetryRequested", "RetrySkipped", "STORM_PIPELINES_LISTED",
            "SkipReason", "Source", "StormEnded", "StormPipeline", "StormStarted",
            "VerdictDisputed", "VerdictReached", "decision_stream", "explain_stream", "job_stream",
            "link_key", "pipeline_stream", "review_stream", "storm_stream",
        ),
        "events",
    ),  # fmt: skip
    # failure signatures and learning from outcomes (issue 15): pure
    "SIGNATURE_TAIL_LINES": "signature",
    "signature_of": "signature",
    **dict.fromkeys(
        (
            "LEARNING_TYPES", "Learner", "LearningCheck", "LearningError", "LearningSettings",
            "apply_learning", "learning_settings", "learning_settings_from_text", "verify_learning",
        ),
        "learning",
    ),  # fmt: skip
    # the event log: the port, its values, the production adapter (for composition roots)
    **dict.fromkeys(
        ("AlreadyProcessed", "AppendResult", "EventLog", "TrackedAppend", "Tracking", "WrongExpectedVersion"),
        "eventlog",
    ),
    "EventStore": "eventstore",
    # group commit: concurrent appends (with tracking rows) in one transaction, reads together
    **dict.fromkeys(
        ("AppendBatcher", "BatcherClosed", "Publish", "StreamReader", "outbox_fast_path"),
        "groupcommit",
    ),
    # the bus
    **dict.fromkeys(("Append", "Consumer", "Recorder", "appender", "metadata_from_context"), "bus"),
    # credentials: every token, secret and signature check
    **dict.fromkeys(
        (
            "PUSH", "ProjectTokens", "Scope", "TokenSet", "bearer", "buildkite_signature_ok",
            "scopes", "signature_ok",
        ),
        "auth",
    ),  # fmt: skip
    # configuration, errors, sizes, text
    **dict.fromkeys(("Config", "ConfigError", "load_config"), "config"),
    **dict.fromkeys(("DependencyUnavailable", "MALFORMED_JSON", "is_transient"), "errors"),
    **dict.fromkeys(
        ("DEFAULT_VARIABLES", "ResourceVariables", "larger", "resources_of"), "resources"
    ),
    **dict.fromkeys(("REPLACEMENT", "safe_text"), "text"),
    # HTTP to the CI providers: the client and its transports, the providers' API conventions
    **dict.fromkeys(
        (
            "AiohttpTransport", "ApiResponse", "DEFAULT_SETTINGS", "HttpClient", "HttpSettings",
            "Response", "Sleep", "TransientError", "Transport", "TransportError",
            "parse_retry_after",
        ),
        "http",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "GITHUB", "GITLAB", "GITLAB_PER_PAGE", "TASKCLUSTER_QUEUE", "gitlab_pages", "gitlab_project",
            "hawk_header", "ProviderApi", "BUILDKITE", "buildkite_job",
        ),
        "providers",
    ),  # fmt: skip
    # observability and the service runtime
    "instruments": "metrics",
    **dict.fromkeys(("trace_fields", "current_span"), "telemetry"),
    **dict.fromkeys(("Infra", "Worker", "consumer_settings"), "service"),
}

__all__ = sorted(_SURFACE)


def __getattr__(name: str) -> Any:
    """``from ciretry.common import X``, importing X's module on first use (PEP 562): importing
    the package alone stays cheap (no NATS or PostgreSQL client loaded)."""
    module = _SURFACE.get(name)
    if module is None:
        raise AttributeError(f"module 'ciretry.common' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def surface() -> dict[str, str]:
    """The public surface: name -> defining module (what the surface test pins)."""
    return dict(_SURFACE)
