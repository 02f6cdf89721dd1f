"""NUL (``%00`` / ``\\u0000``) in paths, queries and header-bound fields never reaches SQL and
never becomes a 500: each value answers the route's own 400/404 of the API contract, and no
database error text reaches a response in any mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq

from e2a.store import accounts
from tests.support.apiserver import Response

AGENT = "alpha@agents.test"
OTHER = "beta@agents.test"
MSG = "msg_" + "0" * 32

# (method, path with %00, status, code): every route taking a path or query value.
NUL_REQUESTS = [
    ("GET", "/api/v1/agents/a%00b@agents.test", 404, "agent_not_found"),
    ("PUT", "/api/v1/agents/a%00b@agents.test", 404, "agent_not_found"),
    ("DELETE", "/api/v1/agents/a%00b@agents.test", 404, "agent_not_found"),
    ("POST", "/api/v1/agents/a%00b@agents.test/test", 404, "agent_not_found"),
    ("GET", "/api/v1/agents/a%00b@agents.test/messages", 404, "agent_not_found"),
    ("GET", "/api/v1/agents/a%00b@agents.test/deliveries", 404, "agent_not_found"),
    ("GET", "/api/v1/agents/%00/messages/" + MSG, 404, "agent_not_found"),
    ("GET", f"/api/v1/agents/{AGENT}/messages/msg_%00", 404, "message_not_found"),
    ("POST", f"/api/v1/agents/{AGENT}/messages/msg_%00/reply", 404, "message_not_found"),
    ("POST", f"/api/v1/agents/{AGENT}/messages/msg_%00/redeliver", 404, "message_not_found"),
    ("GET", f"/api/v1/agents/{AGENT}/messages/{MSG}%00", 404, "message_not_found"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?message_id=%00", 400, "invalid_field"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?message_id={MSG}%00", 400, "invalid_field"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?status=%00", 400, "invalid_field"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?token=%00", 400, "invalid_pagination_token"),
    ("GET", f"/api/v1/agents/{AGENT}/messages?token=%00", 400, "invalid_pagination_token"),
    ("GET", "/api/v1/messages?status=%00", 400, "invalid_field"),
    ("GET", "/api/v1/messages/msg_%00", 404, "message_not_found"),
    ("POST", "/api/v1/messages/msg_%00/approve", 404, "message_not_found"),
    ("POST", "/api/v1/messages/msg_%00/reject", 404, "message_not_found"),
    ("GET", "/api/v1/agents/a%00b@agents.test/ws", 404, "agent_not_found"),
    ("DELETE", "/api/v1/keys/apk_%00", 404, "key_not_found"),
    ("DELETE", "/api/v1/keys/apk_" + "0" * 32 + "%00", 404, "key_not_found"),
    ("DELETE", "/api/v1/users/me/signing-secrets/wsec_%00", 404, "signing_secret_not_found"),
    ("POST", "/api/v1/domains/a%00b.example/verify", 404, "domain_not_found"),
    ("DELETE", "/api/v1/domains/a%00b.example", 404, "domain_not_found"),
    ("DELETE", "/api/v1/users/me?confirm=%00", 400, "confirmation_required"),
]


class Client:
    def __init__(self, service: Any, key: str) -> None:
        self.base = f"http://127.0.0.1:{service.http_port.getHost().port}"
        self.key = key

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        resp = await treq.request(
            method, self.base + path, data=data, headers={"Authorization": f"Bearer {self.key}"}, persistent=False
        )
        return Response(resp.code, resp.headers, await treq.content(resp))


async def _service_with_agent(factory: Any, **overrides: Any) -> tuple[Any, Client]:
    service = await factory(**overrides)
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    api = Client(service, boot.api_key_plaintext)
    for slug in ("alpha", "beta"):
        r = await api.call("POST", "/api/v1/agents", {"slug": slug, "agent_mode": "local", "name": slug})
        assert r.code == 201, r.body
    return service, api


@pytest_twisted.ensureDeferred
async def test_nul_in_path_or_query_answers_contract_code_not_500(e2a_service_factory):
    """Every route with a path or query value: %00 gives its 400/404, never 500 or SQL text."""
    _, api = await _service_with_agent(e2a_service_factory)
    seen = []
    for method, path, _status, _code in NUL_REQUESTS:
        r = await api.call(method, path)
        seen.append((method, path, r.code, r.json()["error"]["code"]))
        assert b"NUL" not in r.body and b"0x00" not in r.body
    assert seen == [(m, p, s, c) for m, p, s, c in NUL_REQUESTS]
    for page in ("/api/v1/approve?t=%00", "/api/v1/reject?t=a%00b"):  # magic-link pages (HTML)
        r = await api.call("GET", page)
        assert r.code < 500 and b"NUL" not in r.body, (page, r.code)


HEADER_BOUND = [
    ("subject", {"subject": "a\u0000b"}),
    ("conversation_id", {"conversation_id": "c\u0000d"}),
    ("attachment filename", {"attachments": [{"filename": "a\u0000.txt", "content_type": "text/plain", "data": "eA=="}]}),
    ("attachment content_type", {"attachments": [{"filename": "a.txt", "content_type": "text/\u0000plain", "data": "eA=="}]}),
]


@pytest.mark.parametrize(("field", "extra"), HEADER_BOUND)
@pytest_twisted.ensureDeferred
async def test_nul_in_header_bound_send_field_is_invalid_header_value(e2a_service_factory, field, extra):
    """api.md §0.11: NUL in subject, conversation_id, attachment filename/content type → invalid_header_value."""
    service, api = await _service_with_agent(e2a_service_factory)
    body = {"from": AGENT, "to": [OTHER], "subject": "s", "body": "b", **extra}
    r = await api.call("POST", "/api/v1/send", body)
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_header_value"), r.body
    assert field in r.json()["error"]["message"]
    assert await service.db.fetchall("SELECT id FROM messages WHERE direction = 'outbound'") == []


@pytest_twisted.ensureDeferred
async def test_nul_in_body_stays_invalid_request_body(e2a_service_factory):
    """NUL in the mail body (not header-bound) and in a JSON key stays invalid_request_body."""
    _, api = await _service_with_agent(e2a_service_factory)
    r = await api.call("POST", "/api/v1/send", {"from": AGENT, "to": [OTHER], "subject": "s", "body": "a\u0000b"})
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_request_body")
    r = await api.call("POST", "/api/v1/send", {"from": AGENT, "to": [OTHER], "subject": "s", "body": "b", "x\u0000": 1})
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_request_body")


@pytest_twisted.ensureDeferred
async def test_nul_in_reply_header_bound_fields_is_invalid_header_value(e2a_service_factory):
    """A reply's conversation_id and attachment filename with NUL → invalid_header_value."""
    _, api = await _service_with_agent(e2a_service_factory)
    sent = await api.call("POST", "/api/v1/send", {"from": OTHER, "to": [AGENT], "subject": "s", "body": "b"})
    assert sent.code == 200, sent.body
    [msg] = (await api.call("GET", f"/api/v1/agents/{AGENT}/messages")).json()["messages"]
    path = f"/api/v1/agents/{AGENT}/messages/{msg['message_id']}/reply"
    for extra in ({"conversation_id": "c\u0000"}, HEADER_BOUND[2][1]):
        r = await api.call("POST", path, {"body": "ok", **extra})
        assert (r.code, r.json()["error"]["code"]) == (400, "invalid_header_value"), (extra, r.body)


@pytest_twisted.ensureDeferred
async def test_nul_in_agent_name_is_invalid_header_value(e2a_service_factory):
    """Agent name with NUL on create and update → invalid_header_value (api.md §4.2 step 6)."""
    _, api = await _service_with_agent(e2a_service_factory)
    r = await api.call("POST", "/api/v1/agents", {"slug": "gamma", "agent_mode": "local", "name": "B\u0000"})
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_header_value"), r.body
    r = await api.call("PUT", f"/api/v1/agents/{AGENT}", {"name": "A\u0000"})
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_header_value"), r.body
    # the check order still holds: an invalid slug is reported before the name (step 4 < 6)
    r = await api.call("POST", "/api/v1/agents", {"slug": "-", "agent_mode": "local", "name": "B\u0000"})
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_slug"), r.body


@pytest.mark.parametrize("env", ["development", "production"])
@pytest_twisted.ensureDeferred
async def test_unexpected_error_text_never_reaches_response(api_server_factory, db, env):
    """A route failing with a database-looking error: 500 internal_error, no error text, in any mode."""
    import dataclasses

    from tests.support.apiserver import make_test_config

    config = make_test_config()
    if env == "production":
        config = dataclasses.replace(config, env="production")
    api = await api_server_factory(config=config)

    @api.app.router.route("/boom", methods=["GET"])
    def boom(request: Any) -> bytes:
        raise ValueError('relation "secret_table" does not exist: SELECT password FROM users')

    r = await api.request("GET", "/boom")
    assert (r.code, r.json()["error"]["code"]) == (500, "internal_error")
    assert b"secret_table" not in r.body and b"SELECT" not in r.body
