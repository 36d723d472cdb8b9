"""Configuration from ``CIRETRY_*`` environment variables, validated at start.

A wrong value stops the process with a message naming the variable, not a stack trace later.
Telemetry reads the standard ``OTEL_*`` variables itself (see telemetry.py).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import urllib.parse
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
    #: Buildkite: webhook tokens (the ``X-Buildkite-Token`` value, or the key of the
    #: ``X-Buildkite-Signature`` HMAC), the REST API and an API access token with
    #: ``read_builds``, ``write_builds`` and ``read_build_logs``.
    buildkite_webhook_secrets: tuple[str, ...] = ()
    buildkite_url: str = "https://api.buildkite.com"
    buildkite_token: str = ""
    rules_paths: tuple[str, ...] = ()
    policy_path: str = ""
    # --- who may do what (docs/security.md) ---------------------------------------------------
    #: Bearer tokens per scope, comma-separated: several at once so that one can be rotated
    #: without downtime. ``read``: the audit API and dashboard; ``feedback``: dispute or
    #: confirm verdicts (and read); ``push``: ``/webhooks/kubernetes`` and ``/pulse``;
    #: ``admin``: everything ``read`` and ``feedback`` may.
    read_tokens: tuple[str, ...] = ()
    feedback_tokens: tuple[str, ...] = ()
    push_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    #: Deprecated (one secret for every job): still a read, feedback and push token.
    api_token: str = ""
    #: The dashboard's address as people reach it: the "why" links in MR notes, commit
    #: statuses and check runs (docs/explanations.md). Empty: no links.
    public_url: str = ""
    #: True: anyone who reaches the port may read the audit API and dashboard (a warning at
    #: start). Feedback, push and admin still need their tokens.
    api_open: bool = False
    #: Keys signing the dashboard's session cookies, comma-separated: the first signs, every
    #: one verifies (rotation). Empty: a random key per process (sessions end with it; replicas
    #: behind one address need a shared key).
    session_secrets: tuple[str, ...] = ()
    #: Seconds a dashboard sign-in lasts.
    session_max_age: float = 8 * 3600.0
    #: The role ``ciretry migrate`` creates (if it may) and grants exactly what the services
    #: need: no UPDATE, DELETE or TRUNCATE on ``events``. Empty: no role is managed. With a
    #: password the role can log in (services use it); without, it is a group role to grant.
    database_runtime_role: str = "ciretry_runtime"
    database_runtime_password: str = ""
    # --- Taskcluster pulse (AMQP; on when CIRETRY_AMQP_URL is set) -----------------------------
    #: The durable queue ingest consumes; ``exchange=pattern`` bindings (a bare exchange binds
    #: ``#``; empty: the queue's task-failed/-exception/-completed exchanges); messages in flight.
    pulse_queue: str = "ciretry-ingest-pulse"
    pulse_bindings: tuple[str, ...] = ()
    pulse_prefetch: int = 64
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
    consumer_concurrency: int = 64
    #: classify: how long to wait for a PodTerminated that may arrive after the job event.
    classify_pod_grace: float = 2.0
    #: classify: the most of a log that is read (its tail, when larger).
    classify_log_cap_bytes: int = 64 * 1024 * 1024
    #: classify: the most log bytes all concurrent handlers of one process hold at once (a
    #: fetch reserves the cap until it knows the log's size). With the 64 MiB cap, four logs of
    #: that size at once: the rest wait. Sized for the 1 GiB pod limit of k8s/base/classify.yaml
    #: (tests/classify/test_memory.py measures it); raise it with the limit.
    classify_log_budget_bytes: int = 256 * 1024 * 1024
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
    #: Requests to each CI provider under way at once, per process: classify's log fetches,
    #: act's checks and calls (a log's download holds its slot until its body is read). A burst
    #: of failures must not open hundreds of connections; but the slots bound a replica's rate
    #: by the provider's latency: at 100 ms a request, 16 slots allow 160 requests/s.
    provider_max_in_flight: int = 16
    # --- startup (connecting, naming the process) --------------------------------------------
    #: Attempts to reach PostgreSQL and NATS at start, waiting 0.5 s doubling to 5 s between
    #: them (30: about two minutes), one log line each; then the process exits with code 4.
    connect_attempts: int = 30
    #: Names this process in ``/readyz`` and its logs (default: host name and pid). ``ciretry
    #: up`` sets it to tell its own services from another program answering on their ports.
    instance_id: str = ""

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
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_variable(str(exc))) from None
    validate(config)
    return config


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


# --- validation beyond types, unknown variables, warnings at start ----------------------------
#
# msgspec checks types; what a value means is checked here, and every message starts with the
# variable's name. Numbers are durations, sizes and counts: never negative, and these are
# meaningless at zero.

_POSITIVE = frozenset(
    {
        "database_pool_max",
        "nats_duplicate_window",
        "nats_stream_replicas",
        "max_body_bytes",
        "consumer_batch",
        "consumer_fetch_timeout",
        "consumer_max_deliver",
        "consumer_ack_wait",
        "consumer_max_ack_pending",
        "consumer_concurrency",
        "classify_log_cap_bytes",
        "classify_log_budget_bytes",
        "act_scheduler_interval",
        "outbox_sweep_interval",
        "connect_attempts",
        "session_max_age",
        "pulse_prefetch",
        "provider_max_in_flight",
    }
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SECRETS = "_webhook_secrets"
#: The settings of each provider's webhook secrets (``<source>_webhook_secrets``, its route
#: ``/webhooks/<source>``): a new provider's setting is warned about with the others.
WEBHOOK_SECRETS = tuple(name for name in Config.__struct_fields__ if name.endswith(_SECRETS))
#: URL settings and the schemes each accepts (an empty value means "not configured").
_URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "database_url": ("postgresql", "postgres"),
    "nats_url": ("nats", "tls", "ws", "wss"),
    "amqp_url": ("amqp", "amqps"),
    "gitlab_url": ("https", "http"),
    "github_url": ("https", "http"),
    "taskcluster_url": ("https", "http"),
    "buildkite_url": ("https", "http"),
    "public_url": ("https", "http"),
}
#: ``CIRETRY_*`` variables read outside Config (the pulse consumer's own settings, tests, compose).
OTHER_VARIABLES = frozenset(
    {
        "CIRETRY_TEST_CONTAINERS",
        "CIRETRY_CHAOS_SEED",
        "CIRETRY_IMAGE",
    }
)
#: What Kubernetes injects for a Service named ``ciretry-…`` (service links): not ours, not typos.
_SERVICE_LINK = re.compile(
    r"CIRETRY_[A-Z0-9_]*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def _var(name: str) -> str:
    return PREFIX + name.upper()


def validate(config: Config) -> None:
    """Raise ConfigError, naming the variable, for a value of the right type that is wrong."""
    for f in msgspec.structs.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{_var(f.name)}: expected a finite number, got {value}")
        if value < 0 or (value == 0 and f.name in _POSITIVE):
            bound = "greater than 0" if f.name in _POSITIVE else "0 or more"
            raise ConfigError(f"{_var(f.name)}: must be {bound}, got {value}")
    if config.http_port > 65535:
        raise ConfigError(f"{_var('http_port')}: a TCP port is 0..65535, got {config.http_port}")
    if config.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"{_var('log_level')}: {config.log_level!r} is not a level; use one of "
            + ", ".join(LOG_LEVELS)
        )
    for name, schemes in _URL_SCHEMES.items():
        value = getattr(config, name)
        for url in value.split(",") if name == "nats_url" else [value]:
            if value:
                _check_url(name, url.strip(), schemes)
    for name in ("http_host", "data_dir", "nats_prefix", "nats_stream", "pulse_queue"):
        if not getattr(config, name):
            raise ConfigError(f"{_var(name)}: must not be empty")
    if not _STREAM_NAME.fullmatch(config.nats_stream):
        raise ConfigError(
            f"{_var('nats_stream')}: {config.nats_stream!r}: letters, digits, _ and - only"
        )
    from .bus import _SUBJECT_PREFIX  # bus imports nats: only when validating
    from .eventstore import check_schema_name

    if not _SUBJECT_PREFIX.fullmatch(config.nats_prefix):
        raise ConfigError(
            f"{_var('nats_prefix')}: {config.nats_prefix!r}: dot-separated tokens of letters, "
            "digits, _ and -"
        )
    try:
        check_schema_name(config.database_schema)
    except ValueError as exc:
        raise ConfigError(f"{_var('database_schema')}: {exc}") from None
    role = config.database_runtime_role
    if role and not _ROLE_NAME.fullmatch(role):
        raise ConfigError(
            f"{_var('database_runtime_role')}: {role!r}: lower-case letters, digits and _, "
            "starting with a letter or _ (at most 63)"
        )
    for binding in config.pulse_bindings:
        exchange, _, pattern = binding.partition("=")
        if not exchange.strip() or any(c.isspace() for c in binding.strip()):
            raise ConfigError(
                f"{_var('pulse_bindings')}: {binding[:80]!r}: expected exchange=pattern "
                "(or a bare exchange), comma-separated"
            )
    for name in ("read_tokens", "feedback_tokens", "push_tokens", "admin_tokens"):
        for token in getattr(config, name):
            if len(token) < MIN_TOKEN_LENGTH:
                # Never the value itself: messages reach logs.
                raise ConfigError(
                    f"{_var(name)}: a token of {len(token)} characters; use at least "
                    f"{MIN_TOKEN_LENGTH} (`python -c 'import secrets; print(secrets.token_urlsafe())'`)"
                )


#: Scoped tokens are guessed online at the rate the port answers: 16 characters of a random
#: token are far out of reach; a shorter one is a typo or a password.
MIN_TOKEN_LENGTH = 16
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_paths(config: Config) -> None:
    """Raise ConfigError, naming the variable, for a rule or policy file that is not there.
    Apart from ``validate`` because it is about this machine, not the values: a ConfigMap is
    checked on a machine without its container's files (tests/deploy)."""
    for name in ("rules_paths", "policy_path"):
        value = getattr(config, name)
        for path in value if isinstance(value, tuple) else [value] if value else []:
            if not Path(path).exists():
                raise ConfigError(f"{_var(name)}: {path} does not exist")


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    shown = _without_password(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"{_var(name)}: {shown!r} has no scheme; expected {schemes[0]}://host...")
    if scheme.lower() not in schemes:
        close = difflib.get_close_matches(scheme.lower(), schemes, n=1)
        hint = f" (did you mean {close[0]}://?)" if close else ""
        raise ConfigError(
            f"{_var(name)}: scheme {scheme!r} is not one of {', '.join(schemes)}{hint}"
        )
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{_var(name)}: {shown!r}: {exc}") from None
    if not parsed.hostname and not rest.startswith("/"):
        raise ConfigError(f"{_var(name)}: {shown!r} names no host")


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per ``CIRETRY_*`` variable that is no setting, with the closest known name."""
    env = os.environ if environ is None else environ
    known = {_var(name) for name in Config.__struct_fields__}
    messages = []
    for key in sorted(env):
        if not key.startswith(PREFIX) or key in known or key in OTHER_VARIABLES:
            continue
        if _SERVICE_LINK.fullmatch(key):
            continue
        close = difflib.get_close_matches(key, sorted(known | OTHER_VARIABLES), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        messages.append(f"{key} is not a setting{hint} (ignored)")
    return messages


def startup_warnings(
    config: Config, service: str | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """What a process should say at start: unknown variables, and settings left empty whose
    absence changes what the service lets through. ``service`` None means every service."""
    warnings = unknown_variables(environ)
    if service in (None, "ingest"):
        if not any(getattr(config, name) for name in WEBHOOK_SECRETS):
            variables = ", ".join(PREFIX + name.upper() for name in WEBHOOK_SECRETS)
            routes = ", ".join(f"/webhooks/{name.removesuffix(_SECRETS)}" for name in WEBHOOK_SECRETS)
            warnings.append(
                f"no webhook secret is set ({variables}): every webhook to {routes} is refused "
                "with 401 until one is"
            )
        warnings += access_warnings(config)
    return warnings


def access_warnings(config: Config) -> list[str]:
    """What the access settings leave open or shut (said at start, never with a token)."""
    out = []
    if config.api_open:
        out.append(
            "CIRETRY_API_OPEN is true: the audit API and the dashboard answer anyone who can "
            "reach them (feedback, push and admin still need their tokens)"
        )
    elif not (config.read_tokens or config.feedback_tokens or config.admin_tokens
              or config.api_token):  # fmt: skip
        out.append(
            "no read token is set (CIRETRY_READ_TOKENS): the audit API and the dashboard refuse "
            "every request (401); set one, or CIRETRY_API_OPEN=true to open them on purpose"
        )
    if not (config.push_tokens or config.api_token):
        out.append(
            "no push token is set (CIRETRY_PUSH_TOKENS): /webhooks/kubernetes and /pulse refuse "
            "every request (401)"
        )
    if config.api_token:
        out.append(
            "CIRETRY_API_TOKEN is deprecated: one secret reads, gives feedback and pushes "
            "events; use CIRETRY_READ_TOKENS, CIRETRY_FEEDBACK_TOKENS and CIRETRY_PUSH_TOKENS"
        )
    return out
