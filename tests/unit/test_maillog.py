"""The mail-flow log lines (e2a.maillog): their fields, their one-line text, their JSON form,
and that secrets never reach them."""

from __future__ import annotations

import io
import json

import pytest

from twisted.logger import formatEvent, globalLogPublisher

from e2a import maillog
from e2a.config import Config, LoggingConfig
from e2a.logsetup import build_log_observer, quiet_pool


@pytest.fixture
def events():
    got: list[dict] = []
    globalLogPublisher.addObserver(got.append)
    yield got
    globalLogPublisher.removeObserver(got.append)


def _json_lines(events: list[dict]) -> list[dict]:
    out = io.StringIO()
    observer = build_log_observer(Config(logging=LoggingConfig(format="json")), out)
    for event in events:
        observer(event)
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://e2a:s3cret@db.example:5432/e2a", "postgresql://e2a:***@db.example:5432/e2a"),
        ("postgres://e2a@db/e2a?sslmode=require&password=s3cret", "postgres://e2a@db/e2a?sslmode=require&password=***"),
        ("host=/run/pg port=5432 user=e2a password=s3cret dbname=e2a", "host=/run/pg port=5432 user=e2a password=*** dbname=e2a"),
        ("", ""),
    ],
)
def test_redact_dsn_hides_the_password(dsn, shown):
    """URL and key=value DSNs keep everything but the password."""
    assert maillog.redact_dsn(dsn) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Authorization: Bearer e2a_" + "a" * 64, "Authorization: Bearer ***"),
        ("key e2a_" + "b" * 64 + " refused", "key e2a_*** refused"),
        ("GET /review?token=abc.def.ghi HTTP/1.1", "GET /review?token=*** HTTP/1.1"),
        ("whsec_MGYxZTJk", "whsec_***"),
        ("connection refused", "connection refused"),
    ],
)
def test_redact_text_hides_tokens_and_keys(text, shown):
    """Free text (errors, replies) loses bearer tokens, API keys, token= values and whsec secrets."""
    assert maillog.redact_text(text) == shown


@pytest.mark.parametrize(
    ("check", "parts"),
    [
        ("spf=pass; dkim=fail; dmarc=none", ("pass", "fail", "none")),
        ("spf=pass; dkim=none", ("pass", "none", "none")),
        ("", ("none", "none", "none")),
    ],
)
def test_verdict_parts_reads_domain_check(check, parts):
    """The signed Domain-Check value splits into spf/dkim/dmarc (missing parts are none)."""
    v = maillog.verdict_parts(check)
    assert (v["spf"], v["dkim"], v["dmarc"]) == parts


def test_accepted_line_has_fields_and_one_text_line(events):
    """mail.accepted: the documented keys, a one-line text and a JSON object."""
    maillog.accepted(
        message_id="msg_" + "0" * 32, client_ip="192.0.2.1", mail_from="Alice@Example.ORG",
        agents=["bot@agents.test"], domain_check="spf=pass; dkim=pass; dmarc=pass", size=1234, ms=12.345,
    )
    [event] = events
    assert event["event"] == maillog.EVENT_ACCEPTED and event["log_namespace"] == "e2a.mail"
    assert event["mail_from_domain"] == "example.org" and event["ms"] == 12.3
    text = formatEvent(event)
    assert "\n" not in text and "spf=pass dkim=pass dmarc=pass size=1234" in text
    [line] = _json_lines(events)
    assert line["event"] == "mail.accepted" and line["agents"] == ["bot@agents.test"] and line["size"] == 1234


def test_refused_and_webhook_and_outbound_lines(events):
    """Refusal (code, reason), webhook attempt (status, ms, next retry), outbound recipient outcome."""
    maillog.refused(code=550, reason="5.1.1 recipient not found: x@agents.test", client_ip="192.0.2.1", mail_from="")
    maillog.webhook_attempt(
        delivery_id="dlv_1", message_id="msg_1", agent="bot@agents.test", attempt=2, status=None,
        outcome="retry", ms=10000.0, next_retry_s=30.4, error="timeout",
    )
    maillog.outbound_recipient(
        message_id="msg_2", recipient="bob@example.net", status="sent", attempt=1, reply="250 2.0.0 ok"
    )
    refused, hook, out = events
    assert refused["code"] == 550 and refused["mail_from_domain"] == "<>"
    assert "refused 550 from 192.0.2.1" in formatEvent(refused)
    assert hook["next_retry_s"] == 30.4 and hook["status"] is None
    assert "status=- retry ms=10000.0 next_retry=30.4s error='timeout'" in formatEvent(hook)
    assert out["status"] == "sent" and "outbound msg_2 to bob@example.net attempt 1: sent" in formatEvent(out)
    assert [line["event"] for line in _json_lines(events)] == ["mail.refused", "webhook.attempt", "outbound.recipient"]


def test_started_block_never_shows_the_database_password(events):
    """The start-up block names sources, data dir, database (no password), addresses, shared domain."""
    maillog.started(
        config_file="/etc/e2a/e2a.yaml", env_keys=["E2A_SHARED_DOMAIN", "E2A_DATABASE_URL"], env="production",
        data_dir="/var/lib/e2a", database="postgresql://e2a:hunter2-secret@db:5432/e2a",
        http="127.0.0.1:8080", smtp="0.0.0.0:25", shared_domain="agents.example.com",
        smtp_domain="mx.example.com", processes=2,
    )
    [event] = events
    text = formatEvent(event)
    for expected in ("/etc/e2a/e2a.yaml", "E2A_DATABASE_URL, E2A_SHARED_DOMAIN", "/var/lib/e2a",
                     "postgresql://e2a:***@db:5432/e2a", "127.0.0.1:8080", "0.0.0.0:25", "agents.example.com"):
        assert expected in text
    assert "hunter2" not in text and "hunter2" not in json.dumps(_json_lines(events))


def test_quiet_pool_connections_log_no_factory_lines():
    """The webhook client's connection pool builds factories that do not log start/stop."""
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool

    pool = quiet_pool(HTTPConnectionPool(reactor, persistent=False))
    assert pool._factory.noisy is False


def test_webhook_guide_embeds_the_tested_example_verbatim():
    """docs/webhooks.md shows exactly the receiver that tests/integration/test_mail_flow_docs.py runs."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    example = (root / "docs" / "examples" / "webhook_receiver.py").read_text("utf-8")
    guide = (root / "docs" / "webhooks.md").read_text("utf-8")
    assert "```python\n" + example + "```\n" in guide


def test_child_mail_events_reach_the_parent_with_their_fields(events):
    """processes: N — a child's mail-flow event crosses the pipe as one marked line and is
    re-emitted in the parent with every field (so a JSON log keeps them) plus the process index."""
    from e2a.logsetup import STRUCTURED_MARK, child_log_observer, relay_structured

    pipe = io.StringIO()
    observer = child_log_observer(Config(logging=LoggingConfig(level="info")), pipe)
    globalLogPublisher.addObserver(observer)
    try:
        maillog.refused(code=451, reason="4.3.0 Temporary failure", client_ip="192.0.2.9", mail_from="a@b.example")
    finally:
        globalLogPublisher.removeObserver(observer)
    [line] = pipe.getvalue().splitlines()
    assert line.startswith(STRUCTURED_MARK)
    events.clear()
    assert relay_structured(line, 3) is True
    [event] = events
    assert event["code"] == 451 and event["process"] == 3 and event["event"] == maillog.EVENT_REFUSED
    assert formatEvent(event).startswith("[process 3] refused 451 from 192.0.2.9")
    assert relay_structured("[e2a#info] something else", 3) is False
