"""Account endpoints on a real socket: keys (§11), signing secrets (§10), export and delete (§12)."""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from e2a import crypto
from e2a.store import accounts
from tests.support.apiserver import TEST_MASTER_KEY, insert_user_with_key

TS_FRAC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
TS_SEC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def _setup(api_server_factory, db, email="owner@example.com"):
    api = await api_server_factory()
    user_id, key = await insert_user_with_key(db, email)
    secret_id = "wsec_" + user_id
    await db.execute(
        "INSERT INTO signing_secrets (id, user_id, name, secret, secret_prefix) VALUES (%s, %s, 'default', %s, 'aaaaaaaaaaaa')",
        (secret_id, user_id, crypto.encrypt(TEST_MASTER_KEY, b"a" * 64, secret_id)),
    )
    return api, user_id, key


async def _agent(db, user_id, address="Bot@acme.test"):
    domain = address.split("@")[1].lower()
    await db.execute(
        "INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, TRUE) ON CONFLICT DO NOTHING",
        (domain, user_id),
    )
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES (%s, %s, %s, 'local', 'none')",
        (address, user_id, domain),
    )
    return address


def _error(r, status, code):
    assert r.code == status, r.body
    assert r.json()["error"]["code"] == code, r.body
    assert r.header("Content-Type") == "application/json"


# ---------------------------------------------------------------- authentication and scope

ENDPOINTS = [
    ("POST", "/api/v1/keys"),
    ("GET", "/api/v1/keys"),
    ("DELETE", "/api/v1/keys/apk_00000000000000000000000000000000"),
    ("GET", "/api/v1/users/me/signing-secrets"),
    ("POST", "/api/v1/users/me/signing-secrets"),
    ("DELETE", "/api/v1/users/me/signing-secrets/wsec_00000000000000000000000000000000"),
    ("GET", "/api/v1/users/me/export"),
    ("DELETE", "/api/v1/users/me?confirm=DELETE"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest_twisted.ensureDeferred
async def test_account_endpoints_reject_bad_credentials(api_server_factory, db, method, path):
    """Missing → "authentication required"; malformed/unknown/revoked → one identical body; all with WWW-Authenticate."""
    api, user_id, key = await _setup(api_server_factory, db)
    missing = await api.request(method, path)
    _error(missing, 401, "unauthorized")
    assert missing.json()["error"]["message"] == "authentication required"
    assert missing.header("WWW-Authenticate") == 'Bearer realm="e2a"'
    extra, extra_plain = await accounts.create_api_key(db, user_id, "x")
    await accounts.revoke_api_key(db, user_id, extra.id)
    bodies = []
    for bad in ("nonsense", "e2a_" + "0" * 64, extra_plain):
        r = await api.request(method, path, key=bad)
        _error(r, 401, "unauthorized")
        assert r.header("WWW-Authenticate") == 'Bearer realm="e2a"'
        bodies.append(r.body)
    assert len(set(bodies)) == 1


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest_twisted.ensureDeferred
async def test_account_endpoints_refuse_agent_keys(api_server_factory, db, method, path):
    """An agent-scoped key gets 403 insufficient_scope before any lookup or body check."""
    api, user_id, _key = await _setup(api_server_factory, db)
    agent = await _agent(db, user_id)
    _k, agent_key = await accounts.create_api_key(db, user_id, "agent", agent)
    r = await api.request(method, path, key=agent_key, data=b"{not json")
    _error(r, 403, "insufficient_scope")


# ---------------------------------------------------------------- keys


@pytest_twisted.ensureDeferred
async def test_create_user_key_returns_plaintext_once(api_server_factory, db):
    """POST /api/v1/keys → 201 with the key; GET lists it without the key, newest first."""
    api, _user_id, key = await _setup(api_server_factory, db)
    r = await api.request("POST", "/api/v1/keys", key=key, json_body={"name": "ci"})
    assert r.code == 201, r.body
    body = r.json()
    assert list(body) == ["id", "name", "key", "key_prefix", "scope", "agent", "created_at"]
    assert re.fullmatch(r"apk_[0-9a-f]{32}", body["id"]) and re.fullmatch(r"e2a_[0-9a-f]{64}", body["key"])
    assert body["key_prefix"] == body["key"][:12] and body["scope"] == "user" and body["agent"] is None
    assert TS_FRAC.match(body["created_at"])
    assert r.header("Cache-Control") == "no-store"
    listed = (await api.request("GET", "/api/v1/keys", key=body["key"])).json()["keys"]
    assert listed[0]["id"] == body["id"] and "key" not in listed[0] and len(listed) == 2
    assert "last_used_at" in listed[0]  # the key was just used to list


@pytest_twisted.ensureDeferred
async def test_create_key_with_empty_body_is_user_scoped(api_server_factory, db):
    """An empty body is {}: a user key named ""."""
    api, _u, key = await _setup(api_server_factory, db)
    r = await api.request("POST", "/api/v1/keys", key=key)
    assert r.code == 201 and r.json()["name"] == "" and r.json()["scope"] == "user"


@pytest_twisted.ensureDeferred
async def test_create_agent_key_matches_agent_case_insensitively(api_server_factory, db):
    """agent names one of the user's agents in any case; the key is agent-scoped to the stored id."""
    api, user_id, key = await _setup(api_server_factory, db)
    agent = await _agent(db, user_id, "Bot@acme.test")
    r = await api.request("POST", "/api/v1/keys", key=key, json_body={"name": "bot", "agent": "BOT@ACME.TEST"})
    assert r.code == 201 and r.json()["scope"] == "agent" and r.json()["agent"] == agent


@pytest_twisted.ensureDeferred
async def test_create_agent_key_for_foreign_agent_is_404(api_server_factory, db):
    """Another user's agent answers like a missing one."""
    api, _u, key = await _setup(api_server_factory, db)
    other_id, _ = await insert_user_with_key(db, "other@example.com")
    foreign = await _agent(db, other_id, "x@other.test")
    for agent in (foreign, "nobody@nowhere.test"):
        r = await api.request("POST", "/api/v1/keys", key=key, json_body={"agent": agent})
        _error(r, 404, "agent_not_found")


@pytest.mark.parametrize(
    "body,code",
    [
        (b"{not json", "invalid_request_body"),
        (b"[]", "invalid_request_body"),
        (b'{"name": 5}', "invalid_request_body"),
        (b'{"agent": true}', "invalid_request_body"),
        (b'{"name": "' + b"x" * 101 + b'"}', "invalid_field"),
        (b'{"name": "' + b"x" * (64 * 1024) + b'"}', "body_too_large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_create_key_validates_body(api_server_factory, db, body, code):
    """Wrong JSON, wrong types, long names and oversize bodies are 400 with the spec's code."""
    api, _u, key = await _setup(api_server_factory, db)
    _error(await api.request("POST", "/api/v1/keys", key=key, data=body), 400, code)


@pytest_twisted.ensureDeferred
async def test_create_key_refuses_the_101st(api_server_factory, db):
    """100 active keys → 400 too_many_keys."""
    api, user_id, key = await _setup(api_server_factory, db)
    for i in range(99):
        await db.execute(
            "INSERT INTO api_keys (id, user_id, scope, name, key_hash, key_prefix) VALUES (%s, %s, 'user', '', %s, 'e2a_00000000')",
            (f"apk_{i:032x}", user_id, f"{i:064x}"),
        )
    _error(await api.request("POST", "/api/v1/keys", key=key), 400, "too_many_keys")


@pytest_twisted.ensureDeferred
async def test_revoke_key_then_it_fails(api_server_factory, db):
    """DELETE → 204 empty; the revoked key is 401; again → 404 key_not_found."""
    api, _u, key = await _setup(api_server_factory, db)
    created = (await api.request("POST", "/api/v1/keys", key=key, json_body={"name": "tmp"})).json()
    r = await api.request("DELETE", f"/api/v1/keys/{created['id']}", key=key)
    assert r.code == 204 and r.body == b""
    _error(await api.request("GET", "/api/v1/keys", key=created["key"]), 401, "unauthorized")
    _error(await api.request("DELETE", f"/api/v1/keys/{created['id']}", key=key), 404, "key_not_found")


@pytest_twisted.ensureDeferred
async def test_key_may_revoke_itself_unless_last(api_server_factory, db):
    """A key revokes itself when another user key remains; the last one is 400 last_user_key."""
    api, _u, key = await _setup(api_server_factory, db)
    created = (await api.request("POST", "/api/v1/keys", key=key)).json()
    assert (await api.request("DELETE", f"/api/v1/keys/{created['id']}", key=created["key"])).code == 204
    keys = (await api.request("GET", "/api/v1/keys", key=key)).json()["keys"]
    assert len(keys) == 1
    _error(await api.request("DELETE", f"/api/v1/keys/{keys[0]['id']}", key=key), 400, "last_user_key")


@pytest_twisted.ensureDeferred
async def test_revoke_foreign_or_unknown_key_is_404(api_server_factory, db):
    """Another user's key id and a malformed id are both key_not_found."""
    api, _u, key = await _setup(api_server_factory, db)
    other_id, _ = await insert_user_with_key(db, "other@example.com")
    foreign, _ = await accounts.create_api_key(db, other_id, "x")
    for key_id in (foreign.id, "apk_nope", foreign.id.upper()):
        _error(await api.request("DELETE", f"/api/v1/keys/{key_id}", key=key), 404, "key_not_found")


# ---------------------------------------------------------------- signing secrets


@pytest_twisted.ensureDeferred
async def test_signing_secret_create_list_delete(api_server_factory, db):
    """POST → 201 with the secret once; GET never shows it; DELETE → 204."""
    api, user_id, key = await _setup(api_server_factory, db)
    r = await api.request("POST", "/api/v1/users/me/signing-secrets", key=key, json_body={"name": "  rot  "})
    assert r.code == 201, r.body
    body = r.json()
    assert list(body) == ["id", "name", "secret", "secret_prefix", "created_at"]
    assert body["name"] == "rot" and re.fullmatch(r"[0-9a-f]{64}", body["secret"])
    assert body["secret_prefix"] == body["secret"][:12] and TS_SEC.match(body["created_at"])
    assert (await accounts.active_secrets(db, TEST_MASTER_KEY, user_id))[0] == body["secret"]
    listed = (await api.request("GET", "/api/v1/users/me/signing-secrets", key=key)).json()["secrets"]
    assert [s["id"] for s in listed][0] == body["id"] and len(listed) == 2
    assert all("secret" not in s and "last_signed_at" not in s for s in listed)
    r = await api.request("DELETE", f"/api/v1/users/me/signing-secrets/{body['id']}", key=key)
    assert r.code == 204 and r.body == b""


@pytest_twisted.ensureDeferred
async def test_signing_secret_blank_name_becomes_unnamed(api_server_factory, db):
    """No body or a blank name → "unnamed"; over 100 chars → invalid_field."""
    api, _u, key = await _setup(api_server_factory, db)
    r = await api.request("POST", "/api/v1/users/me/signing-secrets", key=key)
    assert r.code == 201 and r.json()["name"] == "unnamed"
    r = await api.request("POST", "/api/v1/users/me/signing-secrets", key=key, json_body={"name": "y" * 101})
    _error(r, 400, "invalid_field")
    big = b'{"name":"' + b"z" * (65 * 1024) + b'"}'
    _error(await api.request("POST", "/api/v1/users/me/signing-secrets", key=key, data=big), 400, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_signing_secret_cap_and_floor(api_server_factory, db):
    """The sixth secret is too_many_secrets; deleting the only one is last_signing_secret."""
    api, _u, key = await _setup(api_server_factory, db)
    for _ in range(4):
        assert (await api.request("POST", "/api/v1/users/me/signing-secrets", key=key)).code == 201
    _error(await api.request("POST", "/api/v1/users/me/signing-secrets", key=key), 400, "too_many_secrets")
    secrets = (await api.request("GET", "/api/v1/users/me/signing-secrets", key=key)).json()["secrets"]
    for s in secrets[:-1]:
        assert (await api.request("DELETE", f"/api/v1/users/me/signing-secrets/{s['id']}", key=key)).code == 204
    r = await api.request("DELETE", f"/api/v1/users/me/signing-secrets/{secrets[-1]['id']}", key=key)
    _error(r, 400, "last_signing_secret")


@pytest_twisted.ensureDeferred
async def test_delete_foreign_signing_secret_is_404_first(api_server_factory, db):
    """A foreign or unknown id is signing_secret_not_found, even when the caller has one secret."""
    api, _u, key = await _setup(api_server_factory, db)
    other_id, _ = await insert_user_with_key(db, "other@example.com")
    await db.execute(
        "INSERT INTO signing_secrets (id, user_id, name, secret, secret_prefix) VALUES ('wsec_other', %s, 'd', 'v1:x', 'x')",
        (other_id,),
    )
    for secret_id in ("wsec_other", "wsec_missing"):
        r = await api.request("DELETE", f"/api/v1/users/me/signing-secrets/{secret_id}", key=key)
        _error(r, 404, "signing_secret_not_found")


# ---------------------------------------------------------------- export and delete


@pytest_twisted.ensureDeferred
async def test_export_shape_and_attachment_header(api_server_factory, db):
    """Export is an attachment named after the user with every §12.1 list ([] when empty)."""
    api, user_id, key = await _setup(api_server_factory, db)
    r = await api.request("GET", "/api/v1/users/me/export", key=key)
    assert r.code == 200, r.body
    assert r.header("Content-Disposition") == f'attachment; filename="e2a-export-{user_id}.json"'
    doc = r.json()
    assert list(doc) == [
        "generated_at", "schema_version", "user", "domains", "agents", "api_keys",
        "signing_secrets", "messages", "deliveries",
    ]
    assert TS_FRAC.match(doc["generated_at"]) and doc["schema_version"] == "1"
    assert doc["user"]["id"] == user_id and set(doc["user"]) == {"id", "email", "name", "created_at"}
    assert doc["domains"] == [] and doc["agents"] == [] and doc["messages"] == [] and doc["deliveries"] == []
    (k,) = doc["api_keys"]
    assert k["scope"] == "user" and k["agent"] is None and "key_hash" not in k
    assert doc["signing_secrets"][0]["secret_prefix"] == "aaaaaaaaaaaa"
    assert b"v1:" not in r.body and b"a" * 64 not in r.body


@pytest_twisted.ensureDeferred
async def test_delete_user_requires_confirmation(api_server_factory, db):
    """Without confirm=DELETE exactly → 400 confirmation_required."""
    api, _u, key = await _setup(api_server_factory, db)
    for path in ("/api/v1/users/me", "/api/v1/users/me?confirm=delete", "/api/v1/users/me?confirm=yes"):
        _error(await api.request("DELETE", path, key=key), 400, "confirmation_required")


@pytest_twisted.ensureDeferred
async def test_delete_user_reports_counts_and_keys_stop_working(api_server_factory, db):
    """DELETE confirm=DELETE → 200 counts; afterwards the key is 401."""
    api, user_id, key = await _setup(api_server_factory, db)
    agent = await _agent(db, user_id)
    await accounts.create_api_key(db, user_id, "agent", agent)
    r = await api.request("DELETE", "/api/v1/users/me?confirm=DELETE", key=key)
    assert r.code == 200, r.body
    assert r.body.decode() == (
        '{"usage_events_deleted":0,"usage_summaries_deleted":0,"messages_deleted":0,"agents_deleted":1,'
        '"domains_deleted":1,"api_keys_deleted":2,"sessions_deleted":0,"user_deleted":true,'
        '"signing_secrets_deleted":1,"deliveries_deleted":0}'
    )
    _error(await api.request("GET", "/api/v1/keys", key=key), 401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_wrong_method_on_account_paths_is_405(api_server_factory, db):
    """Known paths with other methods answer 405 with Allow."""
    api, _u, key = await _setup(api_server_factory, db)
    r = await api.request("PUT", "/api/v1/keys", key=key)
    _error(r, 405, "method_not_allowed")
    assert "POST" in r.header("Allow") and "GET" in r.header("Allow")
    _error(await api.request("GET", "/api/v1/users/me", key=key), 405, "method_not_allowed")
