"""Domain store contract on PostgreSQL: claim rules (api.md §9.2), verification, deletion,
DKIM keys encrypted at rest; plus the rate-limit counters and the agent store's side effects."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization

from e2a import crypto
from e2a.errors import BadRequest, NotFound, RateLimited
from e2a.mailauth import dkimkeys
from e2a.mailauth.dkimkeys import DkimKeyPair
from e2a.store import agents as agent_store
from e2a.store import domains as domain_store
from e2a.store import ratelimits
from e2a.store.models import Domain
from tests.support.apiserver import TEST_MASTER_KEY, insert_user_with_key

NOW = datetime(2026, 4, 27, 12, 0, tzinfo=UTC)
_fake_counter = itertools.count()


async def fake_keygen() -> DkimKeyPair:
    """Cheap distinct stand-in keys (RSA keygen is exercised once, below)."""
    n = next(_fake_counter)
    return DkimKeyPair(f"-----FAKE KEY {n}-----\n".encode(), base64.b64encode(f"pub{n}".encode()).decode())


async def claim(db, user_id, domain="example.com", keygen=fake_keygen):
    return await domain_store.claim_domain(
        db, user_id, domain, master_key=TEST_MASTER_KEY, takeover_hours=72, now=NOW, keygen=keygen
    )


async def backdate_claim(db, domain, hours):
    await db.execute(
        "UPDATE domains SET claimed_at = now() - make_interval(hours => %s) WHERE domain = %s",
        (hours, domain),
    )


async def stored_key(db, domain):
    return await db.fetchone(
        "SELECT dkim_private_key, dkim_public_key, dkim_selector FROM domains WHERE domain = %s",
        (domain,),
    )


# ------------------------------------------------------------------------------ claim rules


def _domain(user_id, verified=False, is_shared=False):
    return Domain("d.com", user_id, is_shared, verified, "t", NOW, NOW, None, "s", "p")


@pytest.mark.parametrize(
    ("existing", "due", "outcome"),
    [
        (None, False, "create"),
        (_domain("me"), False, "unchanged"),
        (_domain("me", verified=True), True, "unchanged"),
        (_domain("other", verified=True), True, "refuse"),
        (_domain(None, verified=True, is_shared=True), True, "refuse"),
        (_domain("other"), False, "refuse"),
        (_domain("other"), True, "takeover"),
    ],
)
def test_claim_decision_follows_spec_table(existing, due, outcome):
    """The pure claim table of api.md §9.2."""
    assert domain_store.claim_decision(existing, "me", due) == outcome


@pytest_twisted.ensureDeferred
async def test_claim_creates_unverified_domain_with_token_and_key(db):
    """A new claim is unverified with a fresh token, selector e2a+date and a sealed key."""
    user, _ = await insert_user_with_key(db, "a@example.org")
    d = await claim(db, user)
    assert d.user_id == user and not d.verified and d.verified_at is None
    assert d.verification_token.startswith("e2a-verify=") and len(d.verification_token) == 43
    assert d.dkim_selector == "e2a20260427"
    row = await stored_key(db, "example.com")
    assert row["dkim_private_key"].startswith("v1:")
    assert b"FAKE KEY" not in row["dkim_private_key"].encode()
    assert dkimkeys.open_private_key(TEST_MASTER_KEY, row["dkim_private_key"], "example.com").startswith(
        b"-----FAKE KEY"
    )


@pytest_twisted.ensureDeferred
async def test_claim_refused_when_verified_by_other_user(db):
    """A domain verified by someone else is never available, however old the claim."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    bob, _ = await insert_user_with_key(db, "bob@example.org")
    await claim(db, alice)
    await domain_store.mark_verified(db, alice, "example.com")
    await backdate_claim(db, "example.com", 1000)
    with pytest.raises(BadRequest) as exc:
        await claim(db, bob)
    assert exc.value.code == "domain_not_available"


@pytest_twisted.ensureDeferred
async def test_claim_refused_when_unverified_other_claim_younger_than_72h(db):
    """An unverified claim of another user blocks for 72 h."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    bob, _ = await insert_user_with_key(db, "bob@example.org")
    await claim(db, alice)
    await backdate_claim(db, "example.com", 71)
    with pytest.raises(BadRequest) as exc:
        await claim(db, bob)
    assert exc.value.code == "domain_not_available"


@pytest_twisted.ensureDeferred
async def test_claim_taken_over_when_unverified_other_claim_72h_old(db):
    """After 72 h an unverified claim is taken over: new owner, token and DKIM key."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    bob, _ = await insert_user_with_key(db, "bob@example.org")
    first = await claim(db, alice)
    key_before = await stored_key(db, "example.com")
    await backdate_claim(db, "example.com", 72)
    taken = await claim(db, bob)
    assert taken.user_id == bob and not taken.verified
    assert taken.verification_token != first.verification_token
    assert taken.dkim_public_key != first.dkim_public_key
    key_after = await stored_key(db, "example.com")
    assert key_after["dkim_private_key"] != key_before["dkim_private_key"]
    assert await domain_store.get_user_domain(db, alice, "example.com") is None
    # the take-over restarts the clock: alice cannot take it straight back
    with pytest.raises(BadRequest):
        await claim(db, alice)


@pytest_twisted.ensureDeferred
async def test_claim_unchanged_when_own_domain_registered_again(db):
    """Re-registering one's own domain returns it unchanged (token and key kept)."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    first = await claim(db, alice)
    key_before = await stored_key(db, "example.com")
    await backdate_claim(db, "example.com", 100)

    async def must_not_run():
        raise AssertionError("no key generation for an unchanged domain")

    again = await claim(db, alice, keygen=must_not_run)
    assert again.verification_token == first.verification_token
    assert again.dkim_public_key == first.dkim_public_key
    assert await stored_key(db, "example.com") == key_before


@pytest_twisted.ensureDeferred
async def test_claim_refused_for_shared_domain_row(db):
    """The system-owned shared domain cannot be claimed."""
    bob, _ = await insert_user_with_key(db, "bob@example.org")
    await domain_store.ensure_shared_domain(db, "agents.test")
    with pytest.raises(BadRequest) as exc:
        await claim(db, bob, "agents.test")
    assert exc.value.code == "domain_not_available"
    assert await domain_store.list_domains(db, bob) == []


@pytest_twisted.ensureDeferred
async def test_claim_stores_real_rsa_key_encrypted_with_domain_as_ad(db):
    """A real RSA-2048 key: PKCS#8 PEM sealed with AD = domain; public key is its SPKI."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    d = await claim(db, alice, "real.example", keygen=dkimkeys.generate_key)
    row = await stored_key(db, "real.example")
    assert row["dkim_private_key"].startswith("v1:") and "PRIVATE KEY" not in row["dkim_private_key"]
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(TEST_MASTER_KEY, row["dkim_private_key"], "other.example")
    pem = dkimkeys.open_private_key(TEST_MASTER_KEY, row["dkim_private_key"], "real.example")
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, password=None)
    assert key.key_size == 2048
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert d.dkim_public_key == row["dkim_public_key"] == base64.b64encode(spki).decode()


# ------------------------------------------------------------------------------ verify, list, delete


@pytest_twisted.ensureDeferred
async def test_mark_verified_keeps_first_verified_at(db):
    """Verification is permanent and verified_at does not move."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    await claim(db, alice)
    first = await domain_store.mark_verified(db, alice, "example.com")
    again = await domain_store.mark_verified(db, alice, "example.com")
    assert first.verified and first.verified_at == again.verified_at


@pytest_twisted.ensureDeferred
async def test_mark_verified_not_found_for_other_user(db):
    """Another user's domain is domain_not_found."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    bob, _ = await insert_user_with_key(db, "bob@example.org")
    await claim(db, alice)
    with pytest.raises(NotFound) as exc:
        await domain_store.mark_verified(db, bob, "example.com")
    assert exc.value.code == "domain_not_found"


@pytest_twisted.ensureDeferred
async def test_list_domains_newest_first_only_own(db):
    """Listing shows the caller's domains, newest first."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    bob, _ = await insert_user_with_key(db, "bob@example.org")
    await claim(db, alice, "one.example")
    await claim(db, alice, "two.example")
    await claim(db, bob, "three.example")
    assert [d.domain for d in await domain_store.list_domains(db, alice)] == ["two.example", "one.example"]


@pytest_twisted.ensureDeferred
async def test_delete_domain_refused_while_agents_exist(db):
    """domain_has_agents until the last agent is gone; then the row and key are deleted."""
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    await claim(db, alice)
    await domain_store.mark_verified(db, alice, "example.com")
    await agent_store.create_agent(db, alice, "bot@example.com", "example.com", via_slug=False, agent_mode="local")
    with pytest.raises(BadRequest) as exc:
        await domain_store.delete_domain(db, alice, "example.com")
    assert exc.value.code == "domain_has_agents"
    assert await agent_store.delete_agent(db, alice, "BOT@example.com") == "bot@example.com"
    await domain_store.delete_domain(db, alice, "example.com")
    assert await domain_store.get_domain(db, "example.com") is None
    with pytest.raises(NotFound):
        await domain_store.delete_domain(db, alice, "example.com")


# ------------------------------------------------------------------------------ rate limits


@pytest_twisted.ensureDeferred
async def test_rate_limit_refuses_after_limit_with_retry_after(db):
    """The (limit+1)-th hit in a window raises RateLimited with the seconds left."""
    now = 7200.0 + 600  # 10 minutes into an hourly window
    for _ in range(3):
        await ratelimits.hit(db, "register:1.2.3.4", 3, 3600, now)
    with pytest.raises(RateLimited) as exc:
        await ratelimits.hit(db, "register:1.2.3.4", 3, 3600, now)
    assert exc.value.retry_after == 3000 and exc.value.headers["Retry-After"] == "3000"
    # another bucket is independent
    await ratelimits.hit(db, "register:5.6.7.8", 3, 3600, now)


@pytest_twisted.ensureDeferred
async def test_rate_limit_resets_in_next_window_and_prunes_old(db):
    """A new window starts from zero and deletes the bucket's previous windows."""
    for _ in range(2):
        await ratelimits.hit(db, "b", 2, 60, 120.0)
    with pytest.raises(RateLimited):
        await ratelimits.hit(db, "b", 2, 60, 179.0)
    await ratelimits.hit(db, "b", 2, 60, 180.0)
    rows = await db.fetchall("SELECT count FROM rate_limits WHERE bucket = 'b'")
    assert [r["count"] for r in rows] == [1]


# ------------------------------------------------------------------------------ agent side effects


async def make_cloud_agent(db):
    alice, _ = await insert_user_with_key(db, "alice@example.org")
    await domain_store.ensure_shared_domain(db, "agents.test")
    await agent_store.create_agent(
        db, alice, "bot@agents.test", "agents.test", via_slug=True, webhook_url="https://h.example/x"
    )
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status) VALUES"
        " ('msg_1', 'bot@agents.test', %s, 'inbound', 'unread')",
        (alice,),
    )
    for i, status in enumerate(["paused", "pending", "delivered"]):
        await db.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, status, attempts) VALUES"
            " (%s, 'msg_1', 'bot@agents.test', %s, 3)",
            (f"dlv_{i}", status),
        )
    await db.execute(
        "UPDATE agents SET webhook_status = 'disabled', webhook_disabled_at = now()"
        " WHERE id = 'bot@agents.test'"
    )
    return alice


@pytest_twisted.ensureDeferred
async def test_update_webhook_releases_paused_deliveries(db):
    """A non-empty webhook_url on a cloud agent re-activates it and releases paused jobs."""
    alice = await make_cloud_agent(db)
    agent = await agent_store.update_agent(
        db, alice, "bot@agents.test", agent_store.AgentUpdate(webhook_url="https://h.example/x")
    )
    assert agent.webhook_status == "active" and agent.webhook_disabled_at is None
    rows = await db.fetchall("SELECT id, status, attempts, next_attempt_at FROM deliveries ORDER BY id")
    assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 0), ("pending", 3), ("delivered", 3)]
    assert rows[0]["next_attempt_at"] is not None


@pytest_twisted.ensureDeferred
async def test_update_webhook_keeps_the_live_lease_of_an_attempt_still_running(db):
    """A row a 410 paused while another of its attempts was in flight keeps that attempt's
    lease when released (no second POST while the first runs); an expired lease is cleared."""
    alice = await make_cloud_agent(db)
    await db.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, status, attempts, leased_until) VALUES"
        " ('dlv_live', 'msg_1', 'bot@agents.test', 'paused', 0, now() + interval '1 minute'),"
        " ('dlv_old', 'msg_1', 'bot@agents.test', 'paused', 0, now() - interval '1 minute')"
    )
    await agent_store.update_agent(db, alice, "bot@agents.test", agent_store.AgentUpdate(webhook_url="https://h.example/x"))
    rows = {
        r["id"]: r
        for r in await db.fetchall(
            "SELECT id, status, leased_until > now() AS live FROM deliveries WHERE id IN ('dlv_live', 'dlv_old')"
        )
    }
    assert rows["dlv_live"]["status"] == rows["dlv_old"]["status"] == "pending"
    assert rows["dlv_live"]["live"] is True and rows["dlv_old"]["live"] is None


@pytest_twisted.ensureDeferred
async def test_update_to_local_fails_open_deliveries(db):
    """Switching to local mode fails pending/paused deliveries and clears the webhook."""
    alice = await make_cloud_agent(db)
    agent = await agent_store.update_agent(
        db, alice, "bot@agents.test", agent_store.AgentUpdate(agent_mode="local")
    )
    assert agent.agent_mode == "local" and agent.webhook_url == "" and agent.webhook_status == "none"
    rows = await db.fetchall("SELECT status, last_error FROM deliveries ORDER BY id")
    assert [(r["status"], r["last_error"]) for r in rows] == [
        ("failed", "agent is in local mode"),
        ("failed", "agent is in local mode"),
        ("delivered", ""),
    ]


@pytest_twisted.ensureDeferred
async def test_update_refused_when_cloud_left_without_webhook(db):
    """agent_mode cloud without webhook_url in the same request is webhook_url_required."""
    alice = await make_cloud_agent(db)
    with pytest.raises(BadRequest) as exc:
        await agent_store.update_agent(db, alice, "bot@agents.test", agent_store.AgentUpdate(agent_mode="cloud"))
    assert exc.value.code == "webhook_url_required"
    with pytest.raises(BadRequest):
        await agent_store.update_agent(db, alice, "bot@agents.test", agent_store.AgentUpdate(webhook_url=""))


@pytest_twisted.ensureDeferred
async def test_delete_agent_removes_mail_and_revokes_agent_keys(db):
    """Deleting an agent deletes its messages and deliveries and revokes its keys."""
    alice = await make_cloud_agent(db)
    await db.execute(
        "INSERT INTO api_keys (id, user_id, agent_id, scope, key_hash, key_prefix) VALUES"
        " ('apk_a', %s, 'bot@agents.test', 'agent', 'h1', 'e2a_00000000')",
        (alice,),
    )
    assert await agent_store.delete_agent(db, alice, "Bot@Agents.Test") == "bot@agents.test"
    assert await db.fetchall("SELECT id FROM deliveries") == []
    assert await db.fetchall("SELECT id FROM messages") == []
    key = await db.fetchone("SELECT revoked_at FROM api_keys WHERE id = 'apk_a'")
    assert key["revoked_at"] is not None
    assert await agent_store.delete_agent(db, alice, "bot@agents.test") is None


@pytest_twisted.ensureDeferred
async def test_get_signing_key_returns_encrypted_key_and_selector(db):
    """Outbound signing reads the selector and the still-encrypted key of a domain."""
    user_id, _ = await insert_user_with_key(db)
    await claim(db, user_id, "sign.test")
    key = await domain_store.get_signing_key(db, "sign.test")
    stored = await stored_key(db, "sign.test")
    assert key is not None and not key.is_shared
    assert (key.dkim_selector, key.dkim_private_key) == (stored["dkim_selector"], stored["dkim_private_key"])
    assert await domain_store.get_signing_key(db, "none.test") is None
