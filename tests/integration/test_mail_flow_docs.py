"""A real e2a service, a real SMTP message and a real webhook: the receiver example of
docs/webhooks.md verifies it, the Standard Webhooks library verifies it with the ``whsec_`` form,
and the mail-flow log lines (docs/logging.md) cover the whole path without leaking secrets."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standardwebhooks.webhooks import Webhook

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from e2a import maillog
from e2a.config import Config, DnsConfig, LoggingConfig, WebhooksConfig
from e2a.logsetup import build_log_observer
from e2a.store import accounts
from tests.support.mail import make_message, send_mail
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "webhook_receiver.py"


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


receiver = _load_example()


class _Receiver(resource.Resource):
    """The example's verify() behind a twisted.web endpoint: 204 when it verifies, 401 if not."""

    isLeaf = True

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets
        self.got: list[tuple[dict[str, str], bytes, Any]] = []
        self.arrived: defer.Deferred[None] = defer.Deferred()

    def render_POST(self, request):  # noqa: N802 - twisted.web API
        headers = {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        try:
            outcome: Any = receiver.verify(headers, body, self.secrets)
            request.setResponseCode(204)
        except ValueError as e:
            outcome = e
            request.setResponseCode(401)
        self.got.append((headers, body, outcome))
        if not self.arrived.called:
            self.arrived.callback(None)
        return b""


@pytest.fixture
def captured():
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


async def _webhook_round_trip(e2a_service_factory, dns_zone, captured):
    service = await e2a_service_factory(
        dns=DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=2),
        webhooks=WebhooksConfig(allow_private=True),
    )
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    sink = _Receiver([boot.signing_secret])
    site = server.Site(sink)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        await service.db.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
            " VALUES ('bot@agents.test', %s, 'agents.test', 'cloud', %s, 'active')",
            (boot.user.id, f"http://127.0.0.1:{port.getHost().port}/hook"),
        )
        message = make_message(from_addr="alice@example.org", to_addr="bot@agents.test")
        refused = await send_mail(service.smtp_port.getHost().port, "mallory@example.org", ["nobody@agents.test"], b"")
        assert refused.code == 550, refused
        reply = await send_mail(service.smtp_port.getHost().port, "alice@example.org", ["bot@agents.test"], message)
        assert reply.code == 250, reply
        await sink.arrived

        async def attempt_logged() -> bool:
            return any(e.get("event") == maillog.EVENT_WEBHOOK for e in captured)

        await wait_for(attempt_logged, timeout=10)
    finally:
        await port.stopListening()
    return service, boot, sink, reply.text.rsplit(" ", 1)[1], message


@pytest_twisted.ensureDeferred
async def test_receiver_example_verifies_a_real_webhook(e2a_service_factory, dns_zone, captured):
    """The docs example accepts e2a's webhook; the whsec_ form verifies in standardwebhooks; raw hex does not."""
    _service, boot, sink, msg_id, _message = await _webhook_round_trip(e2a_service_factory, dns_zone, captured)
    headers, body, outcome = sink.got[0]
    assert isinstance(outcome, dict), outcome
    assert outcome["message_id"] == msg_id and outcome["auth_headers"]["X-E2A-Auth-Sender"] == "alice@example.org"
    # A wrong secret or a changed body is refused by the example.
    with pytest.raises(ValueError):
        receiver.verify(headers, body, ["0" * 64])
    with pytest.raises(ValueError):
        receiver.verify(headers, body.replace(b'"attempt":1', b'"attempt":2'), [boot.signing_secret])
    # Standard Webhooks: the whsec_ form bootstrap prints verifies; the raw hex string does not.
    sw_headers = {k: v for k, v in headers.items() if k.lower().startswith("webhook-")}
    whsec = "whsec_" + base64.b64encode(boot.signing_secret.encode("ascii")).decode("ascii")
    assert Webhook(whsec).verify(body, sw_headers)["message_id"] == msg_id
    assert Webhook(boot.signing_secret.encode("ascii")).verify(body, sw_headers)["message_id"] == msg_id
    with pytest.raises(Exception):  # noqa: B017 - the library's own error class for a bad key
        Webhook(boot.signing_secret).verify(body, sw_headers)


@pytest_twisted.ensureDeferred
async def test_mail_flow_is_logged_from_smtp_accept_to_webhook(e2a_service_factory, dns_zone, captured):
    """One accepted line and one webhook line with their fields; no factory noise, no secrets, JSON parses."""
    service, boot, _sink, msg_id, message = await _webhook_round_trip(e2a_service_factory, dns_zone, captured)
    [acc] = [e for e in captured if e.get("event") == maillog.EVENT_ACCEPTED]
    assert acc["message_id"] == msg_id and acc["client_ip"] == "127.0.0.1"
    assert acc["mail_from_domain"] == "example.org" and acc["agents"] == ["bot@agents.test"]
    assert (acc["spf"], acc["dkim"], acc["dmarc"]) == ("pass", "none", "none")
    assert acc["size"] == len(message) and acc["ms"] >= 0
    [hook] = [e for e in captured if e.get("event") == maillog.EVENT_WEBHOOK]
    assert hook["delivery_id"].startswith("dlv_") and hook["message_id"] == msg_id
    assert hook["status"] == 204 and hook["outcome"] == "delivered" and hook["ms"] >= 0
    assert hook["next_retry_s"] is None and hook["attempt"] == 1
    [refused] = [e for e in captured if e.get("event") == maillog.EVENT_REFUSED]
    assert refused["code"] == 550 and "nobody@agents.test" in refused["reason"]
    assert refused["mail_from_domain"] == "example.org" and refused["client_ip"] == "127.0.0.1"
    [start] = [e for e in captured if e.get("event") == maillog.EVENT_STARTED]
    assert start["shared_domain"] == "agents.test" and start["http"].startswith("127.0.0.1:")

    texts = [formatEvent(e) for e in captured]
    # e2a's own connections (the webhook POST here) log no factory lines; the test's SMTP client may.
    assert not [t for t in texts if "factory" in t.lower() and "HTTP11ClientFactory" in t], texts
    out = io.StringIO()
    observer = build_log_observer(Config(logging=LoggingConfig(format="json")), out)
    for event in captured:
        observer(event)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {maillog.EVENT_ACCEPTED, maillog.EVENT_WEBHOOK} <= {line.get("event") for line in lines}
    everything = out.getvalue() + "\n".join(texts)
    for secret in (boot.signing_secret, boot.api_key_plaintext, service.master_key.hex(), service.hmac_secret):
        assert secret not in everything
    assert "Hi there." not in everything  # never the body


@pytest_twisted.ensureDeferred
async def test_start_creates_dkim_keys_and_server_record_removed_at_stop(e2a_service_factory):
    """At start the deployment DKIM keys exist and server.json names the sources; a clean stop removes it."""
    from e2a.outbound.dkimsign import deployment_key_path

    service = await e2a_service_factory()
    data_dir = Path(service.config.data_dir)
    for domain in ("agents.test", "mx.e2a.test"):  # the shared domain and M (= smtp.domain)
        assert deployment_key_path(data_dir.absolute(), domain).is_file()
    record = json.loads((data_dir / "server.json").read_text())
    assert record["shared_domain"] == "agents.test" and record["mail_domain"] == "mx.e2a.test"
    assert "env_keys" in record and "config_file" in record and record["pid"] > 0
    await service.stopService()
    assert not (data_dir / "server.json").exists()
