"""Accounts store: users, API keys and signing secrets (api.md §0.1, §10, §11, §12).

Caps and floors (100 active keys, 1–5 signing secrets, at least one user-scoped key) must hold
under concurrency, so every transaction that checks one of them first locks the user's row
(``SELECT … FOR UPDATE``): concurrent creates/deletes of one user run one after the other while
different users never wait for each other.

Revocations are announced on :data:`~e2a.store.events.CHANNEL_REVOKE` from inside the
transaction, so every process hears about them exactly when (and only if) they commit.

Plaintext API keys are never stored (only SHA-256 and a display prefix); signing secrets are
stored encrypted with the master key, bound to their row id (config.md §2.4).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from e2a import crypto, ids
from e2a.errors import BadRequest, Conflict, NotFound
from e2a.store.agents import agent_row
from e2a.store.database import Database, Txn
from e2a.store.events import CHANNEL_REVOKE
from e2a.store.models import (
    AccountExport,
    ApiKey,
    Delivery,
    ExportedDomain,
    ExportedMessage,
    KeyOwner,
    SigningSecret,
    SocketGrantState,
    UsageEvent,
    User,
)

MAX_ACTIVE_KEYS = 100
MAX_SIGNING_SECRETS = 5
DEFAULT_SECRET_NAME = "default"

# An agent-scoped key whose agent row is gone (agent_id set NULL by the FK) is dead even if
# nobody stamped revoked_at; it must neither authenticate nor count as active.
_ACTIVE_KEY = "revoked_at IS NULL AND (scope = 'user' OR agent_id IS NOT NULL)"
_KEY_COLUMNS = "id, user_id, name, key_prefix, scope, agent_id, created_at, last_used_at, revoked_at"
_SECRET_COLUMNS = "id, user_id, name, secret_prefix, created_at, last_signed_at"


@dataclass(frozen=True)
class BootstrapResult:
    """What ``e2a-admin bootstrap`` prints: the user, a new user key, the newest secret."""

    user: User
    created_user: bool
    api_key: ApiKey
    api_key_plaintext: str
    signing_secret_id: str
    signing_secret: str


# ---------------------------------------------------------------- row → model


def _user(row: dict[str, Any]) -> User:
    return User(row["id"], row["email"], row["name"], row["created_at"])


def _key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        key_prefix=row["key_prefix"],
        scope=row["scope"],
        agent_id=row["agent_id"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _secret(row: dict[str, Any]) -> SigningSecret:
    return SigningSecret(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        secret_prefix=row["secret_prefix"],
        created_at=row["created_at"],
        last_signed_at=row["last_signed_at"],
    )


# ---------------------------------------------------------------- users


async def _lock_user_txn(txn: Txn, user_id: str) -> None:
    """Serialise cap/floor checks per user. A vanished user is a 404 of nothing in particular
    (its key would not have authenticated a moment later anyway)."""
    row = await txn.fetchone("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
    if row is None:
        raise NotFound("user not found", code="not_found")


async def _get_user_by_email_txn(txn: Txn, email: str) -> User | None:
    row = await txn.fetchone(
        "SELECT id, email, name, created_at FROM users WHERE lower(email) = lower(%s)", (email,)
    )
    return None if row is None else _user(row)


async def _get_user_txn(txn: Txn, user_id: str) -> User | None:
    row = await txn.fetchone("SELECT id, email, name, created_at FROM users WHERE id = %s", (user_id,))
    return None if row is None else _user(row)


async def _create_user_txn(
    txn: Txn, master_key: bytes, email: str, name: str
) -> tuple[User, SigningSecret, str]:
    """Insert the user and its first signing secret ``default`` (every user always has one).

    Raises:
        Conflict(user_exists): the email (case-insensitively) is taken.
    """
    user_id = ids.new_user_id()
    row = await txn.fetchone(
        "INSERT INTO users (id, email, name) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING RETURNING id, email, name, created_at",
        (user_id, email.strip().lower(), name),
    )
    if row is None:
        raise Conflict("a user with this email already exists", code="user_exists")
    secret, plaintext = await _insert_signing_secret_txn(txn, master_key, user_id, DEFAULT_SECRET_NAME)
    return _user(row), secret, plaintext


async def create_user(
    db: Database, master_key: bytes, email: str, name: str = ""
) -> tuple[User, SigningSecret, str]:
    """Create a user (email lowercased) with its first signing secret ``default``.

    Returns (user, secret metadata, secret plaintext). Raises Conflict(user_exists).
    """
    return await db.run("create_user", _create_user_txn, master_key, email, name)


async def get_user_by_email(db: Database, email: str) -> User | None:
    return await db.run("get_user_by_email", _get_user_by_email_txn, email)


async def get_user(db: Database, user_id: str) -> User | None:
    return await db.run("get_user", _get_user_txn, user_id)


async def _bootstrap_txn(txn: Txn, master_key: bytes, email: str, name: str) -> BootstrapResult:
    email = email.strip().lower()
    user = await _get_user_by_email_txn(txn, email)
    created = False
    if user is None:
        try:
            user, _secret_row, _plain = await _create_user_txn(txn, master_key, email, name)
            created = True
        except Conflict:
            # A concurrent bootstrap created it first; READ COMMITTED lets us see it now.
            user = await _get_user_by_email_txn(txn, email)
            if user is None:
                raise
    key, plaintext = await _create_api_key_txn(txn, user.id, "bootstrap", None)
    secrets = await _active_secrets_with_ids_txn(txn, master_key, user.id)
    if not secrets:
        # Defensive: the floor says this cannot happen, but a hand-edited database should
        # not make bootstrap print nothing.
        meta, plain = await _insert_signing_secret_txn(txn, master_key, user.id, DEFAULT_SECRET_NAME)
        secrets = [(meta.id, plain)]
    secret_id, secret = secrets[0]
    return BootstrapResult(user, created, key, plaintext, secret_id, secret)


async def bootstrap(db: Database, master_key: bytes, email: str, name: str = "bootstrap") -> BootstrapResult:
    """config.md §5.1: get or create the user, always add a user-scoped key ``bootstrap``."""
    return await db.run("bootstrap", _bootstrap_txn, master_key, email, name)


# ---------------------------------------------------------------- API keys


async def _find_agent_txn(txn: Txn, user_id: str, agent: str) -> str | None:
    """The stored id of one of the user's agents, matched case-insensitively."""
    row = await txn.fetchone(
        "SELECT id FROM agents WHERE lower(id) = lower(%s) AND user_id = %s", (agent, user_id)
    )
    return None if row is None else row["id"]


async def _create_api_key_txn(
    txn: Txn, user_id: str, name: str, agent: str | None
) -> tuple[ApiKey, str]:
    await _lock_user_txn(txn, user_id)
    agent_id = None
    if agent is not None:
        agent_id = await _find_agent_txn(txn, user_id, agent)
        if agent_id is None:
            raise NotFound("agent not found", code="agent_not_found")
    active = await txn.fetchval(f"SELECT count(*) FROM api_keys WHERE user_id = %s AND {_ACTIVE_KEY}", (user_id,))
    if active >= MAX_ACTIVE_KEYS:
        raise BadRequest(f"at most {MAX_ACTIVE_KEYS} active API keys per user", code="too_many_keys")
    plaintext = ids.new_api_key()
    row = await txn.fetchone(
        "INSERT INTO api_keys (id, user_id, agent_id, scope, name, key_hash, key_prefix, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, clock_timestamp())"
        f" RETURNING {_KEY_COLUMNS}",
        (
            ids.new_key_id(),
            user_id,
            agent_id,
            "agent" if agent_id else "user",
            name,
            crypto.hash_api_key(plaintext),
            crypto.key_prefix(plaintext),
        ),
    )
    assert row is not None
    return _key(row), plaintext


async def create_api_key(
    db: Database, user_id: str, name: str = "", agent: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key (agent-scoped when ``agent`` names one of the user's agents).

    Returns (key, plaintext); the plaintext exists only in this return value.

    Raises:
        NotFound(agent_not_found): ``agent`` is unknown or another user's.
        BadRequest(too_many_keys): the user already has 100 active keys.
    """
    return await db.run("create_api_key", _create_api_key_txn, user_id, name, agent)


async def _list_api_keys_txn(txn: Txn, user_id: str) -> list[ApiKey]:
    rows = await txn.fetchall(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = %s AND {_ACTIVE_KEY}"
        " ORDER BY created_at DESC, id DESC",
        (user_id,),
    )
    return [_key(r) for r in rows]


async def list_api_keys(db: Database, user_id: str) -> list[ApiKey]:
    """Active keys of the user, newest first."""
    return await db.run("list_api_keys", _list_api_keys_txn, user_id)


async def _revoke_api_key_txn(txn: Txn, user_id: str, key_id: str) -> ApiKey:
    await _lock_user_txn(txn, user_id)
    row = await txn.fetchone(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = %s AND user_id = %s AND {_ACTIVE_KEY}",
        (key_id, user_id),
    )
    if row is None:
        raise NotFound("API key not found", code="key_not_found")
    if row["scope"] == "user":
        others = await txn.fetchval(
            "SELECT count(*) FROM api_keys WHERE user_id = %s AND scope = 'user'"
            " AND revoked_at IS NULL AND id <> %s",
            (user_id, key_id),
        )
        if others == 0:
            raise BadRequest("cannot revoke the last active user-scoped key", code="last_user_key")
    revoked = await txn.fetchone(
        f"UPDATE api_keys SET revoked_at = now() WHERE id = %s RETURNING {_KEY_COLUMNS}", (key_id,)
    )
    assert revoked is not None
    await txn.notify(CHANNEL_REVOKE, f"key\t{key_id}")
    return _key(revoked)


async def revoke_api_key(db: Database, user_id: str, key_id: str) -> ApiKey:
    """Soft-delete a key and announce it on ``e2a_revoke`` (``key\\t<id>``) at commit.

    Raises:
        NotFound(key_not_found): missing, another user's, or already revoked.
        BadRequest(last_user_key): it is the user's last active user-scoped key.
    """
    return await db.run("revoke_api_key", _revoke_api_key_txn, user_id, key_id)


# ---------------------------------------------------------------- signing secrets


async def _insert_signing_secret_txn(
    txn: Txn, master_key: bytes, user_id: str, name: str
) -> tuple[SigningSecret, str]:
    secret_id = ids.new_secret_id()
    plaintext = ids.new_signing_secret()
    row = await txn.fetchone(
        "INSERT INTO signing_secrets (id, user_id, name, secret, secret_prefix)"
        f" VALUES (%s, %s, %s, %s, %s) RETURNING {_SECRET_COLUMNS}",
        (
            secret_id,
            user_id,
            name,
            crypto.encrypt(master_key, plaintext.encode("ascii"), secret_id),
            crypto.key_prefix(plaintext),
        ),
    )
    assert row is not None
    return _secret(row), plaintext


async def _create_signing_secret_txn(
    txn: Txn, master_key: bytes, user_id: str, name: str
) -> tuple[SigningSecret, str]:
    await _lock_user_txn(txn, user_id)
    count = await txn.fetchval("SELECT count(*) FROM signing_secrets WHERE user_id = %s", (user_id,))
    if count >= MAX_SIGNING_SECRETS:
        raise BadRequest(f"at most {MAX_SIGNING_SECRETS} signing secrets per user", code="too_many_secrets")
    return await _insert_signing_secret_txn(txn, master_key, user_id, name)


async def create_signing_secret(
    db: Database, master_key: bytes, user_id: str, name: str
) -> tuple[SigningSecret, str]:
    """Create a secret (``name`` already normalised by the caller). Returns (metadata, plaintext).

    Raises:
        BadRequest(too_many_secrets): 5 already exist.
    """
    return await db.run("create_signing_secret", _create_signing_secret_txn, master_key, user_id, name)


async def _list_signing_secrets_txn(txn: Txn, user_id: str) -> list[SigningSecret]:
    rows = await txn.fetchall(
        f"SELECT {_SECRET_COLUMNS} FROM signing_secrets WHERE user_id = %s ORDER BY created_at DESC, id DESC",
        (user_id,),
    )
    return [_secret(r) for r in rows]


async def list_signing_secrets(db: Database, user_id: str) -> list[SigningSecret]:
    """The user's secrets, newest first, without their values."""
    return await db.run("list_signing_secrets", _list_signing_secrets_txn, user_id)


async def _delete_signing_secret_txn(txn: Txn, user_id: str, secret_id: str) -> None:
    await _lock_user_txn(txn, user_id)
    row = await txn.fetchone(
        "SELECT id FROM signing_secrets WHERE id = %s AND user_id = %s", (secret_id, user_id)
    )
    if row is None:
        raise NotFound("signing secret not found", code="signing_secret_not_found")
    count = await txn.fetchval("SELECT count(*) FROM signing_secrets WHERE user_id = %s", (user_id,))
    if count <= 1:
        raise BadRequest("cannot delete the only signing secret", code="last_signing_secret")
    await txn.execute("DELETE FROM signing_secrets WHERE id = %s", (secret_id,))


async def delete_signing_secret(db: Database, user_id: str, secret_id: str) -> None:
    """Raises NotFound(signing_secret_not_found) first, then BadRequest(last_signing_secret)."""
    await db.run("delete_signing_secret", _delete_signing_secret_txn, user_id, secret_id)


async def _active_secrets_with_ids_txn(txn: Txn, master_key: bytes, user_id: str) -> list[tuple[str, str]]:
    rows = await txn.fetchall(
        "SELECT id, secret FROM signing_secrets WHERE user_id = %s ORDER BY created_at DESC, id DESC",
        (user_id,),
    )
    return [(r["id"], crypto.decrypt(master_key, r["secret"], r["id"]).decode("ascii")) for r in rows]


async def active_secrets_txn(txn: Txn, master_key: bytes, user_id: str) -> list[str]:
    """Inside a transaction: decrypted secrets, newest first."""
    return [secret for _id, secret in await _active_secrets_with_ids_txn(txn, master_key, user_id)]


#: Signing secrets that sign a webhook attempt, newest first (mail.md §3.3: rotation overlap).
MAX_WEBHOOK_SECRETS = 5

#: SQL (LATERAL-joinable, needs ``a.user_id`` in scope and a ``%(max_secrets)s`` parameter): the
#: owner's newest signing secrets as (``secret_ids``, ``secrets``) arrays, newest first — element
#: 1 signs the X-E2A-Auth set (mail.md §3.3), all of them sign a webhook (rotation overlap). The
#: same ordering as :func:`newest_secret_txn`. NULL arrays when the user has no secret.
NEWEST_SECRETS_LATERAL = """SELECT array_agg(t.id ORDER BY t.created_at DESC, t.id DESC) AS secret_ids,
           array_agg(t.secret ORDER BY t.created_at DESC, t.id DESC) AS secrets
    FROM (SELECT id, secret, created_at FROM signing_secrets WHERE user_id = a.user_id
          ORDER BY created_at DESC, id DESC LIMIT %(max_secrets)s) t"""


class SecretCache:
    """Decrypted signing secrets, kept briefly so that signing does not decrypt per message.

    Keyed by (secret id, ciphertext): the caller still looks up the newest secret id in SQL
    for every message, so a rotation signs with the new secret from the next message on and
    a deleted secret is never picked; only the AES-GCM opening is saved. Entries expire after
    ``ttl`` seconds so plaintext does not linger; the size is bounded.
    """

    def __init__(self, ttl: float = 300.0, max_size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_size
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, str]] = {}

    def decrypt(self, master_key: bytes, secret_id: str, ciphertext: str) -> str:
        """The plaintext of ``ciphertext`` (row ``secret_id``), from the cache when fresh.

        Raises:
            crypto.DecryptionError: as :func:`e2a.crypto.decrypt` (failures are not cached).
        """
        key = (secret_id, ciphertext)
        now = self._clock()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        plain = crypto.decrypt(master_key, ciphertext, secret_id).decode("ascii")
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self._max:
                    self._entries.clear()
            self._entries[key] = (now + self._ttl, plain)
        return plain


async def newest_secret_txn(txn: Txn, master_key: bytes, user_id: str) -> str:
    """The secret that signs (mail.md §3.3: the newest active one), decrypted."""
    row = await txn.fetchone(
        "SELECT id, secret FROM signing_secrets WHERE user_id = %s ORDER BY created_at DESC, id DESC LIMIT 1",
        (user_id,),
    )
    if row is None:
        raise RuntimeError(f"user {user_id} has no signing secret")
    return crypto.decrypt(master_key, row["secret"], row["id"]).decode("ascii")


async def active_secrets(db: Database, master_key: bytes, user_id: str) -> list[str]:
    """Decrypted secret values, newest first: the order signatures are computed in (mail.md §3.3).

    Raises:
        crypto.DecryptionError: a stored value does not open with this master key.
    """
    return await db.run("active_secrets", active_secrets_txn, master_key, user_id)


# ---------------------------------------------------------------- export (§12.1)


_EXPORT_MESSAGE_COLUMNS = ", ".join(ExportedMessage.__dataclass_fields__)


async def _export_user_txn(txn: Txn, user_id: str) -> AccountExport | None:
    # One snapshot for every SELECT below: the export is internally consistent.
    await txn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    now = await txn.fetchval("SELECT clock_timestamp()")
    user = await _get_user_txn(txn, user_id)
    if user is None:
        return None
    domains = await txn.fetchall(
        "SELECT domain, user_id, verified, verification_token, created_at, verified_at"
        " FROM domains WHERE user_id = %s ORDER BY created_at DESC, domain",
        (user_id,),
    )
    agents = await txn.fetchall(
        "SELECT a.*, COALESCE(d.verified, FALSE) AS domain_verified"
        " FROM agents a LEFT JOIN domains d ON d.domain = a.domain"
        " WHERE a.user_id = %s ORDER BY a.created_at DESC, a.id",
        (user_id,),
    )
    keys = await txn.fetchall(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = %s ORDER BY created_at DESC, id DESC", (user_id,)
    )
    secrets = await _list_signing_secrets_txn(txn, user_id)
    messages = await txn.fetchall(
        # Reviewer notifications are e2a's own mail about a hold (they carry approval links),
        # and console sign-in mail carries a sign-in link: neither is the user's messages, the
        # export lists the user's inbound and outbound mail only.
        f"SELECT {_EXPORT_MESSAGE_COLUMNS} FROM messages WHERE user_id = %s AND type NOT IN ('notify', 'signin')"
        " ORDER BY created_at, id",
        (user_id,),
    )
    deliveries = await txn.fetchall(
        "SELECT d.* FROM deliveries d JOIN agents a ON a.id = d.agent_id"
        " WHERE a.user_id = %s ORDER BY d.created_at, d.id",
        (user_id,),
    )
    usage = await txn.fetchall(
        "SELECT id, agent_id, domain, direction, event_type, created_at FROM usage_events"
        " WHERE user_id = %s ORDER BY created_at, id",
        (user_id,),
    )

    def message(row: dict[str, Any]) -> ExportedMessage:
        raw = row["raw_message"]
        return ExportedMessage(**{**row, "raw_message": None if raw is None else bytes(raw)})

    return AccountExport(
        generated_at=now,
        user=user,
        domains=tuple(ExportedDomain(**r) for r in domains),
        agents=tuple(agent_row(r) for r in agents),
        api_keys=tuple(_key(r) for r in keys),
        signing_secrets=tuple(secrets),
        messages=tuple(message(r) for r in messages),
        deliveries=tuple(Delivery.from_row(r) for r in deliveries),
        usage_events=tuple(UsageEvent(**r) for r in usage),
    )


async def export_user(db: Database, user_id: str) -> AccountExport | None:
    """Everything the user owns for the §12.1 export, read in one repeatable-read snapshot;
    None if no user. The JSON document is built by :mod:`e2a.api.export`."""
    return await db.run("export_user", _export_user_txn, user_id)


# ---------------------------------------------------------------- delete (§12.2)


async def _delete_user_txn(txn: Txn, user_id: str) -> dict[str, Any]:
    # Serializable: a message stored or a key created concurrently either lands before the
    # snapshot (and is deleted and counted) or makes this transaction retry.
    await txn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    await _lock_user_txn(txn, user_id)

    async def delete(sql: str) -> int:
        await txn.execute(sql, (user_id,))
        return max(txn.rowcount, 0)

    deliveries = await delete(
        "DELETE FROM deliveries WHERE agent_id IN (SELECT id FROM agents WHERE user_id = %s)"
    )
    messages = await delete("DELETE FROM messages WHERE user_id = %s")
    keys = await delete("DELETE FROM api_keys WHERE user_id = %s")
    secrets = await delete("DELETE FROM signing_secrets WHERE user_id = %s")
    agents = await delete("DELETE FROM agents WHERE user_id = %s")
    domains = await delete("DELETE FROM domains WHERE user_id = %s")
    usage = await delete("DELETE FROM usage_events WHERE user_id = %s")
    users = await delete("DELETE FROM users WHERE id = %s")
    await txn.notify(CHANNEL_REVOKE, f"user\t{user_id}")
    return {
        "usage_events_deleted": usage,
        "usage_summaries_deleted": 0,
        "messages_deleted": messages,
        "agents_deleted": agents,
        "domains_deleted": domains,
        "api_keys_deleted": keys,
        "sessions_deleted": 0,
        "user_deleted": users == 1,
        "signing_secrets_deleted": secrets,
        "deliveries_deleted": deliveries,
    }


async def delete_user(db: Database, user_id: str) -> dict[str, Any]:
    """Delete the user and everything owned in one serializable transaction (§12.2).

    Returns the counts in the spec's key order; announces ``user\\t<id>`` on ``e2a_revoke``.
    """
    return await db.run("delete_user", _delete_user_txn, user_id)


async def socket_grant_state_txn(txn: Txn, key_id: str, agent_id: str) -> SocketGrantState:
    """Whether an open WebSocket's key still stands and its agent's mode, in one statement."""
    row = await txn.fetchone(
        f"SELECT (SELECT {_ACTIVE_KEY} FROM api_keys WHERE id = %s) AS key_ok,"
        " (SELECT agent_mode FROM agents WHERE id = %s) AS mode",
        (key_id, agent_id),
    )
    assert row is not None
    return SocketGrantState(key_ok=row["key_ok"], agent_mode=row["mode"])


# last_used_at is coalesced: written at most once per minute per key.
LAST_USED_GRANULARITY_SECONDS = 60


async def _find_live_key_txn(txn: Txn, key_hash: str) -> KeyOwner | None:
    row = await txn.fetchone(
        "SELECT k.id, k.user_id, k.scope, k.agent_id, u.email,"
        " (k.last_used_at IS NULL OR k.last_used_at < now() - make_interval(secs => %s)) AS stale"
        " FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE k.key_hash = %s AND k.revoked_at IS NULL",
        (LAST_USED_GRANULARITY_SECONDS, key_hash),
    )
    if row is None:
        return None
    if row["scope"] == "agent" and row["agent_id"] is None:
        return None  # its agent was deleted: the key is dead
    if row["stale"]:
        await txn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = %s", (row["id"],))
    return KeyOwner(
        key_id=row["id"], user_id=row["user_id"], user_email=row["email"], scope=row["scope"], agent_id=row["agent_id"]
    )


async def find_live_key(db: Database, key_hash: str) -> KeyOwner | None:
    """The live key with this SHA-256 and its owner (None: unknown, revoked or agent gone);
    touches ``last_used_at`` at most once per :data:`LAST_USED_GRANULARITY_SECONDS`."""
    return await db.run("authenticate", _find_live_key_txn, key_hash)
