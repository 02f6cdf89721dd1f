"""Accounts store on real PostgreSQL: key hashing, revocation, secrets at rest, caps under concurrency."""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted

from twisted.internet import defer

from e2a import crypto
from e2a.api.auth import authenticate_key
from e2a.api.export import export_document
from e2a.errors import BadRequest, Conflict, NotFound, Unauthorized
from e2a.store import accounts
from e2a.store.events import CHANNEL_REVOKE, EventListener

MASTER = bytes(range(32))


async def _user(db, email="Alice@Example.com"):
    user, _meta, _secret = await accounts.create_user(db, MASTER, email, "Alice")
    return user


async def _agent(db, user_id, address="Bot@acme.test"):
    domain = address.split("@")[1]

    async def _txn(txn):
        await txn.execute(
            "INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, TRUE) ON CONFLICT DO NOTHING",
            (domain, user_id),
        )
        await txn.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES (%s, %s, %s, 'local', 'none')",
            (address, user_id, domain),
        )

    await db.run("test_agent", _txn)
    return address


@pytest_twisted.ensureDeferred
async def test_create_user_lowercases_email_and_adds_default_secret(db):
    """A new user gets a lowercased email and one secret named default."""
    user, meta, secret = await accounts.create_user(db, MASTER, " Alice@Example.COM ", "Alice")
    assert user.email == "alice@example.com"
    assert meta.name == "default" and len(secret) == 64 and meta.secret_prefix == secret[:12]
    assert (await accounts.get_user_by_email(db, "ALICE@example.com")).id == user.id
    with pytest.raises(Conflict):
        await accounts.create_user(db, MASTER, "alice@EXAMPLE.com")


@pytest_twisted.ensureDeferred
async def test_create_api_key_stores_only_hash_and_prefix(db):
    """The plaintext key is never in the row; only sha256 hex and the 12-char prefix."""
    user = await _user(db)
    key, plaintext = await accounts.create_api_key(db, user.id, "ci")
    assert key.scope == "user" and key.agent_id is None and key.key_prefix == plaintext[:12]
    row = await db.fetchone("SELECT * FROM api_keys WHERE id = %s", (key.id,))
    assert row["key_hash"] == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in [str(v) for v in row.values()]


@pytest_twisted.ensureDeferred
async def test_authenticate_key_sets_last_used_at(db):
    """A successful lookup records last_used_at."""
    user = await _user(db)
    key, plaintext = await accounts.create_api_key(db, user.id, "ci")
    assert key.last_used_at is None
    principal = await authenticate_key(db, plaintext)
    assert principal.user_id == user.id and principal.key_id == key.id
    (listed,) = [k for k in await accounts.list_api_keys(db, user.id) if k.id == key.id]
    assert listed.last_used_at is not None


@pytest_twisted.ensureDeferred
async def test_revoked_key_never_authenticates(db):
    """After revocation the key is 401, absent from the list and a second revoke is 404."""
    user = await _user(db)
    await accounts.create_api_key(db, user.id, "keep")
    key, plaintext = await accounts.create_api_key(db, user.id, "drop")
    await accounts.revoke_api_key(db, user.id, key.id)
    with pytest.raises(Unauthorized):
        await authenticate_key(db, plaintext)
    assert key.id not in [k.id for k in await accounts.list_api_keys(db, user.id)]
    with pytest.raises(NotFound) as e:
        await accounts.revoke_api_key(db, user.id, key.id)
    assert e.value.code == "key_not_found"


@pytest_twisted.ensureDeferred
async def test_revoke_refuses_last_user_key(db):
    """The last active user-scoped key cannot be revoked, even with agent keys left."""
    user = await _user(db)
    agent = await _agent(db, user.id)
    key, _ = await accounts.create_api_key(db, user.id, "only")
    await accounts.create_api_key(db, user.id, "agent", agent)
    with pytest.raises(BadRequest) as e:
        await accounts.revoke_api_key(db, user.id, key.id)
    assert e.value.code == "last_user_key"


@pytest_twisted.ensureDeferred
async def test_revoke_is_404_for_another_users_key(db):
    """A foreign key id answers exactly like a missing one."""
    alice = await _user(db)
    bob = await _user(db, "bob@example.com")
    await accounts.create_api_key(db, alice.id, "a1")
    key, _ = await accounts.create_api_key(db, alice.id, "a2")
    with pytest.raises(NotFound) as e:
        await accounts.revoke_api_key(db, bob.id, key.id)
    assert e.value.code == "key_not_found"


@pytest_twisted.ensureDeferred
async def test_revoke_notifies_listeners_after_commit(db, db_dsn):
    """Revocation is announced on e2a_revoke as key<TAB>id."""
    from twisted.internet import reactor

    user = await _user(db)
    await accounts.create_api_key(db, user.id, "a1")
    key, _ = await accounts.create_api_key(db, user.id, "a2")
    listener = EventListener(db_dsn, reactor)
    await listener.start()
    got: defer.Deferred[str] = defer.Deferred()
    listener.subscribe(CHANNEL_REVOKE, lambda p: got.called or got.callback(p))
    try:
        await accounts.revoke_api_key(db, user.id, key.id)
        got.addTimeout(5, reactor)
        assert await got == f"key\t{key.id}"
    finally:
        listener.stop()


@pytest_twisted.ensureDeferred
async def test_agent_key_requires_own_agent_case_insensitively(db):
    """agent matches the user's agent ignoring case; unknown/foreign agents are agent_not_found."""
    alice = await _user(db)
    bob = await _user(db, "bob@example.com")
    agent = await _agent(db, alice.id, "Bot@acme.test")
    key, _ = await accounts.create_api_key(db, alice.id, "a", "bot@ACME.test")
    assert key.scope == "agent" and key.agent_id == agent
    with pytest.raises(NotFound) as e:
        await accounts.create_api_key(db, bob.id, "b", agent)
    assert e.value.code == "agent_not_found"


@pytest_twisted.ensureDeferred
async def test_create_api_key_cap_holds_under_concurrency(db):
    """Concurrent creates never pass 100 active keys."""
    user = await _user(db)

    async def fill(txn):
        for i in range(97):
            await txn.execute(
                "INSERT INTO api_keys (id, user_id, scope, name, key_hash, key_prefix)"
                " VALUES (%s, %s, 'user', '', %s, 'e2a_00000000')",
                (f"apk_{i:032x}", user.id, f"{i:064x}"),
            )

    await db.run("fill", fill)
    results = await defer.DeferredList(
        [defer.ensureDeferred(accounts.create_api_key(db, user.id, f"k{i}")) for i in range(6)],
        consumeErrors=True,
    )
    ok = [r for success, r in results if success]
    failed = [r.value for success, r in results if not success]
    assert len(ok) == 3 and len(failed) == 3
    assert all(isinstance(f, BadRequest) and f.code == "too_many_keys" for f in failed)


@pytest_twisted.ensureDeferred
async def test_signing_secret_is_encrypted_at_rest_and_round_trips(db):
    """The column holds v1: ciphertext bound to the row id; active_secrets decrypts newest first."""
    user = await _user(db)
    meta, plaintext = await accounts.create_signing_secret(db, MASTER, user.id, "second")
    row = await db.fetchone("SELECT secret FROM signing_secrets WHERE id = %s", (meta.id,))
    assert row["secret"].startswith("v1:") and plaintext not in row["secret"]
    assert crypto.decrypt(MASTER, row["secret"], meta.id).decode() == plaintext
    values = await accounts.active_secrets(db, MASTER, user.id)
    assert len(values) == 2 and values[0] == plaintext
    listed = await accounts.list_signing_secrets(db, user.id)
    assert [s.name for s in listed] == ["second", "default"]


@pytest_twisted.ensureDeferred
async def test_signing_secret_cap_holds_under_concurrency(db):
    """Seven concurrent creates on a user with one secret leave exactly five."""
    user = await _user(db)
    results = await defer.DeferredList(
        [defer.ensureDeferred(accounts.create_signing_secret(db, MASTER, user.id, f"s{i}")) for i in range(7)],
        consumeErrors=True,
    )
    failed = [r.value for success, r in results if not success]
    assert len(failed) == 3 and all(f.code == "too_many_secrets" for f in failed)
    assert len(await accounts.list_signing_secrets(db, user.id)) == 5


@pytest_twisted.ensureDeferred
async def test_delete_signing_secret_checks_existence_then_floor(db):
    """404 for a missing or foreign id first; 400 for the only secret."""
    alice = await _user(db)
    bob = await _user(db, "bob@example.com")
    (only,) = await accounts.list_signing_secrets(db, alice.id)
    with pytest.raises(NotFound) as e:
        await accounts.delete_signing_secret(db, bob.id, only.id)
    assert e.value.code == "signing_secret_not_found"
    with pytest.raises(BadRequest) as e:
        await accounts.delete_signing_secret(db, alice.id, only.id)
    assert e.value.code == "last_signing_secret"


@pytest_twisted.ensureDeferred
async def test_delete_signing_secret_floor_holds_under_concurrency(db):
    """Deleting all of two secrets concurrently leaves exactly one."""
    user = await _user(db)
    await accounts.create_signing_secret(db, MASTER, user.id, "two")
    ids = [s.id for s in await accounts.list_signing_secrets(db, user.id)]
    results = await defer.DeferredList(
        [defer.ensureDeferred(accounts.delete_signing_secret(db, user.id, i)) for i in ids], consumeErrors=True
    )
    assert sorted(success for success, _ in results) == [False, True]
    assert len(await accounts.list_signing_secrets(db, user.id)) == 1


@pytest_twisted.ensureDeferred
async def test_bootstrap_reuses_user_and_adds_a_key(db):
    """bootstrap keeps an existing user and its secrets and always adds a user key."""
    first = await accounts.bootstrap(db, MASTER, "Ops@Example.com")
    second = await accounts.bootstrap(db, MASTER, "ops@example.com")
    assert first.created_user and not second.created_user
    assert first.user.id == second.user.id and first.user.name == "bootstrap"
    assert first.signing_secret == second.signing_secret and first.signing_secret_id.startswith("wsec_")
    assert first.api_key_plaintext != second.api_key_plaintext
    assert second.api_key.name == "bootstrap" and second.api_key.scope == "user"
    assert (await authenticate_key(db, second.api_key_plaintext)).user_id == first.user.id


@pytest_twisted.ensureDeferred
async def test_export_contains_every_section(db):
    """The export holds the user, domains, agents, keys (incl. revoked), secrets, messages, deliveries."""
    user = await _user(db)
    agent = await _agent(db, user.id)
    await accounts.create_api_key(db, user.id, "a")
    k2, _ = await accounts.create_api_key(db, user.id, "b")
    await accounts.revoke_api_key(db, user.id, k2.id)

    async def msg(txn):
        await txn.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, raw_message, subject)"
            " VALUES ('msg_1', %s, %s, 'inbound', 'unread', %s, 'hi')",
            (agent, user.id, b"Subject: hi\r\n\r\nbody"),
        )
        await txn.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, status) VALUES ('dlv_1', 'msg_1', %s, 'pending')",
            (agent,),
        )

    await db.run("msg", msg)
    snapshot = await accounts.export_user(db, user.id)
    assert snapshot is not None
    doc = export_document(snapshot)
    assert doc["schema_version"] == "1" and doc["user"]["email"] == "alice@example.com"
    assert [d["domain"] for d in doc["domains"]] == ["acme.test"]
    assert doc["agents"][0]["public"] is True and doc["agents"][0]["domain_verified"] is True
    assert {k["id"]: "revoked_at" in k for k in doc["api_keys"]}[k2.id] is True
    assert doc["signing_secrets"][0]["name"] == "default" and "secret" not in doc["signing_secrets"][0]
    assert doc["messages"][0]["raw_message"] == "U3ViamVjdDogaGkNCg0KYm9keQ=="
    assert doc["deliveries"][0]["id"] == "dlv_1" and doc["deliveries"][0]["last_error"] == ""
    assert "usage_events" not in doc


@pytest_twisted.ensureDeferred
async def test_delete_user_counts_everything_and_kills_keys(db):
    """delete_user reports the spec's counts and every key stops authenticating."""
    user = await _user(db)
    agent = await _agent(db, user.id)
    _k, plaintext = await accounts.create_api_key(db, user.id, "a")
    await accounts.create_api_key(db, user.id, "b", agent)
    other = await _user(db, "bob@example.com")

    async def msg(txn):
        await txn.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status) VALUES ('msg_1', %s, %s, 'inbound', 'unread')",
            (agent, user.id),
        )
        await txn.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, status) VALUES ('dlv_1', 'msg_1', %s, 'pending')",
            (agent,),
        )

    await db.run("msg", msg)
    counts = await accounts.delete_user(db, user.id)
    assert list(counts) == [
        "usage_events_deleted", "usage_summaries_deleted", "messages_deleted", "agents_deleted",
        "domains_deleted", "api_keys_deleted", "sessions_deleted", "user_deleted",
        "signing_secrets_deleted", "deliveries_deleted",
    ]
    assert counts == {
        "usage_events_deleted": 0, "usage_summaries_deleted": 0, "messages_deleted": 1, "agents_deleted": 1,
        "domains_deleted": 1, "api_keys_deleted": 2, "sessions_deleted": 0, "user_deleted": True,
        "signing_secrets_deleted": 1, "deliveries_deleted": 1,
    }
    with pytest.raises(Unauthorized):
        await authenticate_key(db, plaintext)
    assert await accounts.get_user(db, other.id) is not None


@pytest_twisted.ensureDeferred
async def test_find_live_key_returns_owner_and_touches_last_used_once(db):
    """A live key's hash finds its owner; last_used_at is written on first use only."""
    user = await _user(db)
    key, plaintext = await accounts.create_api_key(db, user.id, "k")
    owner = await accounts.find_live_key(db, hashlib.sha256(plaintext.encode()).hexdigest())
    assert owner is not None and (owner.key_id, owner.user_id, owner.user_email) == (key.id, user.id, user.email)
    assert owner.scope == "user" and owner.agent_id is None
    first = (await db.fetchone("SELECT last_used_at FROM api_keys WHERE id = %s", (key.id,)))["last_used_at"]
    await accounts.find_live_key(db, hashlib.sha256(plaintext.encode()).hexdigest())
    again = (await db.fetchone("SELECT last_used_at FROM api_keys WHERE id = %s", (key.id,)))["last_used_at"]
    assert first is not None and again == first
    assert await accounts.find_live_key(db, "0" * 64) is None


@pytest_twisted.ensureDeferred
async def test_find_live_key_refuses_revoked_and_orphaned_agent_keys(db):
    """Revoked keys and agent keys whose agent was deleted are dead."""
    user = await _user(db)
    agent = await _agent(db, user.id)
    await accounts.create_api_key(db, user.id, "keep")  # the last user key cannot be revoked
    revoked, p1 = await accounts.create_api_key(db, user.id, "r")
    await accounts.revoke_api_key(db, user.id, revoked.id)
    _scoped, p2 = await accounts.create_api_key(db, user.id, "a", agent)
    await db.execute("DELETE FROM agents WHERE id = %s", (agent,))
    for plaintext in (p1, p2):
        assert await accounts.find_live_key(db, hashlib.sha256(plaintext.encode()).hexdigest()) is None


@pytest_twisted.ensureDeferred
async def test_socket_grant_state_reports_key_and_agent_mode(db):
    """The WebSocket re-check reads key liveness and agent mode; gone rows read as None."""
    user = await _user(db)
    agent = await _agent(db, user.id)
    await accounts.create_api_key(db, user.id, "keep")  # the last user key cannot be revoked
    key, _ = await accounts.create_api_key(db, user.id, "k")
    state = await db.run("t", accounts.socket_grant_state_txn, key.id, agent)
    assert (state.key_ok, state.agent_mode) == (True, "local")
    await accounts.revoke_api_key(db, user.id, key.id)
    state = await db.run("t", accounts.socket_grant_state_txn, key.id, "gone@acme.test")
    assert (state.key_ok, state.agent_mode) == (False, None)
    state = await db.run("t", accounts.socket_grant_state_txn, "apk_missing", agent)
    assert state.key_ok is None
