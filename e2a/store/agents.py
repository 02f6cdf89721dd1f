"""Agents: addresses, delivery mode (webhook or WebSocket), webhook state and HITL settings
(api.md §4, mail.md §4.5).

Agents are keyed by their address as registered (domain lowercased) and looked up
case-insensitively through the unique ``lower(id)`` index, so ``Bot@x`` and ``bot@x`` are one
agent everywhere.

Side effects on other aggregates that the spec ties to agent changes happen in the same
transaction as the change itself: releasing or failing deliveries when the webhook or mode
changes, revoking agent-scoped keys and deleting mail on delete. The NOTIFYs on
``e2a_revoke`` are queued in that transaction too, so listeners (WebSocket registry) only
hear about committed changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from e2a.errors import BadRequest, Conflict
from e2a.store.database import Database, Prepared, Txn
from e2a.store.events import CHANNEL_DELIVERY, CHANNEL_REVOKE
from e2a.store.models import Agent

__all__ = [
    "LOCAL_MODE_ERROR",
    "AgentUpdate",
    "UpdatePlan",
    "check_agent_domain",
    "create_agent",
    "delete_agent",
    "get_agent",
    "get_agent_by_address",
    "list_agents",
    "plan_update",
    "update_agent",
]

LOCAL_MODE_ERROR = "agent is in local mode"

_SELECT = (
    "SELECT a.id, a.user_id, a.domain, a.name, a.agent_mode, a.webhook_url, a.webhook_status,"
    " a.webhook_disabled_at, a.hitl_enabled, a.hitl_ttl_seconds, a.hitl_expiration_action,"
    " a.hitl_notify, a.hitl_reviewers, a.created_at, COALESCE(d.verified, FALSE) AS domain_verified"
    " FROM agents a LEFT JOIN domains d ON d.domain = a.domain"
)


def agent_row(row: dict[str, Any]) -> Agent:
    """An agents row (joined with ``domain_verified``) as the model."""
    reviewers = row["hitl_reviewers"]
    if isinstance(reviewers, str):
        reviewers = json.loads(reviewers)
    return Agent(
        id=row["id"],
        user_id=row["user_id"],
        domain=row["domain"],
        name=row["name"],
        agent_mode=row["agent_mode"],
        webhook_url=row["webhook_url"],
        webhook_status=row["webhook_status"],
        webhook_disabled_at=row["webhook_disabled_at"],
        hitl_enabled=row["hitl_enabled"],
        hitl_ttl_seconds=row["hitl_ttl_seconds"],
        hitl_expiration_action=row["hitl_expiration_action"],
        hitl_notify=row["hitl_notify"],
        hitl_reviewers=tuple(reviewers or ()),
        created_at=row["created_at"],
        domain_verified=bool(row["domain_verified"]),
    )


async def _fetch_txn(txn: Txn, user_id: str | None, key: str, lock: bool = False) -> Agent | None:
    sql = _SELECT + " WHERE lower(a.id) = lower(%s)"
    params: list[Any] = [key]
    if user_id is not None:
        sql += " AND a.user_id = %s"
        params.append(user_id)
    if lock:
        sql += " FOR UPDATE OF a"
    row = await txn.fetchone(sql, params)
    return None if row is None else agent_row(row)


async def list_agents(db: Database, user_id: str, only_agent: str | None = None) -> list[Agent]:
    """The user's agents, newest first; ``only_agent`` restricts to one (agent-scoped keys)."""

    async def _list_txn(txn: Txn) -> list[Agent]:
        sql = _SELECT + " WHERE a.user_id = %s"
        params: list[Any] = [user_id]
        if only_agent is not None:
            sql += " AND lower(a.id) = lower(%s)"
            params.append(only_agent)
        rows = await txn.fetchall(sql + " ORDER BY a.created_at DESC, a.id", params)
        return [agent_row(r) for r in rows]

    return await db.run("list_agents", _list_txn)


async def get_agent(db: Database, user_id: str, key: str) -> Agent | None:
    """The user's agent whose address equals ``key`` case-insensitively, else ``None``."""
    return await db.run("get_agent", _fetch_txn, user_id, key)


async def fetch_agent_txn(txn: Txn, user_id: str | None, key: str) -> Agent | None:
    """Inside a caller's transaction: the agent whose address equals ``key`` case-insensitively
    (of ``user_id`` when given, of any user when None)."""
    return await _fetch_txn(txn, user_id, key)


async def get_agent_by_address(db: Database, address: str) -> Agent | None:
    """Any user's agent by address (case-insensitive): inbound routing, internal sends."""
    return await db.run("get_agent_by_address", _fetch_txn, None, address)


# ------------------------------------------------------------------------------- create


async def _check_domain_txn(txn: Txn, user_id: str, domain: str, via_slug: bool) -> None:
    """Check 8 of api.md §4.2 under a share lock, so a concurrent domain delete waits."""
    row = await txn.fetchone(
        "SELECT user_id, is_shared, verified FROM domains WHERE domain = %s FOR SHARE", (domain,)
    )
    if via_slug:
        if row is None:
            await txn.execute(
                "INSERT INTO domains (domain, user_id, is_shared, verified, verified_at)"
                " VALUES (%s, NULL, TRUE, TRUE, now()) ON CONFLICT (domain) DO NOTHING",
                (domain,),
            )
        return
    if row is None or row["is_shared"] or row["user_id"] != user_id:
        raise BadRequest(f"domain {domain} is not registered to you", code="domain_not_registered")
    if not row["verified"]:
        raise BadRequest(f"domain {domain} is not verified", code="domain_not_verified")


async def check_agent_domain(db: Database, user_id: str, domain: str) -> None:
    """Check 8 of api.md §4.2 for a custom-domain address (not via slug).

    Raises:
        BadRequest: ``domain_not_registered`` (missing, foreign or the shared domain) or
            ``domain_not_verified``.
    """
    await db.run("check_agent_domain", _check_domain_txn, user_id, domain, False)


async def _create_txn(
    txn: Txn,
    user_id: str,
    address: str,
    domain: str,
    via_slug: bool,
    name: str,
    agent_mode: str,
    webhook_url: str,
) -> Agent:
    await _check_domain_txn(txn, user_id, domain, via_slug)
    status = "active" if agent_mode == "cloud" and webhook_url else "none"
    row = await txn.fetchone(
        "INSERT INTO agents (id, user_id, domain, name, agent_mode, webhook_url, webhook_status)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
        (address, user_id, domain, name, agent_mode, webhook_url, status),
    )
    if row is None:
        raise Conflict(f"agent {address} already exists", code="agent_exists")
    agent = await _fetch_txn(txn, user_id, address)
    assert agent is not None
    return agent


async def create_agent(
    db: Database,
    user_id: str,
    address: str,
    domain: str,
    *,
    via_slug: bool,
    name: str = "",
    agent_mode: str = "cloud",
    webhook_url: str = "",
) -> Agent:
    """Insert an agent with the defaults of api.md §2.1 (all inputs already validated).

    ``webhook_status`` starts ``active`` for a cloud agent with a URL, ``none`` otherwise.
    The domain check (8) is repeated under lock; address uniqueness (10) is the unique
    ``lower(id)`` index.

    Raises:
        BadRequest: ``domain_not_registered`` / ``domain_not_verified``.
        Conflict: 409 ``agent_exists`` (any user, case-insensitive).
    """
    return await db.run(
        "create_agent", _create_txn, user_id, address, domain, via_slug, name, agent_mode, webhook_url
    )


# ------------------------------------------------------------------------------- update


@dataclass(frozen=True)
class AgentUpdate:
    """The recognised fields of a ``PUT`` (``None`` = not in the request); already validated
    one by one (types, ranges, header text, SSRF)."""

    webhook_url: str | None = None
    agent_mode: str | None = None
    hitl_enabled: bool | None = None
    hitl_ttl_seconds: int | None = None
    hitl_expiration_action: str | None = None
    name: str | None = None
    hitl_notify: bool | None = None
    hitl_reviewers: tuple[str, ...] | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__dataclass_fields__)


@dataclass(frozen=True)
class UpdatePlan:
    """What :func:`plan_update` decided: the new column values and the side effects."""

    values: dict[str, Any]
    activate_webhook: bool  # status → active, paused deliveries released
    mode_changed: bool
    to_local: bool


def plan_update(current: Agent, update: AgentUpdate) -> UpdatePlan:
    """The rules of api.md §4.4 as a pure function of the stored agent and the request.

    * ``agent_mode`` given → the stored webhook becomes the request's ``webhook_url`` or ``""``.
    * A cloud agent never ends with an empty webhook URL → 400 ``webhook_url_required``.
    * A non-empty ``webhook_url`` on an agent that ends up cloud → status ``active`` and its
      paused deliveries are released (even when the URL is unchanged).
    * Local agents have status ``none``.

    Raises:
        BadRequest: ``webhook_url_required``.
    """
    mode = update.agent_mode or current.agent_mode
    if update.agent_mode is not None:
        webhook = update.webhook_url or ""
    elif update.webhook_url is not None:
        webhook = update.webhook_url
    else:
        webhook = current.webhook_url
    if mode == "cloud" and not webhook:
        raise BadRequest("a cloud-mode agent needs a webhook_url", code="webhook_url_required")

    values: dict[str, Any] = {"agent_mode": mode, "webhook_url": webhook}
    activate = mode == "cloud" and bool(update.webhook_url)
    if mode == "local":
        values["webhook_status"] = "none"
        values["webhook_disabled_at"] = None
    elif activate:
        values["webhook_status"] = "active"
        values["webhook_disabled_at"] = None
    for name in ("hitl_enabled", "hitl_ttl_seconds", "hitl_expiration_action", "name", "hitl_notify"):
        value = getattr(update, name)
        if value is not None:
            values[name] = value
    if update.hitl_reviewers is not None:
        values["hitl_reviewers"] = json.dumps(list(update.hitl_reviewers))
    mode_changed = mode != current.agent_mode
    return UpdatePlan(values, activate, mode_changed, mode_changed and mode == "local")


async def _update_txn(txn: Txn, user_id: str, key: str, update: AgentUpdate) -> Agent | None:
    current = await _fetch_txn(txn, user_id, key, lock=True)
    if current is None:
        return None
    plan = plan_update(current, update)
    columns = sorted(plan.values)
    assignments = ", ".join(
        f"{c} = %s::jsonb" if c == "hitl_reviewers" else f"{c} = %s" for c in columns
    )
    await txn.execute(
        f"UPDATE agents SET {assignments} WHERE id = %s",
        [plan.values[c] for c in columns] + [current.id],
    )
    if plan.activate_webhook:
        # mail.md §4.5: every paused delivery becomes pending, attempts reset, due now. A row a
        # 410 paused while another of its attempts was still in flight keeps that attempt's
        # live lease: clearing it would let a claim POST the same message a second time while
        # the first attempt is still running.
        await txn.execute(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),"
            " leased_until = CASE WHEN leased_until > now() THEN leased_until END"
            " WHERE agent_id = %s AND status = 'paused'",
            (current.id,),
        )
        if txn.rowcount:
            await txn.notify(CHANNEL_DELIVERY, "")
    if plan.to_local:
        await txn.execute(
            "UPDATE deliveries SET status = 'failed', last_error = %s, next_attempt_at = NULL,"
            " leased_until = NULL WHERE agent_id = %s AND status IN ('pending', 'paused')",
            (LOCAL_MODE_ERROR, current.id),
        )
    if plan.mode_changed:
        await txn.notify(CHANNEL_REVOKE, f"agentmode\t{current.id}")
    return await _fetch_txn(txn, user_id, current.id)


async def update_agent(db: Database, user_id: str, key: str, update: AgentUpdate) -> Agent | None:
    """Apply a validated ``PUT`` in one transaction; ``None`` when the agent is not the
    user's.

    Raises:
        BadRequest: ``webhook_url_required``.
    """
    return await db.run("update_agent", _update_txn, user_id, key, update)


# ------------------------------------------------------------------------------- delete


async def _delete_txn(txn: Txn, user_id: str, key: str) -> str | None:
    current = await _fetch_txn(txn, user_id, key, lock=True)
    if current is None:
        return None
    await txn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE agent_id = %s AND revoked_at IS NULL",
        (current.id,),
    )
    # Deliveries and outbound relay rows go with their messages (ON DELETE CASCADE); delete
    # deliveries first anyway so none is claimed between the two statements' locks.
    await txn.execute("DELETE FROM deliveries WHERE agent_id = %s", (current.id,))
    await txn.execute("DELETE FROM messages WHERE agent_id = %s", (current.id,))
    await txn.execute("DELETE FROM agents WHERE id = %s", (current.id,))
    await txn.notify(CHANNEL_REVOKE, f"agent\t{current.id}")
    return current.id


async def delete_agent(db: Database, user_id: str, key: str) -> str | None:
    """Delete the user's agent with its messages (inbound, outbound, held), deliveries and
    queued outbound work; revoke its agent-scoped keys; NOTIFY ``agent\\t<id>``.

    Returns the deleted agent's id, or ``None`` when the agent is not the user's.
    """
    return await db.run("delete_agent", _delete_txn, user_id, key)


# One statement per RCPT, planned once per pooled connection.
_RECEIVING_AGENT = Prepared(
    "e2a_rcpt_lookup",
    "SELECT a.id FROM agents a JOIN domains d ON d.domain = a.domain WHERE lower(a.id) = %(key)s AND d.verified",
)


async def find_receiving_agent(db: Database, key: str) -> str | None:
    """The exact id of the agent whose agent key is ``key``, if its domain is verified (RCPT TO)."""
    row = await db.fetchone_prepared(_RECEIVING_AGENT, {"key": key})
    return None if row is None else row["id"]


async def find_agent(db: Database, user_id: str, key: str) -> Agent | None:
    """As :func:`get_agent` in one plain read (no transaction): the per-request path lookups."""
    row = await db.fetchone(_SELECT + " WHERE lower(a.id) = lower(%s) AND a.user_id = %s", (key, user_id))
    return None if row is None else agent_row(row)


async def existing_agent_keys(db: Database, addresses: list[str]) -> set[str]:
    """Which of ``addresses`` are agents on this deployment, as lowercased agent keys."""
    if not addresses:
        return set()
    rows = await db.fetchall(
        "SELECT lower(id) AS key FROM agents WHERE lower(id) = ANY(%s)", ([a.lower() for a in addresses],)
    )
    return {r["key"] for r in rows}
