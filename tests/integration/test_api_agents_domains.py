"""Agents (api.md §4.1–4.5), domains (§9) and feedback (§3.5) on a real socket, with the
loopback DNS zone for TXT verification and webhook host resolution."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import secrets
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.config import DomainsConfig, HttpConfig, RateLimitConfig, WebhooksConfig
from e2a.mailauth.dkimkeys import DkimKeyPair
from e2a.mailauth.dns import DnsClient
from e2a.store.events import CHANNEL_REVOKE, EventListener
from tests.support.apiserver import insert_user_with_key, make_test_config
from tests.support.dnsserver import start_dns_server
from tests.support.waiting import wait_for

PUBLIC_HOOK = "https://hook.example.net/inbox"  # resolves to a public-looking address; never contacted
EVIL_HOOK = "https://evil.example.net/inbox"  # resolves to 127.0.0.1
ZONE: dict[str, Any] = {
    "hook.example.net": {"A": ["93.184.216.34"]},
    "evil.example.net": {"A": ["127.0.0.1"]},
    "broken.example": "SERVFAIL",
}
_fake_keys = itertools.count()


async def fake_keygen() -> DkimKeyPair:
    n = next(_fake_keys)
    return DkimKeyPair(b"fake", base64.b64encode(f"pub{n}".encode()).decode())


@pytest.fixture
def zone():
    handle = pytest_twisted.blockon(defer.ensureDeferred(start_dns_server(reactor, ZONE, ttl=0)))
    yield handle
    pytest_twisted.blockon(defer.ensureDeferred(handle.stop()))


@pytest.fixture
def make_api(api_server_factory, zone):
    """``await make_api(**config_overrides)``: a server whose resolver is the loopback zone."""

    async def make(fast_keys: bool = True, **overrides):
        overrides.setdefault("rate_limits", RateLimitConfig(register_per_hour=1000, feedback_per_hour=1000))
        dns = DnsClient(zone.nameservers, timeout=2, reactor=reactor)
        api = await api_server_factory(config=make_test_config(**overrides), dns=dns)
        if fast_keys:
            api.deps.services = dataclasses.replace(api.deps.services, dkim_keygen=fake_keygen)
        return api

    return make


async def agent_key(db, user_id: str, agent_id: str) -> str:
    key = "e2a_" + secrets.token_hex(32)
    await db.execute(
        "INSERT INTO api_keys (id, user_id, agent_id, scope, key_hash, key_prefix)"
        " VALUES (%s, %s, %s, 'agent', %s, %s)",
        ("apk_" + secrets.token_hex(16), user_id, agent_id, hashlib.sha256(key.encode()).hexdigest(), key[:12]),
    )
    return key


async def verified_domain(api, key: str, domain: str) -> None:
    r = await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": domain})
    assert r.code == 201, r.body
    await api.db.execute("UPDATE domains SET verified = TRUE, verified_at = now() WHERE domain = %s", (domain,))


async def slug_agent(api, key: str, slug: str, **fields) -> Any:
    body = {"slug": slug, "agent_mode": "local", **fields}
    return await api.request("POST", "/api/v1/agents", key=key, json_body=body)


def code_of(r) -> tuple[int, str]:
    return r.code, r.json()["error"]["code"]


# ============================================================================== domains


@pytest_twisted.ensureDeferred
async def test_domains_refused_without_key_or_with_agent_key(make_api):
    """401 without a key (with WWW-Authenticate); 403 insufficient_scope for agent keys."""
    api = await make_api()
    r = await api.request("GET", "/api/v1/domains")
    assert code_of(r) == (401, "unauthorized") and r.header("WWW-Authenticate") == 'Bearer realm="e2a"'
    user, key = await insert_user_with_key(api.db)
    await slug_agent(api, key, "bot")
    akey = await agent_key(api.db, user, "bot@agents.test")
    for method, path in [
        ("GET", "/api/v1/domains"),
        ("POST", "/api/v1/domains"),
        ("POST", "/api/v1/domains/example.com/verify"),
        ("DELETE", "/api/v1/domains/example.com"),
    ]:
        r = await api.request(method, path, key=akey, json_body={"domain": "example.com"} if method == "POST" else None)
        assert code_of(r) == (403, "insufficient_scope"), (method, path)


@pytest_twisted.ensureDeferred
async def test_domain_created_with_dns_records_and_real_dkim_key(make_api):
    """POST creates an unverified domain with MX, TXT and DKIM records (real RSA key)."""
    api = await make_api(fast_keys=False)
    _, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": "Example.COM."})
    assert r.code == 201
    body = r.json()
    assert body["domain"] == "example.com" and body["verified"] is False and "verified_at" not in body
    assert body["verification_token"].startswith("e2a-verify=")
    records = body["dns_records"]
    assert records["mx"] == {"host": "@", "value": "e2a.example.com", "priority": 10}
    assert records["txt"] == {"host": "@", "value": body["verification_token"]}
    assert records["dkim"]["host"].startswith("e2a20") and records["dkim"]["host"].endswith("._domainkey")
    assert records["dkim"]["value"].startswith("v=DKIM1; k=rsa; p=MIIBIjAN")  # 2048-bit SPKI
    assert body["created_at"].endswith("Z") and len(body["created_at"]) == 27
    assert r.header("Cache-Control") == "no-store"


@pytest_twisted.ensureDeferred
async def test_domain_idna_name_stored_as_a_label(make_api):
    """A U-label domain is stored and returned as its A-label."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": "Bücher.example"})
    assert r.code == 201 and r.json()["domain"] == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, (400, "missing_field")),
        ({"domain": ""}, (400, "missing_field")),
        ({"domain": "  "}, (400, "missing_field")),
        ({"domain": 5}, (400, "invalid_request_body")),
        ({"domain": "no_underscores.example"}, (400, "invalid_domain")),
        ({"domain": "single"}, (400, "invalid_domain")),
        ({"domain": "AGENTS.test."}, (400, "reserved_domain")),
        ({"domain": "e2a.example.com"}, (400, "reserved_domain")),
        ({"domain": "out.example.org"}, (400, "reserved_domain")),
    ],
)
@pytest_twisted.ensureDeferred
async def test_domain_create_refused_when_invalid(make_api, body, expected):
    """Empty, malformed and deployment-reserved (shared, smtp.domain, M) domains."""
    from e2a.config import OutboundSmtpConfig

    api = await make_api(outbound_smtp=OutboundSmtpConfig(from_domain="out.example.org"))
    _, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/domains", key=key, json_body=body)
    assert code_of(r) == expected


@pytest_twisted.ensureDeferred
async def test_domain_create_refused_when_body_bad(make_api):
    """Invalid JSON → invalid_request_body; over 64 KiB → body_too_large."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/domains", key=key, data=b"{not json")
    assert code_of(r) == (400, "invalid_request_body")
    big = b'{"domain":"example.com","pad":"' + b"x" * (64 * 1024) + b'"}'
    r = await api.request("POST", "/api/v1/domains", key=key, data=big)
    assert code_of(r) == (400, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_domain_claim_rules_between_users(make_api):
    """Own re-registration is unchanged; another user's claim is refused (unverified < 72 h,
    or verified); after 72 h an unverified claim is taken over."""
    api = await make_api()
    _, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    first = (await api.request("POST", "/api/v1/domains", key=alice, json_body={"domain": "example.com"})).json()
    again = await api.request("POST", "/api/v1/domains", key=alice, json_body={"domain": "EXAMPLE.com"})
    assert again.code == 201 and again.json() == first
    r = await api.request("POST", "/api/v1/domains", key=bob, json_body={"domain": "example.com"})
    assert code_of(r) == (400, "domain_not_available")
    await api.db.execute("UPDATE domains SET claimed_at = now() - interval '72 hours'")
    r = await api.request("POST", "/api/v1/domains", key=bob, json_body={"domain": "example.com"})
    assert r.code == 201 and r.json()["verification_token"] != first["verification_token"]
    assert r.json()["dns_records"]["dkim"] != first["dns_records"]["dkim"]
    assert (await api.request("GET", "/api/v1/domains", key=alice)).json() == {"domains": []}
    await api.db.execute("UPDATE domains SET verified = TRUE, verified_at = now(), claimed_at = now() - interval '1000 hours'")
    r = await api.request("POST", "/api/v1/domains", key=alice, json_body={"domain": "example.com"})
    assert code_of(r) == (400, "domain_not_available")


@pytest_twisted.ensureDeferred
async def test_domain_list_shows_own_newest_first(make_api):
    """GET lists only the caller's domains, newest first."""
    api = await make_api()
    _, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    for name in ("one.example", "two.example"):
        await api.request("POST", "/api/v1/domains", key=alice, json_body={"domain": name})
    await api.request("POST", "/api/v1/domains", key=bob, json_body={"domain": "three.example"})
    r = await api.request("GET", "/api/v1/domains", key=alice)
    assert r.code == 200 and [d["domain"] for d in r.json()["domains"]] == ["two.example", "one.example"]


@pytest_twisted.ensureDeferred
async def test_domain_verify_through_dns_txt(make_api, zone):
    """NXDOMAIN → 412 with the token; SERVFAIL → 400 dns_lookup_failed; a TXT record
    containing the token (split strings) → verified; verifying again keeps verified_at."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    token = (await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": "good.example"})).json()[
        "verification_token"
    ]
    r = await api.request("POST", "/api/v1/domains/good.example/verify", key=key)
    assert code_of(r) == (412, "dns_record_not_found") and token in r.json()["error"]["message"]
    zone.add("good.example", "TXT", "v=spf1 -all")
    r = await api.request("POST", "/api/v1/domains/good.example/verify", key=key)
    assert code_of(r) == (412, "dns_record_not_found")
    zone.add("good.example", "TXT", [token[:10], token[10:]])
    r = await api.request("POST", "/api/v1/domains/GOOD.example./verify", key=key)
    assert r.code == 200
    body = r.json()
    assert body["domain"] == "good.example" and body["verified"] is True and body["verified_at"].endswith("Z")
    zone.remove("good.example")
    again = await api.request("POST", "/api/v1/domains/good.example/verify", key=key)
    assert again.code == 200 and again.json() == body
    listed = (await api.request("GET", "/api/v1/domains", key=key)).json()["domains"][0]
    assert listed["verified"] is True and listed["verified_at"] == body["verified_at"]

    await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": "broken.example"})
    r = await api.request("POST", "/api/v1/domains/broken.example/verify", key=key)
    assert code_of(r) == (400, "dns_lookup_failed")


@pytest_twisted.ensureDeferred
async def test_domain_verify_skips_dns_when_auto_verify(make_api):
    """domains.auto_verify verifies without asking DNS."""
    api = await make_api(domains=DomainsConfig(auto_verify=True))
    _, key = await insert_user_with_key(api.db)
    await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": "nodns.example"})
    r = await api.request("POST", "/api/v1/domains/nodns.example/verify", key=key)
    assert r.code == 200 and r.json()["verified"] is True


@pytest_twisted.ensureDeferred
async def test_domain_verify_and_delete_not_found_for_foreign_or_missing(make_api):
    """Another user's domain and a missing one are the same 404 domain_not_found."""
    api = await make_api()
    _, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    await api.request("POST", "/api/v1/domains", key=alice, json_body={"domain": "example.com"})
    for path in ("/api/v1/domains/example.com/verify", "/api/v1/domains/missing.example/verify",
                 "/api/v1/domains/bad_name/verify"):
        assert code_of(await api.request("POST", path, key=bob)) == (404, "domain_not_found")
    for path in ("/api/v1/domains/example.com", "/api/v1/domains/missing.example"):
        assert code_of(await api.request("DELETE", path, key=bob)) == (404, "domain_not_found")


@pytest_twisted.ensureDeferred
async def test_domain_delete_refused_with_agents_then_204(make_api):
    """DELETE answers domain_has_agents while agents exist, then 204 with an empty body."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await verified_domain(api, key, "example.com")
    r = await api.request("POST", "/api/v1/agents", key=key, json_body={"email": "bot@example.com", "agent_mode": "local"})
    assert r.code == 201
    assert code_of(await api.request("DELETE", "/api/v1/domains/example.com", key=key)) == (400, "domain_has_agents")
    assert (await api.request("DELETE", "/api/v1/agents/bot@example.com", key=key)).code == 200
    r = await api.request("DELETE", "/api/v1/domains/Example.com", key=key)
    assert r.code == 204 and r.body == b""
    assert (await api.request("GET", "/api/v1/domains", key=key)).json() == {"domains": []}


# ============================================================================== agents: create


@pytest_twisted.ensureDeferred
async def test_agent_created_by_slug_with_defaults(make_api):
    """Slug registration: 201 {id, domain, email}; GET shows the §2.1 defaults."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    r = await slug_agent(api, key, "my-bot", name="My Bot")
    assert r.code == 201 and r.json() == {"id": "my-bot@agents.test", "domain": "agents.test", "email": "my-bot@agents.test"}
    agent = (await api.request("GET", "/api/v1/agents/my-bot@agents.test", key=key)).json()
    created_at = agent.pop("created_at")
    assert created_at.endswith("Z") and len(created_at) == 27
    assert agent == {
        "id": "my-bot@agents.test", "domain": "agents.test", "email": "my-bot@agents.test",
        "name": "My Bot", "webhook_url": "", "agent_mode": "local", "domain_verified": True,
        "hitl_enabled": False, "hitl_ttl_seconds": 604800, "hitl_expiration_action": "reject",
        "hitl_notify": True, "hitl_reviewers": [], "webhook_status": "none",
    }


@pytest_twisted.ensureDeferred
async def test_agent_created_cloud_on_verified_custom_domain(make_api):
    """A cloud agent on an owned, verified domain with a public webhook host: status active;
    the local part keeps its case and lookups are case-insensitive (%40 or @)."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await verified_domain(api, key, "example.com")
    r = await api.request(
        "POST", "/api/v1/agents", key=key,
        json_body={"email": "Support.Bot@EXAMPLE.com", "webhook_url": PUBLIC_HOOK},
    )
    assert r.code == 201 and r.json()["id"] == "Support.Bot@example.com"
    for path in ("/api/v1/agents/support.bot@example.com", "/api/v1/agents/SUPPORT.BOT%40example.COM"):
        got = await api.request("GET", path, key=key)
        assert got.code == 200, path
        assert got.json()["id"] == "Support.Bot@example.com"
        assert got.json()["webhook_status"] == "active" and got.json()["webhook_url"] == PUBLIC_HOOK


@pytest_twisted.ensureDeferred
async def test_agent_create_refused_without_valid_user_key(make_api):
    """401 without or with a bad key; 403 for an agent key — even with an invalid slug."""
    api = await make_api()
    user, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/agents", json_body={"slug": "A!"})
    assert code_of(r) == (401, "unauthorized")
    r = await api.request("POST", "/api/v1/agents", key="e2a_" + "0" * 64, json_body={"slug": "ok-bot"})
    assert code_of(r) == (401, "unauthorized")
    await slug_agent(api, key, "bot")
    akey = await agent_key(api.db, user, "bot@agents.test")
    r = await api.request("POST", "/api/v1/agents", key=akey, json_body={"slug": "A!"})
    assert code_of(r) == (403, "insufficient_scope")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # 4: slug rules, one per category
        ({"slug": "a"}, "invalid_slug"),
        ({"slug": "x" * 41}, "invalid_slug"),
        ({"slug": "-bot"}, "invalid_slug"),
        ({"slug": "bot-"}, "invalid_slug"),
        ({"slug": "Bot"}, "invalid_slug"),
        ({"slug": "my_bot"}, "invalid_slug"),
        ({"slug": "admin"}, "invalid_slug"),
        ({"slug": "no-reply"}, "invalid_slug"),
        ({"slug": "Bot", "email": "bad"}, "invalid_slug"),  # 4 before 6
        # 5, 6
        ({}, "missing_field"),
        ({"email": ""}, "missing_field"),
        ({"email": "not-an-address"}, "invalid_email"),
        ({"email": "a..b@example.com"}, "invalid_email"),
        ({"email": '"q"@example.com'}, "invalid_email"),
        ({"email": "bad", "webhook_url": EVIL_HOOK}, "invalid_email"),  # 6 before 7
        ({"slug": "ok-bot", "name": "x\r\nBcc: y@z.com"}, "invalid_header_value"),
        ({"slug": "ok-bot", "name": "x" * 201}, "invalid_field"),
        # 7
        ({"slug": "ok-bot", "webhook_url": EVIL_HOOK}, "invalid_webhook_url"),
        ({"slug": "ok-bot", "webhook_url": "ftp://hook.example.net/"}, "invalid_webhook_url"),
        ({"slug": "ok-bot", "webhook_url": "https://127.0.0.1/x"}, "invalid_webhook_url"),
        ({"email": "a@nowhere.example", "webhook_url": EVIL_HOOK}, "invalid_webhook_url"),  # 7 before 8
        # 8
        ({"email": "a@nowhere.example", "agent_mode": "bogus"}, "domain_not_registered"),  # 8 before 9
        ({"email": "a@agents.test", "agent_mode": "local"}, "domain_not_registered"),  # shared only by slug
        ({"email": "a@e2a.example.com", "agent_mode": "local"}, "domain_not_registered"),
        ({"email": "a@pending.example", "agent_mode": "local"}, "domain_not_verified"),
        ({"email": "a@other.example", "agent_mode": "local"}, "domain_not_registered"),  # another user's
        # 9
        ({"slug": "ok-bot", "agent_mode": "hybrid"}, "invalid_field"),
        ({"slug": "ok-bot", "agent_mode": "Cloud", "webhook_url": PUBLIC_HOOK}, "invalid_field"),
        ({"slug": "ok-bot"}, "webhook_url_required"),
        ({"slug": "ok-bot", "agent_mode": "cloud", "webhook_url": ""}, "webhook_url_required"),
        # types
        ({"slug": 5}, "invalid_request_body"),
        ({"email": ["a@b.com"]}, "invalid_request_body"),
        ({"slug": "ok-bot", "agent_mode": "local", "name": 7}, "invalid_request_body"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_agent_create_refused_in_check_order(make_api, body, expected):
    """Each validation of api.md §4.2 answers its code; the first failing check wins."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db, "owner@example.org")
    _, other = await insert_user_with_key(api.db, "other@example.org")
    await verified_domain(api, other, "other.example")
    await api.request("POST", "/api/v1/domains", key=key, json_body={"domain": "pending.example"})
    r = await api.request("POST", "/api/v1/agents", key=key, json_body=body)
    assert code_of(r) == (400, expected), r.body


@pytest_twisted.ensureDeferred
async def test_agent_create_refused_when_body_bad(make_api):
    """Not JSON, not an object, or over 64 KiB."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    for data in (b"{", b"[1]", b"\xff\xfe"):
        assert code_of(await api.request("POST", "/api/v1/agents", key=key, data=data)) == (400, "invalid_request_body")
    big = b'{"slug":"ok-bot","name":"' + b"x" * (65 * 1024) + b'"}'
    assert code_of(await api.request("POST", "/api/v1/agents", key=key, data=big)) == (400, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_agent_create_refused_when_shared_domain_disabled(make_api):
    """A slug without a configured shared domain is shared_domain_disabled (before slug rules)."""
    api = await make_api(shared_domain="")
    _, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/agents", key=key, json_body={"slug": "Bad!"})
    assert code_of(r) == (400, "shared_domain_disabled")


@pytest_twisted.ensureDeferred
async def test_agent_create_conflict_case_insensitive_across_users(make_api):
    """An address taken by anyone (any case) is 409 agent_exists."""
    api = await make_api()
    _, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    assert (await slug_agent(api, alice, "bot")).code == 201
    assert code_of(await slug_agent(api, alice, "bot")) == (409, "agent_exists")
    assert code_of(await slug_agent(api, bob, "bot")) == (409, "agent_exists")
    await verified_domain(api, alice, "example.com")
    await api.request("POST", "/api/v1/agents", key=alice, json_body={"email": "Bot@example.com", "agent_mode": "local"})
    r = await api.request("POST", "/api/v1/agents", key=alice, json_body={"email": "bOT@Example.com", "agent_mode": "local"})
    assert code_of(r) == (409, "agent_exists")


@pytest_twisted.ensureDeferred
async def test_agent_create_rate_limited_per_ip_before_auth(make_api):
    """Every attempt counts (even unauthenticated); over the limit → 429 with Retry-After."""
    api = await make_api(rate_limits=RateLimitConfig(register_per_hour=2))
    _, key = await insert_user_with_key(api.db)
    assert (await api.request("POST", "/api/v1/agents", json_body={})).code == 401
    assert (await slug_agent(api, key, "bot")).code == 201
    r = await slug_agent(api, key, "bot2")
    assert code_of(r) == (429, "rate_limited")
    assert 1 <= int(r.header("Retry-After")) <= 3600
    # other endpoints are not affected
    assert (await api.request("GET", "/api/v1/agents", key=key)).code == 200


@pytest_twisted.ensureDeferred
async def test_agent_create_rate_limit_uses_forwarded_ip_from_trusted_proxy(make_api):
    """Behind a trusted proxy each X-Forwarded-For client has its own register bucket."""
    api = await make_api(
        rate_limits=RateLimitConfig(register_per_hour=1),
        http=HttpConfig(trusted_proxies=("127.0.0.1/32",)),
    )
    for client in ("198.51.100.1", "198.51.100.2"):
        r = await api.request("POST", "/api/v1/agents", json_body={}, headers={"X-Forwarded-For": client})
        assert r.code == 401
    r = await api.request("POST", "/api/v1/agents", json_body={}, headers={"X-Forwarded-For": "198.51.100.1"})
    assert r.code == 429


@pytest_twisted.ensureDeferred
async def test_agent_webhook_allowed_to_loopback_when_allow_private(make_api):
    """With webhooks.allow_private a loopback-resolving host is accepted."""
    api = await make_api(webhooks=WebhooksConfig(allow_private=True))
    _, key = await insert_user_with_key(api.db)
    r = await api.request("POST", "/api/v1/agents", key=key, json_body={"slug": "bot", "webhook_url": EVIL_HOOK})
    assert r.code == 201


# ============================================================================== agents: read


@pytest_twisted.ensureDeferred
async def test_agent_list_newest_first_and_scoped(make_api):
    """User keys list all own agents newest first; agent keys only their agent."""
    api = await make_api()
    alice_id, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    assert (await api.request("GET", "/api/v1/agents", key=alice)).json() == {"agents": []}
    for slug in ("first", "second"):
        await slug_agent(api, alice, slug)
    await slug_agent(api, bob, "bobs")
    r = await api.request("GET", "/api/v1/agents", key=alice)
    assert [a["id"] for a in r.json()["agents"]] == ["second@agents.test", "first@agents.test"]
    assert all("user_id" not in a for a in r.json()["agents"])
    akey = await agent_key(api.db, alice_id, "first@agents.test")
    r = await api.request("GET", "/api/v1/agents", key=akey)
    assert [a["id"] for a in r.json()["agents"]] == ["first@agents.test"]
    assert code_of(await api.request("GET", "/api/v1/agents")) == (401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_agent_get_not_found_for_foreign_or_other_agent_key(make_api):
    """Another user's agent, a missing one, or another agent for an agent key: 404."""
    api = await make_api()
    alice_id, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    await slug_agent(api, alice, "one")
    await slug_agent(api, alice, "two")
    akey = await agent_key(api.db, alice_id, "one@agents.test")
    assert code_of(await api.request("GET", "/api/v1/agents/one@agents.test", key=bob)) == (404, "agent_not_found")
    assert code_of(await api.request("GET", "/api/v1/agents/none@agents.test", key=alice)) == (404, "agent_not_found")
    assert code_of(await api.request("GET", "/api/v1/agents/two@agents.test", key=akey)) == (404, "agent_not_found")
    assert (await api.request("GET", "/api/v1/agents/ONE@agents.test", key=akey)).code == 200


# ============================================================================== agents: update


@pytest_twisted.ensureDeferred
async def test_agent_update_sets_hitl_fields_and_reviewers(make_api):
    """HITL fields, name and reviewers (lowercased, deduplicated) update; others are kept."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await slug_agent(api, key, "bot", name="Bot")
    r = await api.request(
        "PUT", "/api/v1/agents/BOT%40agents.test", key=key,
        json_body={
            "hitl_enabled": True, "hitl_ttl_seconds": 3600, "hitl_expiration_action": "approve",
            "hitl_notify": False, "hitl_reviewers": ["Rev <Rev@Example.com>", "rev@example.com", ""],
        },
    )
    assert r.code == 200
    body = r.json()
    assert body["hitl_enabled"] is True and body["hitl_ttl_seconds"] == 3600
    assert body["hitl_expiration_action"] == "approve" and body["hitl_notify"] is False
    assert body["hitl_reviewers"] == ["rev@example.com"] and body["name"] == "Bot"
    r = await api.request("PUT", "/api/v1/agents/bot@agents.test", key=key, json_body={"name": "New", "hitl_reviewers": []})
    assert r.json()["name"] == "New" and r.json()["hitl_reviewers"] == [] and r.json()["hitl_ttl_seconds"] == 3600


@pytest_twisted.ensureDeferred
async def test_agent_update_switches_modes(make_api):
    """local → cloud needs a webhook (then active); cloud → local clears it (status none)."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await slug_agent(api, key, "bot")
    path = "/api/v1/agents/bot@agents.test"
    r = await api.request("PUT", path, key=key, json_body={"agent_mode": "cloud"})
    assert code_of(r) == (400, "webhook_url_required")
    r = await api.request("PUT", path, key=key, json_body={"agent_mode": "cloud", "webhook_url": PUBLIC_HOOK})
    assert r.code == 200 and r.json()["agent_mode"] == "cloud" and r.json()["webhook_status"] == "active"
    r = await api.request("PUT", path, key=key, json_body={"webhook_url": ""})
    assert code_of(r) == (400, "webhook_url_required")
    r = await api.request("PUT", path, key=key, json_body={"agent_mode": "local"})
    body = r.json()
    assert r.code == 200 and body["agent_mode"] == "local" and body["webhook_url"] == "" and body["webhook_status"] == "none"


@pytest_twisted.ensureDeferred
async def test_agent_update_reactivates_disabled_webhook(make_api):
    """PUT with the same non-empty webhook_url re-activates a disabled webhook."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await slug_agent(api, key, "bot", agent_mode="cloud", webhook_url=PUBLIC_HOOK)
    await api.db.execute("UPDATE agents SET webhook_status = 'disabled', webhook_disabled_at = now()")
    got = (await api.request("GET", "/api/v1/agents/bot@agents.test", key=key)).json()
    assert got["webhook_status"] == "disabled" and got["webhook_disabled_at"].endswith("Z")
    r = await api.request("PUT", "/api/v1/agents/bot@agents.test", key=key, json_body={"webhook_url": PUBLIC_HOOK})
    assert r.json()["webhook_status"] == "active" and "webhook_disabled_at" not in r.json()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "no_fields"),
        ({"unknown": 1, "webhook_url": None}, "no_fields"),
        ({"hitl_ttl_seconds": 0}, "invalid_field"),
        ({"hitl_ttl_seconds": 604801}, "invalid_field"),
        ({"hitl_expiration_action": "Approve"}, "invalid_field"),
        ({"agent_mode": "remote"}, "invalid_field"),
        ({"name": "x" * 201}, "invalid_field"),
        ({"hitl_reviewers": [f"r{i}@example.com" for i in range(11)]}, "invalid_field"),
        ({"name": "a\nb"}, "invalid_header_value"),
        ({"hitl_reviewers": ["a@b.com\r\nBcc: c@d.com"]}, "invalid_header_value"),
        ({"hitl_reviewers": ["not an address"]}, "invalid_address"),
        ({"hitl_enabled": "yes"}, "invalid_request_body"),
        ({"hitl_ttl_seconds": "60"}, "invalid_request_body"),
        ({"hitl_reviewers": "a@b.com"}, "invalid_request_body"),
        ({"webhook_url": EVIL_HOOK}, "invalid_webhook_url"),
        ({"agent_mode": "cloud", "webhook_url": EVIL_HOOK}, "invalid_webhook_url"),
        ({"agent_mode": "cloud"}, "webhook_url_required"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_agent_update_refused_when_invalid(make_api, body, expected):
    """Each validation of api.md §4.4; nothing is applied."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await slug_agent(api, key, "bot", name="Keep")
    r = await api.request("PUT", "/api/v1/agents/bot@agents.test", key=key, json_body=body)
    assert code_of(r) == (400, expected), r.body
    got = (await api.request("GET", "/api/v1/agents/bot@agents.test", key=key)).json()
    assert got["name"] == "Keep" and got["agent_mode"] == "local" and got["hitl_reviewers"] == []


@pytest_twisted.ensureDeferred
async def test_agent_update_applies_all_or_nothing(make_api):
    """An invalid webhook in the same request leaves valid HITL changes unapplied."""
    api = await make_api()
    _, key = await insert_user_with_key(api.db)
    await slug_agent(api, key, "bot")
    r = await api.request(
        "PUT", "/api/v1/agents/bot@agents.test", key=key,
        json_body={"hitl_enabled": True, "agent_mode": "cloud"},
    )
    assert code_of(r) == (400, "webhook_url_required")
    assert (await api.request("GET", "/api/v1/agents/bot@agents.test", key=key)).json()["hitl_enabled"] is False


@pytest_twisted.ensureDeferred
async def test_agent_update_and_delete_refused_for_scope_and_tenant(make_api):
    """401 without key, 403 for agent keys (before lookup), 404 for another user's agent."""
    api = await make_api()
    alice_id, alice = await insert_user_with_key(api.db, "alice@example.org")
    _, bob = await insert_user_with_key(api.db, "bob@example.org")
    await slug_agent(api, alice, "bot")
    akey = await agent_key(api.db, alice_id, "bot@agents.test")
    path = "/api/v1/agents/bot@agents.test"
    for method in ("PUT", "DELETE"):
        body = {"name": "x"} if method == "PUT" else None
        assert code_of(await api.request(method, path, json_body=body)) == (401, "unauthorized")
        assert code_of(await api.request(method, path, key=akey, json_body=body)) == (403, "insufficient_scope")
        assert code_of(await api.request(method, "/api/v1/agents/none@agents.test", key=akey, json_body=body)) == (
            403, "insufficient_scope")
        assert code_of(await api.request(method, path, key=bob, json_body=body)) == (404, "agent_not_found")


# ============================================================================== agents: delete


@pytest_twisted.ensureDeferred
async def test_agent_delete_revokes_keys_and_notifies(make_api, db_dsn):
    """DELETE answers {"status":"deleted"}, revokes the agent's keys and NOTIFYs e2a_revoke;
    a mode change NOTIFYs agentmode."""
    api = await make_api()
    listener = EventListener(db_dsn, reactor)
    await listener.start()
    payloads: list[str] = []
    listener.subscribe(CHANNEL_REVOKE, payloads.append)
    try:
        user, key = await insert_user_with_key(api.db)
        await slug_agent(api, key, "bot")
        akey = await agent_key(api.db, user, "bot@agents.test")
        assert (await api.request("GET", "/api/v1/agents", key=akey)).code == 200
        r = await api.request("PUT", "/api/v1/agents/bot@agents.test", key=key,
                              json_body={"agent_mode": "cloud", "webhook_url": PUBLIC_HOOK})
        assert r.code == 200
        r = await api.request("DELETE", "/api/v1/agents/Bot%40Agents.test", key=key)
        assert r.code == 200 and r.json() == {"status": "deleted"}
        assert r.header("Content-Type") == "application/json"
        assert code_of(await api.request("GET", "/api/v1/agents/bot@agents.test", key=key)) == (404, "agent_not_found")
        assert code_of(await api.request("GET", "/api/v1/agents", key=akey)) == (401, "unauthorized")
        assert code_of(await api.request("DELETE", "/api/v1/agents/bot@agents.test", key=key)) == (404, "agent_not_found")
        async def both_seen() -> bool:
            return len(payloads) >= 2

        await wait_for(both_seen, timeout=5)
        assert payloads == ["agentmode\tbot@agents.test", "agent\tbot@agents.test"]
    finally:
        listener.stop()


# ============================================================================== feedback


@pytest_twisted.ensureDeferred
async def test_feedback_stored_with_user_email_when_key_given(make_api):
    """Anonymous feedback is stored; a valid key attaches the user and their email; an
    invalid key is ignored."""
    api = await make_api()
    user, key = await insert_user_with_key(api.db, "fb@example.org")
    r = await api.request("POST", "/api/feedback", json_body={"message": "  hello  ", "category": "bug"})
    assert r.code == 200 and r.json() == {"status": "ok"}
    r = await api.request("POST", "/api/feedback", key=key, json_body={"message": "with key"})
    assert r.code == 200
    r = await api.request("POST", "/api/feedback", key="e2a_" + "f" * 64, json_body={"message": "bad key"})
    assert r.code == 200
    rows = await api.db.fetchall("SELECT user_id, email, category, message FROM feedback ORDER BY created_at, message")
    by_message = {row["message"]: row for row in rows}
    assert by_message["hello"] == {"user_id": None, "email": "", "category": "bug", "message": "hello"}
    assert by_message["with key"]["user_id"] == user and by_message["with key"]["email"] == "fb@example.org"
    assert by_message["with key"]["category"] == "general"
    assert by_message["bad key"]["user_id"] is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "missing_field"),
        ({"message": "   "}, "missing_field"),
        ({"message": "x" * 5001}, "invalid_field"),
        ({"message": "ok", "email": "e" * 255}, "invalid_field"),
        ({"message": "ok", "category": "praise"}, "invalid_field"),
        ({"message": 5}, "invalid_request_body"),
        ({"message": "x" * 5001, "category": "praise"}, "invalid_field"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_feedback_refused_when_invalid(make_api, body, expected):
    """The checks of api.md §3.5."""
    api = await make_api()
    r = await api.request("POST", "/api/feedback", json_body=body)
    assert code_of(r) == (400, expected)


@pytest_twisted.ensureDeferred
async def test_feedback_rate_limited_before_body_checks(make_api):
    """Over the feedback limit → 429 even for a malformed body."""
    api = await make_api(rate_limits=RateLimitConfig(feedback_per_hour=1))
    assert (await api.request("POST", "/api/feedback", json_body={"message": "one"})).code == 200
    r = await api.request("POST", "/api/feedback", data=b"{broken")
    assert code_of(r) == (429, "rate_limited") and r.header("Retry-After")

