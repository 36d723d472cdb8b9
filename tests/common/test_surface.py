"""The seam between the services and libs/common: services import only the public surface
(``ciretry.common.__all__``), and the surface changes only on purpose (this test names it)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import ciretry.common as common

ROOT = Path(__file__).resolve().parents[2]

#: The surface, as it is meant to be. A change here is a change of the contract between the
#: services and libs/common: make it on purpose.
EXPECTED = {
    "events": {
        "Action", "BudgetClass", "BudgetSnapshot", "Category", "ContainerFacts", "Event",
        "Evidence", "ExplanationPosted", "FailureSignature", "JobFinished", "JobRef",
        "LogLocator", "MergeRequestUpdated", "MessageRejected", "Metadata", "NewEvent",
        "OutcomeRecorded", "ParkedJob", "PipelineFinished", "PipelineLinked",
        "PodTerminated", "RETRY_OF_VARIABLE", "RecordedEvent", "Resources", "RetryFailed",
        "RetryIssued", "RetryParked", "RetryRequested", "RetrySkipped", "STORM_PIPELINES_LISTED",
        "SkipReason", "Source", "StormEnded", "StormPipeline", "StormStarted",
        "VerdictDisputed", "VerdictReached", "decision_stream", "explain_stream", "job_stream",
        "link_key", "pipeline_stream", "review_stream", "storm_stream",
    },
    "signature": {"SIGNATURE_TAIL_LINES", "signature_of"},
    "learning": {
        "LEARNING_TYPES", "Learner", "LearningCheck", "LearningError", "LearningSettings",
        "apply_learning", "learning_settings", "learning_settings_from_text", "verify_learning",
    },
    "eventlog": {
        "AlreadyProcessed",
        "AppendResult",
        "EventLog",
        "TrackedAppend",
        "Tracking",
        "WrongExpectedVersion",
    },
    "eventstore": {"EventStore"},
    "groupcommit": {"AppendBatcher", "BatcherClosed", "Publish", "StreamReader", "outbox_fast_path"},
    "bus": {"Append", "Consumer", "Recorder", "appender", "metadata_from_context"},
    "auth": {
        "PUSH", "ProjectTokens", "Scope", "TokenSet", "bearer", "buildkite_signature_ok",
        "scopes", "signature_ok",
    },
    "config": {"Config", "ConfigError", "load_config"},
    "errors": {"DependencyUnavailable", "MALFORMED_JSON", "is_transient"},
    "resources": {"DEFAULT_VARIABLES", "ResourceVariables", "larger", "resources_of"},
    "text": {"REPLACEMENT", "safe_text"},
    "http": {
        "AiohttpTransport", "ApiResponse", "DEFAULT_SETTINGS", "HttpClient", "HttpSettings",
        "Response", "Sleep", "TransientError", "Transport", "TransportError",
        "parse_retry_after",
    },
    "providers": {
        "GITHUB", "GITLAB", "GITLAB_PER_PAGE", "TASKCLUSTER_QUEUE", "gitlab_pages", "gitlab_project",
        "hawk_header", "ProviderApi", "BUILDKITE", "buildkite_job",
    },
    "metrics": {"instruments"},
    "telemetry": {"trace_fields", "current_span"},
    "service": {"Infra", "Worker", "consumer_settings"},
}  # fmt: skip


def services_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every name a service imports from ciretry.common."""
    out = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "ciretry.common"
            ):
                out += [(str(path.relative_to(ROOT)), node.module or "", a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ciretry.common"):
                        out.append((str(path.relative_to(ROOT)), a.name, "*"))
    return out


def test_the_surface_is_what_it_is_meant_to_be() -> None:
    got: dict[str, set[str]] = {}
    for name, module in common.surface().items():
        got.setdefault(module, set()).add(name)
    assert got == EXPECTED
    assert common.__all__ == sorted(common.surface())


def test_every_surface_name_resolves_from_the_package_and_its_module() -> None:
    for name, module in common.surface().items():
        defined = getattr(importlib.import_module(f"ciretry.common.{module}"), name)
        assert getattr(common, name) is defined, name


def test_services_import_only_the_surface() -> None:
    found = services_imports()
    assert found, "the scan found no imports at all"
    surface = common.surface()
    off = [
        (path, module, name)
        for path, module, name in found
        if name == "*"
        or name not in surface
        or module not in ("ciretry.common", f"ciretry.common.{surface[name]}")
    ]
    assert not off, off
