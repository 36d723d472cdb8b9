"""Settings checked for meaning, not only type (issue 14, item 4): every message starts with the
variable's name; unknown ``CIRETRY_*`` variables are named with the closest setting; settings
left empty that change what a service lets through are warned about at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciretry.common.config import (
    Config,
    ConfigError,
    check_paths,
    load_config,
    startup_warnings,
    unknown_variables,
)
from ciretry.ingest.pulse import PulseSettings


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CIRETRY_LOG_LEVEL", "verbose", "is not a level"),
        ("CIRETRY_DATABASE_URL", "postgress://db/x", "did you mean postgres://"),
        ("CIRETRY_DATABASE_URL", "mysql://db/x", "not one of postgresql, postgres"),
        ("CIRETRY_DATABASE_URL", "db.example:5432", "has no scheme"),
        ("CIRETRY_NATS_URL", "http://nats:4222", "not one of nats, tls, ws, wss"),
        ("CIRETRY_NATS_URL", "nats://a:4222,nats://b:x", "Port could not be cast"),
        ("CIRETRY_AMQP_URL", "amqps//broker", "has no scheme"),
        ("CIRETRY_GITLAB_URL", "gitlab.example.com", "has no scheme; expected https://"),
        ("CIRETRY_GITHUB_URL", "https://", "names no host"),
        ("CIRETRY_CONSUMER_ACK_WAIT", "-1", "must be greater than 0"),
        ("CIRETRY_OUTBOX_GRACE", "-0.5", "must be 0 or more"),
        ("CIRETRY_CLASSIFY_LOG_CAP_BYTES", "0", "must be greater than 0"),
        ("CIRETRY_CLASSIFY_LOG_BUDGET_BYTES", "0", "must be greater than 0"),
        ("CIRETRY_ACT_FAILURE_BACKOFF", "nan", "finite number"),
        ("CIRETRY_HTTP_PORT", "70000", "0..65535"),
        ("CIRETRY_CONNECT_ATTEMPTS", "0", "must be greater than 0"),
        ("CIRETRY_DATABASE_SCHEMA", "Bad-Schema", "invalid schema name"),
        ("CIRETRY_NATS_PREFIX", "ci.*", "dot-separated tokens"),
        ("CIRETRY_NATS_STREAM", "A.B", "letters, digits"),
        ("CIRETRY_HTTP_HOST", "", "must not be empty"),
        ("CIRETRY_PROVIDER_MAX_IN_FLIGHT", "0", "must be greater than 0"),
    ],
)
def test_a_wrong_value_names_its_variable(variable: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({variable: value})
    assert str(err.value).startswith(f"{variable}: ")
    assert says in str(err.value)


@pytest.mark.parametrize("variable", ["CIRETRY_RULES_PATHS", "CIRETRY_POLICY_PATH"])
def test_a_missing_rule_or_policy_file_names_its_variable(variable: str) -> None:
    config = load_config({variable: "/nonexistent/file.toml"})  # a ConfigMap may name it
    with pytest.raises(ConfigError, match=f"^{variable}: /nonexistent/file.toml does not exist"):
        check_paths(config)  # what serve and up run before starting


def test_a_password_in_a_wrong_url_is_not_repeated() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"CIRETRY_DATABASE_URL": "postgresql://u:hunter2@db:x/y"})
    assert "hunter2" not in str(err.value)


def test_good_values_pass(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    cfg = load_config(
        {
            "CIRETRY_DATABASE_URL": "postgres://u:pw@db:5432/x",
            "CIRETRY_NATS_URL": "nats://a:4222, tls://b:4222",
            "CIRETRY_AMQP_URL": "amqps://broker/vhost",
            "CIRETRY_GITLAB_URL": "http://gitlab.internal",
            "CIRETRY_LOG_LEVEL": "debug",
            "CIRETRY_RULES_PATHS": str(rules),
            "CIRETRY_POLICY_PATH": str(policy),
            "CIRETRY_OUTBOX_GRACE": "0",
        }
    )
    check_paths(cfg)
    assert cfg.log_level == "debug" and cfg.outbox_grace == 0


def test_defaults_are_valid() -> None:
    assert load_config({}) == Config()


def test_unknown_variables_name_the_closest_setting() -> None:
    said = unknown_variables(
        {
            "CIRETRY_GITLAB_TOKN": "x",
            "CIRETRY_DATABSE_URL": "x",
            "CIRETRY_FROBNICATE": "1",
            "CIRETRY_GITLAB_TOKEN": "fine",
            "CIRETRY_PULSE_QUEUE": "read by the pulse consumer",
            "CIRETRY_INGEST_SERVICE_HOST": "10.0.0.1",  # Kubernetes service links
            "CIRETRY_INGEST_PORT_8080_TCP_ADDR": "10.0.0.1",
            "HOME": "/root",
        }
    )
    assert said == [
        "CIRETRY_DATABSE_URL is not a setting; did you mean CIRETRY_DATABASE_URL? (ignored)",
        "CIRETRY_FROBNICATE is not a setting (ignored)",
        "CIRETRY_GITLAB_TOKN is not a setting; did you mean CIRETRY_GITLAB_TOKEN? (ignored)",
    ]


def test_start_warns_about_open_doors_where_they_are() -> None:
    bare = Config()
    ingest = startup_warnings(bare, "ingest", environ={})
    [secrets] = [w for w in ingest if w.startswith("no webhook secret is set")]
    for provider in ("gitlab", "github", "buildkite"):
        assert f"CIRETRY_{provider.upper()}_WEBHOOK_SECRETS" in secrets
        assert f"/webhooks/{provider}" in secrets
    assert any("no read token is set (CIRETRY_READ_TOKENS)" in w for w in ingest)
    assert any("no push token is set (CIRETRY_PUSH_TOKENS)" in w for w in ingest)
    assert startup_warnings(bare, "act", environ={}) == []
    configured = Config(
        gitlab_webhook_secrets=("s",), read_tokens=("r" * 16,), push_tokens=("p" * 16,)
    )
    assert startup_warnings(configured, "ingest", environ={}) == []
    opened = startup_warnings(Config(api_open=True, push_tokens=("p" * 16,)), "ingest", {})
    assert any("CIRETRY_API_OPEN is true" in w for w in opened)
    legacy = startup_warnings(Config(api_token="t"), "ingest", environ={})
    assert any("CIRETRY_API_TOKEN is deprecated" in w for w in legacy)
    for warnings in (ingest, opened, legacy):
        assert not any("r" * 16 in w or "p" * 16 in w for w in warnings)
    buildkite_only = Config(
        buildkite_webhook_secrets=("s",), read_tokens=("r" * 16,), push_tokens=("p" * 16,)
    )
    assert startup_warnings(buildkite_only, "ingest", environ={}) == []


def test_pulse_settings_are_checked_by_name_with_the_others() -> None:
    """Pulse settings are Config fields: the same validation, the same unknown-name check."""
    for env, name in (
        ({"CIRETRY_PULSE_PREFETCH": "lots"}, "CIRETRY_PULSE_PREFETCH"),
        ({"CIRETRY_PULSE_PREFETCH": "0"}, "CIRETRY_PULSE_PREFETCH"),
        ({"CIRETRY_PULSE_QUEUE": ""}, "CIRETRY_PULSE_QUEUE"),
        ({"CIRETRY_PULSE_BINDINGS": "=pattern"}, "CIRETRY_PULSE_BINDINGS"),
    ):
        with pytest.raises(ConfigError, match=f"^{name}: "):
            PulseSettings.from_env(env)
        with pytest.raises(ConfigError, match=f"^{name}: "):
            load_config(env)
    settings = PulseSettings.from_env(
        {"CIRETRY_PULSE_PREFETCH": "20", "CIRETRY_PULSE_BINDINGS": "exchange/a=route.#,exchange/b"}
    )
    assert settings.prefetch == 20
    assert settings.bindings == (("exchange/a", "route.#"), ("exchange/b", "#"))
    assert unknown_variables({"CIRETRY_PULSE_QUEUE": "q"}) == []
    assert "CIRETRY_PULSE_PREFTCH" in unknown_variables({"CIRETRY_PULSE_PREFTCH": "1"})[0]
