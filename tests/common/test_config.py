from __future__ import annotations

import pytest

from ciretry.common.config import ConfigError, load_config, redacted


def test_reads_prefixed_variables_and_coerces_types() -> None:
    cfg = load_config(
        {
            "CIRETRY_DATABASE_URL": "postgresql://u:pw@db/x",
            "CIRETRY_HTTP_PORT": "9000",
            "CIRETRY_GITLAB_WEBHOOK_SECRETS": "a, b",
            "CIRETRY_LOG_JSON": "false",
            "UNRELATED": "1",
        }
    )
    assert cfg.http_port == 9000
    assert cfg.gitlab_webhook_secrets == ("a", "b")
    assert cfg.log_json is False


def test_wrong_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CIRETRY_HTTP_PORT"):
        load_config({"CIRETRY_HTTP_PORT": "eighty"})


def test_redacted_hides_secrets_and_passwords() -> None:
    cfg = load_config(
        {
            "CIRETRY_DATABASE_URL": "postgresql://u:hunter2@db/x",
            "CIRETRY_GITLAB_TOKEN": "glpat-secret",
            "CIRETRY_GITLAB_WEBHOOK_SECRETS": "s3cr3t",
        }
    )
    text = repr(redacted(cfg))
    assert "hunter2" not in text and "glpat-secret" not in text and "s3cr3t" not in text
    assert "db/x" in text
