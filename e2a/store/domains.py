"""Custom domains: claims (with the 72 h take-over rule), DNS verification state, DKIM keys,
and the system-owned shared domain (api.md §9, mail.md §7.5).

Claim rules (api.md §9.2), decided by :func:`claim_decision` (pure):

=============================================  ==========================================
existing row                                   outcome
=============================================  ==========================================
none                                           ``create``: new token, new DKIM key
the caller's (verified or not)                 ``unchanged``
verified, another user or the system           ``refuse`` (``domain_not_available``)
unverified, another user, claimed < 72 h ago   ``refuse``
unverified, another user, claimed ≥ 72 h ago   ``takeover``: new owner, token and DKIM key
=============================================  ==========================================

The DKIM key is generated *before* the claiming transaction (RSA keygen is slow and runs in a
thread; a transaction must not hold row locks meanwhile and must stay safe to retry). The
transaction re-reads the row under ``FOR UPDATE`` and decides again, so a race with another
claimer simply ends as whatever the rules say for the row it finds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from e2a.errors import BadRequest, NotFound
from e2a.ids import new_verification_token
from e2a.mailauth import dkimkeys
from e2a.mailauth.dkimkeys import DkimKeyPair
from e2a.store.database import Database, Txn
from e2a.store.models import Domain, DomainSigningKey

__all__ = [
    "ClaimOutcome",
    "claim_decision",
    "claim_domain",
    "delete_domain",
    "ensure_shared_domain",
    "get_domain",
    "get_user_domain",
    "list_domains",
    "mark_verified",
]

ClaimOutcome = str  # "create" | "unchanged" | "refuse" | "takeover"

_COLUMNS = (
    "domain, user_id, is_shared, verified, verification_token, claimed_at, created_at,"
    " verified_at, dkim_selector, dkim_public_key"
)


def _domain(row: dict[str, Any]) -> Domain:
    return Domain(
        domain=row["domain"],
        user_id=row["user_id"],
        is_shared=row["is_shared"],
        verified=row["verified"],
        verification_token=row["verification_token"],
        claimed_at=row["claimed_at"],
        created_at=row["created_at"],
        verified_at=row["verified_at"],
        dkim_selector=row["dkim_selector"],
        dkim_public_key=row["dkim_public_key"],
    )


def claim_decision(existing: Domain | None, user_id: str, takeover_due: bool) -> ClaimOutcome:
    """The claim table of api.md §9.2. ``takeover_due``: the unverified claim is at least
    ``domains.claim_takeover_hours`` old."""
    if existing is None:
        return "create"
    if existing.user_id == user_id and not existing.is_shared:
        return "unchanged"
    if existing.verified or existing.user_id is None or existing.is_shared:
        return "refuse"
    return "takeover" if takeover_due else "refuse"


def _not_available(domain: str) -> BadRequest:
    return BadRequest(f"domain {domain} is not available", code="domain_not_available")


async def _lock_txn(txn: Txn, domain: str, takeover_hours: int) -> tuple[Domain | None, bool]:
    row = await txn.fetchone(
        f"SELECT {_COLUMNS}, claimed_at <= now() - make_interval(hours => %s) AS takeover_due"
        " FROM domains WHERE domain = %s FOR UPDATE",
        (takeover_hours, domain),
    )
    if row is None:
        return None, False
    return _domain(row), bool(row["takeover_due"])


async def _peek_txn(txn: Txn, domain: str, takeover_hours: int) -> tuple[Domain | None, bool]:
    row = await txn.fetchone(
        f"SELECT {_COLUMNS}, claimed_at <= now() - make_interval(hours => %s) AS takeover_due"
        " FROM domains WHERE domain = %s",
        (takeover_hours, domain),
    )
    if row is None:
        return None, False
    return _domain(row), bool(row["takeover_due"])


async def _claim_txn(
    txn: Txn,
    user_id: str,
    domain: str,
    takeover_hours: int,
    selector: str,
    sealed_key: str,
    public_key: str,
) -> Domain:
    existing, due = await _lock_txn(txn, domain, takeover_hours)
    outcome = claim_decision(existing, user_id, due)
    if outcome == "refuse":
        raise _not_available(domain)
    if outcome == "unchanged":
        assert existing is not None
        return existing
    token = new_verification_token()
    if outcome == "create":
        # ON CONFLICT: a concurrent first claim committed between our SELECT and INSERT;
        # the retry-free answer is to refuse like any other foreign claim younger than 72 h.
        row = await txn.fetchone(
            "INSERT INTO domains (domain, user_id, is_shared, verified, verification_token,"
            " claimed_at, created_at, dkim_selector, dkim_private_key, dkim_public_key)"
            " VALUES (%s, %s, FALSE, FALSE, %s, now(), now(), %s, %s, %s)"
            f" ON CONFLICT (domain) DO NOTHING RETURNING {_COLUMNS}",
            (domain, user_id, token, selector, sealed_key, public_key),
        )
        if row is None:
            raise _not_available(domain)
        return _domain(row)
    # takeover
    row = await txn.fetchone(
        "UPDATE domains SET user_id = %s, verification_token = %s, claimed_at = now(),"
        " created_at = now(), verified = FALSE, verified_at = NULL, dkim_selector = %s,"
        " dkim_private_key = %s, dkim_public_key = %s"
        f" WHERE domain = %s RETURNING {_COLUMNS}",
        (user_id, token, selector, sealed_key, public_key, domain),
    )
    assert row is not None
    return _domain(row)


KeyGenerator = Callable[[], Awaitable[DkimKeyPair]]


async def claim_domain(
    db: Database,
    user_id: str,
    domain: str,
    *,
    master_key: bytes,
    takeover_hours: int,
    now: datetime,
    keygen: KeyGenerator | None = None,
) -> Domain:
    """Register ``domain`` (already normalised, not reserved) for ``user_id``.

    Args:
        now: current time; the DKIM selector is ``e2a`` + its UTC date.
        keygen: coroutine function returning a :class:`DkimKeyPair` (default: RSA 2048 in a
            thread).

    Returns:
        The created, taken-over or (caller's own) unchanged domain.

    Raises:
        BadRequest: ``domain_not_available``.
    """
    existing, due = await db.run("peek_domain", _peek_txn, domain, takeover_hours)
    outcome = claim_decision(existing, user_id, due)
    if outcome == "refuse":
        raise _not_available(domain)
    if outcome == "unchanged":
        assert existing is not None
        return existing
    pair = await (keygen or dkimkeys.generate_key)()
    sealed = dkimkeys.seal_private_key(master_key, pair.private_pem, domain)
    return await db.run(
        "claim_domain",
        _claim_txn,
        user_id,
        domain,
        takeover_hours,
        dkimkeys.selector_for(now),
        sealed,
        pair.public_key_b64,
    )


async def list_domains(db: Database, user_id: str) -> list[Domain]:
    """The user's domains, newest first."""

    async def _list_txn(txn: Txn) -> list[Domain]:
        rows = await txn.fetchall(
            f"SELECT {_COLUMNS} FROM domains WHERE user_id = %s AND NOT is_shared"
            " ORDER BY created_at DESC, domain",
            (user_id,),
        )
        return [_domain(r) for r in rows]

    return await db.run("list_domains", _list_txn)


async def get_domain(db: Database, domain: str) -> Domain | None:
    """Any domain row (custom or shared), whoever owns it."""

    async def _get_txn(txn: Txn) -> Domain | None:
        row = await txn.fetchone(f"SELECT {_COLUMNS} FROM domains WHERE domain = %s", (domain,))
        return None if row is None else _domain(row)

    return await db.run("get_domain", _get_txn)


async def get_user_domain(db: Database, user_id: str, domain: str) -> Domain | None:
    """The domain when ``user_id`` owns it (the shared domain is never "owned")."""
    found = await get_domain(db, domain)
    if found is None or found.user_id != user_id or found.is_shared:
        return None
    return found


async def mark_verified(db: Database, user_id: str, domain: str) -> Domain:
    """Record a successful verification (permanent); an already verified domain is returned
    as stored.

    Raises:
        NotFound: ``domain_not_found`` when the domain is missing or not the user's.
    """

    async def _verify_txn(txn: Txn) -> Domain:
        row = await txn.fetchone(
            "UPDATE domains SET verified = TRUE, verified_at = COALESCE(verified_at, now())"
            f" WHERE domain = %s AND user_id = %s AND NOT is_shared RETURNING {_COLUMNS}",
            (domain, user_id),
        )
        if row is None:
            raise NotFound("domain not found", code="domain_not_found")
        return _domain(row)

    return await db.run("verify_domain", _verify_txn)


async def delete_domain(db: Database, user_id: str, domain: str) -> None:
    """Delete the user's domain and its DKIM key.

    Raises:
        NotFound: ``domain_not_found``.
        BadRequest: ``domain_has_agents`` while any agent uses it.
    """

    async def _delete_txn(txn: Txn) -> None:
        row = await txn.fetchone(
            "SELECT domain FROM domains WHERE domain = %s AND user_id = %s AND NOT is_shared"
            " FOR UPDATE",
            (domain, user_id),
        )
        if row is None:
            raise NotFound("domain not found", code="domain_not_found")
        has_agents = await txn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE domain = %s)", (domain,)
        )
        if has_agents:
            raise BadRequest(
                f"domain {domain} still has agents; delete them first", code="domain_has_agents"
            )
        await txn.execute("DELETE FROM domains WHERE domain = %s", (domain,))

    await db.run("delete_domain", _delete_txn)


async def _ensure_shared_txn(txn: Txn, domain: str) -> None:
    await txn.execute(
        "INSERT INTO domains (domain, user_id, is_shared, verified, verified_at)"
        " VALUES (%s, NULL, TRUE, TRUE, now())"
        " ON CONFLICT (domain) DO UPDATE SET user_id = NULL, is_shared = TRUE, verified = TRUE,"
        " verified_at = COALESCE(domains.verified_at, now())",
        (domain,),
    )


async def ensure_shared_domain(db: Database, domain: str) -> None:
    """Upsert the shared domain as a system-owned, verified row (config.md §2.1, at start).

    The operator's configuration wins over an earlier user claim of the same name.
    """
    await db.run("ensure_shared_domain", _ensure_shared_txn, domain)


async def get_signing_key(db: Database, domain: str) -> DomainSigningKey | None:
    """The DKIM selector and encrypted private key of ``domain`` for outbound signing."""
    row = await db.fetchone(
        "SELECT is_shared, dkim_selector, dkim_private_key FROM domains WHERE domain = %s", (domain,)
    )
    return None if row is None else DomainSigningKey(row["is_shared"], row["dkim_selector"], row["dkim_private_key"])
