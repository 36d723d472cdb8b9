"""Configuration from ``CIRETRY_*`` environment variables, validated at start.

A wrong value stops the process with a message naming the variable, not a stack trace later.
Telemetry reads the standard ``OTEL_*`` variables itself (see telemetry.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

PREFIX = "CIRETRY_"


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the variable."""


class Config(msgspec.Struct, frozen=True, kw_only=True):
    #: PostgreSQL DSN. Empty: ``ciretry up`` starts an embedded server.
    database_url: str = ""
    #: Schema holding ciretry's tables (tests isolate themselves with one schema each).
    database_schema: str = "public"
    database_pool_max: int = 10
    #: NATS URL. Empty: ``ciretry up`` starts an embedded server.
    nats_url: str = ""
    #: Subject prefix and JetStream stream name; lets several deployments share one NATS.
    nats_prefix: str = "ciretry"
    nats_stream: str = "CIRETRY"
    #: JetStream duplicate-detection window for Nats-Msg-Id (seconds).
    nats_duplicate_window: float = 120.0
    #: JetStream stream replicas (3 on a 3-node cluster, so losing a node loses nothing).
    nats_stream_replicas: int = 1
    amqp_url: str = ""
    #: Address the service's HTTP server (webhooks, /healthz, /readyz, /metrics) binds to.
    http_host: str = "127.0.0.1"
    http_port: int = 0
    #: Where ``ciretry up`` keeps embedded servers' data.
    data_dir: str = ".ciretry"
    gitlab_webhook_secrets: tuple[str, ...] = ()
    github_webhook_secrets: tuple[str, ...] = ()
    gitlab_url: str = "https://gitlab.com"
    gitlab_token: str = ""
    github_url: str = "https://api.github.com"
    github_token: str = ""
    taskcluster_url: str = "https://firefox-ci-tc.services.mozilla.com"
    taskcluster_token: str = ""
    rules_paths: tuple[str, ...] = ()
    policy_path: str = ""
    api_token: str = ""
    max_body_bytes: int = 5 * 1024 * 1024
    #: Consumer loop: messages fetched per pull and seconds to wait for them.
    consumer_batch: int = 64
    consumer_fetch_timeout: float = 1.0
    #: Deliveries after which a message that keeps failing is terminated as poison.
    consumer_max_deliver: int = 10
    consumer_ack_wait: float = 30.0
    #: Unacknowledged messages the server lets all replicas of a consumer hold at once.
    consumer_max_ack_pending: int = 1000
    #: Messages a replica processes at once.
    consumer_concurrency: int = 16
    #: classify: how long to wait for a PodTerminated that may arrive after the job event.
    classify_pod_grace: float = 2.0
    #: classify: the most of a log that is read (its tail, when larger).
    classify_log_cap_bytes: int = 64 * 1024 * 1024
    #: act: transient provider failures (timeouts, 429, 5xx after the executor's own quick
    #: retries) after which a request is given up with a final RetryFailed; the wait before
    #: trying again doubles from ``act_failure_backoff`` seconds; the scheduler looks for due
    #: and interrupted requests every ``act_scheduler_interval`` seconds.
    act_max_failures: int = 5
    act_failure_backoff: float = 60.0
    act_scheduler_interval: float = 5.0
    #: Followers (classify, act; issue 13). A failed event is nak'ed after
    #: ``consumer_backoff_base`` seconds, doubling per delivery up to ``consumer_backoff_cap``;
    #: transient failures are retried so for as long as they last. An event of the follower's
    #: topic still unprocessed ``consumer_catch_up_grace`` seconds after it was recorded is taken
    #: from the log (whatever the bus lost), looked for every ``consumer_catch_up_interval``
    #: seconds (0: no catch-up).
    consumer_backoff_base: float = 0.5
    consumer_backoff_cap: float = 30.0
    consumer_catch_up_grace: float = 60.0
    consumer_catch_up_interval: float = 10.0
    #: Seconds an outbox row may wait before the sweeper republishes it.
    outbox_grace: float = 5.0
    outbox_sweep_interval: float = 1.0
    log_level: str = "INFO"
    log_json: bool = True

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


_LIST_FIELDS = {
    name
    for name, ftype in zip(
        Config.__struct_fields__,
        [f.type for f in msgspec.structs.fields(Config)],
        strict=True,
    )
    if getattr(ftype, "__origin__", None) is tuple
}


def load_config(environ: Mapping[str, str] | None = None, **overrides: object) -> Config:
    """Build the Config from the environment (``CIRETRY_<FIELD>``), then ``overrides``."""
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for name in Config.__struct_fields__:
        key = PREFIX + name.upper()
        if key in env:
            value: object = env[key]
            if name in _LIST_FIELDS:
                value = [part.strip() for part in str(value).split(",") if part.strip()]
            raw[name] = value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_variable(str(exc))) from None


def _name_the_variable(message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.http_port`": point at the env variable.
    marker = "- at `$."
    if marker in message:
        head, _, tail = message.partition(marker)
        field = tail.split("`", 1)[0].split("[", 1)[0]
        return f"{PREFIX}{field.upper()}: {head.strip()}"
    return message


def redacted(config: Config) -> dict[str, object]:
    """The config for logs: secrets replaced, so tokens never reach a log line."""
    out: dict[str, object] = msgspec.structs.asdict(config)
    for name in list(out):
        if any(word in name for word in ("secret", "token", "password")) and out[name]:
            out[name] = "***"
    for name in ("database_url", "nats_url", "amqp_url"):
        value = out.get(name)
        if isinstance(value, str) and "@" in value:
            scheme, _, rest = value.partition("://")
            out[name] = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return out
