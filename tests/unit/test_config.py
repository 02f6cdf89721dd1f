"""Configuration loading: defaults, YAML, environment, every error at once, production rules."""

from __future__ import annotations

import pytest

from e2a.config import (
    ConfigError,
    listen_endpoint,
    load_config,
    parse_host_port,
    redacted,
    resolve_hmac_secret,
    resolve_master_key,
)

STRONG = "x" * 40


def _load(tmp_path, text=None, env=None):
    path = None
    if text is not None:
        path = tmp_path / "e2a.yaml"
        path.write_text(text)
    return load_config(str(path) if path else None, environ=env or {}, cwd=tmp_path)


def test_defaults_apply_without_any_file(tmp_path):
    """No config file at all → development defaults with data in ./e2a-data."""
    config = _load(tmp_path)
    assert config.env == "development" and config.data_dir == "./e2a-data"
    assert config.smtp.listen_addr == ":2525" and config.http.listen_addr == ":8080"
    assert config.smtp.max_message_size == 10485760 and config.webhooks.retry_schedule[0] == 5
    assert config.mail_domain == "e2a.example.com"


def test_cwd_e2a_yaml_is_read_when_present(tmp_path):
    """./e2a.yaml is used when no path is named."""
    (tmp_path / "e2a.yaml").write_text("shared_domain: Agents.Example.COM.\n")
    assert load_config(None, environ={}, cwd=tmp_path).shared_domain == "agents.example.com"


def test_environment_wins_over_file(tmp_path):
    """E2A_* variables override YAML values; empty variables count as unset."""
    config = _load(
        tmp_path,
        "smtp:\n  max_recipients: 10\n  domain: mx.file.example\n",
        {"E2A_SMTP_MAX_RECIPIENTS": "7", "E2A_SMTP_DOMAIN": ""},
    )
    assert config.smtp.max_recipients == 7 and config.smtp.domain == "mx.file.example"


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        ({"E2A_PUBLIC_URL": "https://e2a.example.com"}, ("http", "public_url"), "https://e2a.example.com"),
        ({"E2A_HMAC_SECRET": STRONG}, ("signing", "hmac_secret"), STRONG),
        ({"E2A_WEBHOOKS_ALLOW_PRIVATE": "YES"}, ("webhooks", "allow_private"), True),
        ({"E2A_WEBHOOKS_RETRY_SCHEDULE": "1,2,3"}, ("webhooks", "retry_schedule"), (1, 2, 3)),
        ({"E2A_DNS_NAMESERVERS": "127.0.0.1:5353,[::1]:53"}, ("dns", "nameservers"), ("127.0.0.1:5353", "[::1]:53")),
        ({"E2A_WEBHOOKS_JITTER": "0.2"}, ("webhooks", "jitter"), 0.2),
        ({"E2A_OUTBOUND_SMTP_HOST": "relay.example"}, ("outbound_smtp", "host"), "relay.example"),
    ],
)
def test_environment_names_and_types(tmp_path, env, attr, expected):
    """Env names follow E2A_<PATH> (with the three ★ aliases) and parse by type."""
    config = _load(tmp_path, env=env)
    assert getattr(getattr(config, attr[0]), attr[1]) == expected


def test_every_problem_is_reported_at_once(tmp_path):
    """Unknown keys, bad types and bad enum values all appear in one ConfigError."""
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            "bogus: 1\nsmtp:\n  max_recipients: many\n  typo_key: 2\nlogging:\n  level: loud\n",
            {"E2A_HTTP_LISTEN_ADDR": "nonsense:port"},
        )
    text = str(err.value)
    for needle in ("bogus", "smtp.max_recipients", "smtp.typo_key", "logging.level", "http.listen_addr"):
        assert needle in text
    assert len(err.value.problems) >= 5


def test_named_file_that_cannot_be_read_is_an_error(tmp_path):
    """An explicitly named file that is missing or not YAML is a startup error."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"), environ={}, cwd=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(str(bad), environ={}, cwd=tmp_path)


def test_production_refuses_weak_or_missing_secrets(tmp_path):
    """Production needs a strong hmac secret, a master key, a database URL, https public URL."""
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, env={"E2A_ENV": "production", "E2A_HMAC_SECRET": "change-me-in-production"})
    text = str(err.value)
    for needle in ("E2A_HMAC_SECRET", "signing.master_key", "database.url", "http.public_url", "smtp.domain"):
        assert needle in text


def test_production_refuses_development_switches(tmp_path):
    """allow_private and auto_verify cannot be on in production."""
    env = {
        "E2A_ENV": "production",
        "E2A_HMAC_SECRET": STRONG,
        "E2A_MASTER_KEY": "ab" * 32,
        "E2A_DATABASE_URL": "postgres://db/e2a",
        "E2A_PUBLIC_URL": "https://e2a.example.com",
        "E2A_SMTP_DOMAIN": "mx.example.com",
    }
    assert _load(tmp_path, env=env).production
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, env={**env, "E2A_WEBHOOKS_ALLOW_PRIVATE": "true", "E2A_DOMAINS_AUTO_VERIFY": "1"})
    assert "webhooks.allow_private" in str(err.value) and "domains.auto_verify" in str(err.value)


def test_master_key_accepts_hex_or_base64_and_rejects_other(tmp_path):
    """64 hex or base64 of 32 bytes; anything else is a config error."""
    assert resolve_master_key(_load(tmp_path, env={"E2A_MASTER_KEY": "00" * 32})) == bytes(32)
    assert resolve_master_key(_load(tmp_path, env={"E2A_MASTER_KEY": "A" * 43 + "="})) == bytes(32)
    with pytest.raises(ConfigError, match="E2A_MASTER_KEY"):
        _load(tmp_path, env={"E2A_MASTER_KEY": "short"})


def test_development_generates_secrets_once_with_0600(tmp_path):
    """Development: master key and hmac secret generated into the data dir, reused later."""
    config = _load(tmp_path, env={"E2A_DATA_DIR": str(tmp_path / "data")})
    key = resolve_master_key(config)
    secret = resolve_hmac_secret(config)
    assert len(key) == 32 and len(secret) == 64
    assert resolve_master_key(config) == key and resolve_hmac_secret(config) == secret
    assert (tmp_path / "data" / "master.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700


def test_redacted_hides_secrets(tmp_path):
    """check-config output never shows secret values."""
    config = _load(tmp_path, env={"E2A_HMAC_SECRET": STRONG, "E2A_OUTBOUND_SMTP_PASSWORD": "pw"})
    shown = redacted(config)
    assert shown["signing"]["hmac_secret"] == "***" and shown["outbound_smtp"]["password"] == "***"
    assert STRONG not in repr(shown)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":2525", ("", 2525)),
        ("127.0.0.1:25", ("127.0.0.1", 25)),
        ("[::]:25", ("::", 25)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_host_port_forms(value, expected):
    """host:port, :port and [v6]:port forms; bracketed v6 without port takes the default."""
    assert parse_host_port(value, default_port=53) == expected


@pytest.mark.parametrize("value", ["nonsense", "host:99999", "a:b:c", "[::1]:x"])
def test_parse_host_port_rejects_garbage(value):
    """Malformed listen addresses are errors, never silently ignored."""
    with pytest.raises(ValueError):
        parse_host_port(value)


def test_listen_endpoint_descriptions():
    """Config addresses become Twisted endpoint strings."""
    assert listen_endpoint(":2525") == "tcp:2525"
    assert listen_endpoint("127.0.0.1:0") == "tcp:0:interface=127.0.0.1"
    assert listen_endpoint("[::]:25") == "tcp6:25:interface=\\:\\:"
