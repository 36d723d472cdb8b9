"""Wiring of the classify service: a consumer of finished jobs that emits verdicts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aiohttp import web

from ciretry.common.bus import Consumer, appender
from ciretry.common.config import Config
from ciretry.common.http import AiohttpTransport, Transport
from ciretry.common.learning import LearningSettings, learning_settings_from_text
from ciretry.common.service import Infra, Worker, consumer_settings

from .classifier import RuleClassifier
from .learner import LearningFollower
from .logsource import LOG_HTTP, ByteBudget, LogSource, ProviderEndpoints
from .rules import load_ruleset
from .service import ClassifyHandler

CONSUMER = "classify"


def _learning_settings(policy_path: str) -> LearningSettings:
    if not policy_path:
        return LearningSettings()
    return learning_settings_from_text(Path(policy_path).read_text(encoding="utf-8"), policy_path)


def log_source(config: Config, transport: Transport) -> LogSource:
    """Where classify reads logs, as configured: the providers' URLs and tokens, the cap, the
    byte budget of all handlers, and the requests to each provider at once."""
    return LogSource(
        transport,
        ProviderEndpoints(
            gitlab_url=config.gitlab_url,
            gitlab_token=config.gitlab_token,
            github_url=config.github_url,
            github_token=config.github_token,
            taskcluster_url=config.taskcluster_url,
            taskcluster_token=config.taskcluster_token,
            buildkite_url=config.buildkite_url,
            buildkite_token=config.buildkite_token,
        ),
        cap_bytes=config.classify_log_cap_bytes,
        settings=replace(LOG_HTTP, max_in_flight=config.provider_max_in_flight),
        budget=ByteBudget(config.classify_log_budget_bytes),
    )


async def setup(infra: Infra, app: web.Application) -> list[Worker]:
    config = infra.config
    # Refuses to start on a rule file whose examples fail: better than misclassifying.
    ruleset = load_ruleset(config.rules_paths)
    transport = AiohttpTransport()
    infra.cleanups.append(transport.aclose)
    logs = log_source(config, transport)
    # The [learning] table of the policy file (act reads the rest of it).
    settings = _learning_settings(config.policy_path)
    learning = LearningFollower(infra.store, appender(infra.store, infra.recorder), settings)
    # Rebuild what was learned before the first verdict (the state is a fold of the log).
    await learning.catch_up()
    handler = ClassifyHandler(
        infra.store,
        infra.recorder,
        logs,
        RuleClassifier(ruleset),
        consumer=CONSUMER,
        pod_grace=config.classify_pod_grace,
        learning=learning,
    )
    # Cleanups run after the consumers drained: the last verdicts are committed by then.
    infra.cleanups.append(handler.close)
    consumer = Consumer(
        infra.bus,
        infra.store,
        name=CONSUMER,
        topic="job",
        handler=handler.handle,
        settings=consumer_settings(config),
    )
    await consumer.setup()
    infra.consumers.append(consumer)
    return [consumer.run, learning.run]
