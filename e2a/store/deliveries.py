"""Webhook deliveries: the durable job queue of mail.md §4 and the API's view of it (api.md §2.7).

Queue rules:

* Jobs are claimed by ONE statement, ``UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
  … RETURNING``, which sets a lease (``leased_until``). Two processes never claim the same row;
  a crashed process's job becomes claimable again when its lease runs out.
* At most ``max_concurrency_per_agent`` attempts per agent are leased at once, in every
  process and node together. A statement that leases an agent's job beyond the one it hands
  on (the claim, a job leased at accept) asks ``e2a_webhook_slots_free`` (schema/0008) first:
  it holds the agent's advisory lock until the statement's transaction ends and counts the
  live leases on a snapshot taken after the lock, so two transactions can never both count
  the same free slot. Everyone takes several agents' locks in agent-id order, so no two wait
  for each other in a cycle. The accept waits for the lock as long as it takes; it takes its
  locks after all its other writes (:meth:`e2a.store.database.Txn.execute_locking`), so it
  never holds one while waiting for a row lock. The claim waits at most
  ``CLAIM_LOCK_WAIT_MS`` per agent, then leaves that agent to a later claim. A lock is held
  for one claim statement or through one accept's commit. Live leases are counted on
  pending and paused rows (a 410 pauses the agent's other jobs while their attempts run on).
* Every finishing write is guarded by the lease it finishes (``leased_until = <the lease the
  job was taken with>``): a worker whose lease ran out and whose job was leased again
  elsewhere cannot overwrite the newer state nor clear the new holder's lease. The lease's
  expiry is a fencing token: a row is only leased again once its lease is absent or run out
  at the leasing statement's ``now``, and the new one ends ``lease_seconds`` after that
  ``now``, so every new lease of a row ends strictly later than every earlier one (across
  processes and nodes, whatever their clocks).
* The 2xx write can also lease the same agent's next due job in the SAME statement
  (:func:`record_delivered_and_claim_next`): the finishing attempt's slot is handed on without a
  claim round trip. It leases only when the guarded update matched and the finishing row's own
  lease is still live, SKIP LOCKED like the claim, and within the same per-agent count (the
  finishing row excluded, since it is the slot being handed on). It takes no lock: it swaps
  one live lease for another in one commit, so every count taken under the lock stays true.
* Times are passed in (``now``) rather than taken from ``now()``, so the worker's injected clock
  drives the schedule (tests advance a ``task.Clock``; production passes the reactor's time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from e2a import ids
from e2a.errors import Conflict, NotFound
from e2a.store.accounts import MAX_WEBHOOK_SECRETS, NEWEST_SECRETS_LATERAL, SecretCache, active_secrets_txn
from e2a.store.database import Database, Prepared, Txn
from e2a.store.events import CHANNEL_DELIVERY
from e2a.store.messages import INBOUND_BY_ID
from e2a.store.models import Delivery

__all__ = [
    "DELIVERY_STATUSES",
    "AttemptContext",
    "ClaimedJob",
    "Delivery",
    "FreshLease",
    "claim_due",
    "count_due",
    "due_by_agent",
    "list_deliveries",
    "lease_granted",
    "load_attempt",
    "record_delivered",
    "record_delivered_and_claim_next",
    "record_failed",
    "record_gone",
    "record_paused",
    "record_retry",
    "redeliver",
    "release_lease",
]

DELIVERY_STATUSES = ("pending", "delivered", "failed", "paused")

_COLUMNS = (
    "id, message_id, agent_id, webhook_url, status, attempts, last_status_code, last_error,"
    " created_at, last_attempt_at, next_attempt_at, delivered_at"
)


# ------------------------------------------------------------------------------ the queue


@dataclass(frozen=True)
class ClaimedJob:
    """A leased delivery. ``attempts`` = attempts made before this one (this is ``attempts + 1``).

    ``row`` is what the claiming statement read for the attempt (message, agent, the owner's
    secret ids and ciphertexts) so the attempt needs no second round trip; None for a job
    built elsewhere (then :func:`load_attempt` reads it).
    """

    id: str
    message_id: str
    agent_id: str
    attempts: int
    row: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    #: The lease this job was taken with (its ``leased_until``): what every finishing write
    #: presents. None for a job that holds no lease, whose writes then match nothing.
    lease_until: datetime | None = None

    @property
    def attempt(self) -> int:
        return self.attempts + 1

    @property
    def user_id(self) -> str | None:
        """The owner of the job's agent when the row says (the per-user slot share)."""
        return None if self.row is None else self.row.get("user_id")


MAX_SECRETS = MAX_WEBHOOK_SECRETS

# Shared by the two statements that lease jobs (``_CLAIM`` and ``_DELIVERED_CLAIM_NEXT``).
#
# A due job that nobody holds: pending, due at ``now``, lease absent or run out (``c`` = the
# candidate row).
_DUE_UNLEASED = (
    "c.status = 'pending' AND c.next_attempt_at <= %(now)s"
    " AND (c.leased_until IS NULL OR c.leased_until <= %(now)s)"
)

# Sets the lease on the rows of ``chosen`` (a CTE of ids, locked FOR UPDATE by the caller).
_LEASE_CHOSEN = """claimed AS (
    UPDATE deliveries dl SET leased_until = %(lease_until)s
    FROM chosen
    WHERE dl.id = chosen.id
    RETURNING dl.id, dl.message_id, dl.agent_id, dl.attempts, dl.leased_until
)"""

# What an attempt needs, read beside the lease (``claimed j``): the columns and the joins. The
# message, agent and secret columns come from the statement's snapshot, taken when the claim
# runs, i.e. at attempt time (mail.md §4.1: the URL is read per attempt). A job whose message
# or agent is gone still comes back (LEFT JOINs by primary key, ``m_id``/``a_id`` NULL) so the
# worker can fail it. The secrets are returned as (id, ciphertext) arrays newest first, so a
# rotation takes effect on the next claim while the AES-GCM opening is cached per secret id.
_ATTEMPT_COLUMNS = """j.id, j.message_id, j.agent_id, j.attempts, j.leased_until,
       m.id AS m_id, m.conversation_id, m.display_from, m.to_addrs, m.cc_addrs, m.recipient,
       m.raw_message, m.auth_headers, m.created_at,
       a.id AS a_id, a.agent_mode, a.webhook_url, a.webhook_status, a.user_id,
       s.secret_ids, s.secrets"""
# The message by its primary key alone, fenced: given the agent id too, PostgreSQL 18 may
# serve the pair from ``messages_inbox_idx`` (agent first, id last) by skipping through the
# agent's whole inbox (docs/decisions.md, "Prepared statements keep one plan").
_ATTEMPT_JOINS = """LEFT JOIN LATERAL (
    SELECT id, agent_id, direction, conversation_id, display_from, to_addrs, cc_addrs, recipient,
           raw_message, auth_headers, created_at
    FROM messages WHERE id = j.message_id OFFSET 0
) m ON m.agent_id = j.agent_id AND m.direction = 'inbound'
LEFT JOIN agents a ON a.id = j.agent_id AND m.id IS NOT NULL
LEFT JOIN LATERAL (
    """ + NEWEST_SECRETS_LATERAL + """
) s ON a.user_id IS NOT NULL"""

# One statement claims the jobs AND reads what their attempts need (one autocommit round trip
# instead of a claim transaction plus a load transaction per job).
#
# ``due``: the oldest due rows of agents that look as if they have a free slot. That count is
# grouped once per claim over the leased rows (not once per candidate, so a large backlog does
# not make each claim quadratic) and, taken on the statement's snapshot, only a pre-filter:
# it keeps a busy agent's backlog from filling the scan and hiding other agents' jobs.
# Both counts leave out the slots the caller has reserved for accepts still committing
# (``here``). ``free``: the authoritative free slots of those agents (at most ``limit`` of
# them, the ones with the oldest due jobs: a claim cannot lease for more), each under its
# lock, taken in agent-id order and waited for at most ``CLAIM_LOCK_WAIT_MS``
# (``e2a_webhook_slots_free``, module docstring); then the rows of agents with a free slot
# are locked SKIP LOCKED, each found by its primary key (a LATERAL probe that depends on
# ``free``, so only those rows are locked; joined as a table, PostgreSQL read the agent's
# whole backlog to find them; fenced with ``OFFSET 0``, since a plan made on a few rows
# otherwise took the id from a due index), the due condition repeated so a row leased since
# the snapshot drops out.
_CLAIM = Prepared(
    "e2a_claim_deliveries",
    f"""
WITH in_flight AS (
    SELECT agent_id, count(*) AS n
    FROM deliveries
    WHERE status = 'pending' AND leased_until > %(now)s
    GROUP BY agent_id
), here AS (
    SELECT * FROM unnest(%(reserved_agents)s::text[], %(reserved_counts)s::integer[]) AS r(agent_id, n)
), due AS (
    SELECT c.id, c.agent_id, c.next_attempt_at
    FROM deliveries c
    LEFT JOIN in_flight f ON f.agent_id = c.agent_id
    LEFT JOIN here h ON h.agent_id = c.agent_id
    WHERE {_DUE_UNLEASED}
      AND COALESCE(f.n, 0) + COALESCE(h.n, 0) < %(per_agent)s
      AND (cardinality(%(skip_users)s::text[]) = 0 OR NOT EXISTS (
          SELECT 1 FROM agents u WHERE u.id = c.agent_id AND u.user_id = ANY(%(skip_users)s::text[])
      ))
    ORDER BY c.next_attempt_at, c.id
    LIMIT %(scan)s
), agents_due AS (
    SELECT agent_id FROM due GROUP BY agent_id ORDER BY min(next_attempt_at), agent_id LIMIT %(limit)s
), free AS MATERIALIZED (
    SELECT o.agent_id,
           e2a_webhook_slots_free(o.agent_id, %(per_agent)s::integer, %(now)s, %(wait_ms)s::integer)
           - COALESCE((SELECT h.n FROM here h WHERE h.agent_id = o.agent_id), 0) AS n
    FROM (SELECT agent_id FROM agents_due ORDER BY agent_id COLLATE "C" OFFSET 0) o
), candidates AS (
    SELECT c.id, c.agent_id, c.next_attempt_at, f.n AS free
    FROM due d
    JOIN free f ON f.agent_id = d.agent_id AND f.n > 0
    CROSS JOIN LATERAL (
        SELECT c.id, c.agent_id, c.next_attempt_at
        FROM (SELECT * FROM deliveries WHERE id = d.id OFFSET 0) c
        WHERE c.agent_id = f.agent_id AND {_DUE_UNLEASED}
        FOR UPDATE SKIP LOCKED
    ) c
), ranked AS (
    SELECT r.id, r.next_attempt_at, r.free,
           row_number() OVER (PARTITION BY r.agent_id ORDER BY r.next_attempt_at, r.id) AS rank_in_agent
    FROM candidates r
), chosen AS (
    SELECT id FROM ranked
    WHERE rank_in_agent <= free
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
), {_LEASE_CHOSEN}
SELECT {_ATTEMPT_COLUMNS}
FROM claimed j
{_ATTEMPT_JOINS}
""",
)


#: How long a claim waits for one agent's lease lock before leaving that agent to a later
#: claim (milliseconds). An accept holds it through its commit, usually a few milliseconds;
#: waiting keeps a steady stream of accepts for one agent from starving its claims (its
#: retries and queued jobs), the bound keeps one stuck commit from stalling the claim loop.
CLAIM_LOCK_WAIT_MS = 20


async def claim_due(
    db: Database,
    now: datetime,
    limit: int,
    lease_seconds: float,
    max_per_agent: int,
    skip_users: Sequence[str] = (),
    reserved: Mapping[str, int] | None = None,
) -> list[ClaimedJob]:
    """Lease up to ``limit`` due pending deliveries (oldest due first), at most
    ``max_per_agent`` in flight per agent, for ``lease_seconds`` from ``now``.

    ``skip_users``: owners whose agents' jobs are not claimed (they hold their share of the
    caller's slots, :meth:`e2a.delivery.slots.Slots.full_users`), so the oldest-first order
    reaches other tenants' jobs instead of leasing jobs that would only be given back.

    ``reserved``: the caller's slots per agent reserved for fresh jobs whose accepts have not
    committed (:meth:`e2a.delivery.slots.Slots.reservations`): left free, since the count in
    the database cannot see them.

    One statement on its own (autocommit): the lease and the attempt's inputs in one round
    trip (see ``_CLAIM``).
    """
    if limit <= 0:
        return []
    rows = await db.fetchall_prepared(
        _CLAIM,
        {
            "now": now,
            "per_agent": max_per_agent,
            "skip_users": list(skip_users),
            "reserved_agents": list(reserved or {}),
            "reserved_counts": list((reserved or {}).values()),
            "wait_ms": CLAIM_LOCK_WAIT_MS,
            "scan": max(limit * 4, limit),
            "limit": limit,
            "lease_until": now + timedelta(seconds=lease_seconds),
            "max_secrets": MAX_SECRETS,
        },
    )
    return [_claimed(r) for r in rows]


def _claimed(row: dict[str, Any]) -> ClaimedJob:
    return ClaimedJob(row["id"], row["message_id"], row["agent_id"], row["attempts"], row, row["leased_until"])


# The backlog estimate for backpressure (e2a/delivery/backpressure.py): due, unleased jobs,
# counted on the ``deliveries_due_idx`` partial index and cut off at ``cap`` rows, so the cost
# stays bounded however large the backlog is (leased rows are the oldest due ones: at most
# the jobs in flight are read and skipped).
_COUNT_DUE = Prepared(
    "e2a_count_due_deliveries",
    "SELECT count(*) AS n FROM (SELECT 1 FROM deliveries"
    " WHERE status = 'pending' AND next_attempt_at <= %(now)s"
    " AND (leased_until IS NULL OR leased_until <= %(now)s)"
    " LIMIT %(cap)s) due",
)


async def count_due(db: Database, now: datetime, cap: int) -> int:
    """How many pending deliveries are due at ``now`` and not leased, counting at most ``cap``."""
    row = await db.fetchone_prepared(_COUNT_DUE, {"now": now, "cap": cap})
    return 0 if row is None else int(row["n"])


# The per-agent backlog for backpressure (issue 15.4): the same due, unleased rows, at most
# ``scan`` of them read off ``deliveries_due_idx``, grouped by agent; only agents with at
# least ``min`` of them are returned (the others' gates are open anyway).
_DUE_BY_AGENT = Prepared(
    "e2a_due_deliveries_by_agent",
    "SELECT agent_id, count(*) AS n FROM (SELECT agent_id FROM deliveries"
    " WHERE status = 'pending' AND next_attempt_at <= %(now)s"
    " AND (leased_until IS NULL OR leased_until <= %(now)s)"
    " LIMIT %(scan)s) due GROUP BY agent_id HAVING count(*) >= %(min)s",
)


async def due_by_agent(db: Database, now: datetime, scan: int, min_count: int) -> dict[str, int]:
    """Due, unleased deliveries per agent among the first ``scan`` such rows (agents with
    fewer than ``min_count`` left out)."""
    rows = await db.fetchall_prepared(_DUE_BY_AGENT, {"now": now, "scan": scan, "min": min_count})
    return {r["agent_id"]: int(r["n"]) for r in rows}


@dataclass(frozen=True)
class AttemptContext:
    """Everything an attempt needs, read at attempt time (the URL too: mail.md §4.1)."""

    message_id: str
    conversation_id: str
    display_from: str
    to_addrs: list[str] | None
    cc_addrs: list[str] | None
    recipient: str
    raw_message: bytes
    auth_headers: dict[str, str]
    received_at: datetime
    agent_id: str
    agent_mode: str
    webhook_url: str
    webhook_status: str
    secrets: list[str]  # decrypted, newest first


def _context(row: dict[str, Any], agent_id: str, secrets: list[str]) -> AttemptContext:
    return AttemptContext(
        message_id=row["message_id"],
        conversation_id=row["conversation_id"],
        display_from=row["display_from"],
        to_addrs=row["to_addrs"],
        cc_addrs=row["cc_addrs"],
        recipient=row["recipient"],
        raw_message=bytes(row["raw_message"]),
        auth_headers=row["auth_headers"],
        received_at=row["created_at"],
        agent_id=agent_id,
        agent_mode=row["agent_mode"],
        webhook_url=row["webhook_url"],
        webhook_status=row["webhook_status"],
        secrets=secrets,
    )


async def _load_attempt_txn(txn: Txn, job: ClaimedJob, master_key: bytes) -> AttemptContext | None:
    row = await txn.fetchone(
        "SELECT one.id AS message_id, one.conversation_id, one.display_from, one.to_addrs, one.cc_addrs,"
        " one.recipient, one.raw_message, one.auth_headers, one.created_at, a.id AS agent_id, a.user_id,"
        " a.agent_mode, a.webhook_url, a.webhook_status"
        f" FROM agents a, {INBOUND_BY_ID} AND a.id = one.agent_id",
        {"id": job.message_id, "agent": job.agent_id},
    )
    if row is None or row["raw_message"] is None or not row["auth_headers"]:
        return None
    secrets = await active_secrets_txn(txn, master_key, row["user_id"])
    return _context(row, row["agent_id"], secrets[:MAX_SECRETS])


async def load_attempt(
    db: Database, job: ClaimedJob, master_key: bytes, cache: SecretCache | None = None
) -> AttemptContext | None:
    """The message, agent and secrets of a claimed job; None when the message or agent is gone.

    A job from :func:`claim_due` already carries them (no round trip); its secrets are opened
    through ``cache`` (keyed by secret id and ciphertext, so a rotated or deleted secret is
    never used: the ids come from the claim's SQL).

    Raises:
        crypto.DecryptionError: a stored secret does not open with ``master_key``.
    """
    row = job.row
    if row is None:
        return await db.run("load_delivery_attempt", _load_attempt_txn, job, master_key)
    if row["m_id"] is None or row["a_id"] is None or row["raw_message"] is None or not row["auth_headers"]:
        return None
    cache = cache or SecretCache()
    ids_ = row["secret_ids"] or []
    secrets = [cache.decrypt(master_key, i, c) for i, c in zip(ids_, row["secrets"] or [], strict=True)]
    return _context(row, job.agent_id, secrets)


async def _finish(db: Database, sql: str, params: dict[str, Any]) -> bool:
    """One guarded ``UPDATE … RETURNING id`` on its own (autocommit: one round trip)."""
    return len(await db.fetchall(sql, params)) == 1


# The 2xx write: the delivery row and the message's ``read`` flag (two CTEs, ``done`` returns
# the message id when the guarded update matched). The message is only touched when the
# guarded delivery update matched, and only through its primary key: the direction is checked
# on the row a fenced probe found (``OFFSET 0``), as in ``messages.mark_read``. Offered
# ``direction = 'inbound' AND status = 'unread'`` on the updated row itself, PostgreSQL could
# serve the id from the inbox index (``agent_id, status, created_at, id``, skipping through
# every agent's unread mail), and a plan made while the tables were small (a new
# installation's first mail, kept by the connection until the next ANALYZE) did: each
# delivered mark then read all unread mail, which grows fastest while a backlog drains.
_MARK_DELIVERED = """done AS (
    UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, last_status_code = %(code)s,
        last_error = '', last_attempt_at = %(now)s, delivered_at = %(now)s, next_attempt_at = NULL,
        leased_until = NULL, webhook_url = %(url)s
    WHERE id = %(id)s AND leased_until = %(lease)s AND status IN ('pending', 'paused')
    RETURNING message_id
), marked_read AS (
    UPDATE messages SET status = 'read', read_at = COALESCE(read_at, %(now)s)
    WHERE id = (
        SELECT one.id FROM (SELECT id, direction, status FROM messages WHERE id = (SELECT message_id FROM done) OFFSET 0) one
        WHERE one.direction = 'inbound' AND one.status = 'unread'
    ) AND status = 'unread'
)"""

# ONE statement (one implicit transaction, one round trip): both rows commit together.
_DELIVERED = Prepared(
    "e2a_delivery_delivered",
    f"WITH {_MARK_DELIVERED} SELECT count(*) AS n FROM done",
)

# The 2xx write AND the lease of the same agent's next due job, in ONE statement, so a busy
# agent's slot goes from one attempt to the next without a separate claim round trip (the
# worker's hand-on). It leases only when the guarded update matched (``EXISTS (SELECT 1 FROM
# done)``, an uncorrelated one-time filter: a lost lease leases nothing). All CTEs see the
# snapshot taken when the statement starts, in which the finishing row is still pending and
# leased: the in-flight count (the agent's live leases, on ``deliveries_leased_idx``)
# therefore leaves it out, and so does the candidate scan (with its lease run out the
# row would look due; PostgreSQL would skip it as already updated by this command, but it is
# never a candidate to begin with). The one candidate is the agent's oldest due, unleased
# job (the agent's pending rows in due order, ``deliveries_pending_agent_idx``: a backlog is
# not read), locked FOR UPDATE SKIP LOCKED as in ``_CLAIM``. The
# outer SELECT always returns one row: ``delivered`` plus the claimed job's attempt columns
# (NULL when nothing was leased). The finishing row's lease must still be live: then every
# count taken under the agent's lock (module docstring) counted it, and swapping it for the
# next job's lease in one commit keeps each such count true. A row whose lease ran out was
# not counted, so it hands nothing on (the claim does that, under the lock). The count reads
# the agent's live leases in lease order, at most ``per_agent + 1`` of them (enough to tell
# whether a slot is free, with the finishing row among them or not): an order only
# ``deliveries_leased_idx`` gives. As a plain count, a plan made while the table held a few rows
# counted through ``deliveries_pending_agent_idx`` instead and read the agent's whole backlog
# on each hand-on (docs/decisions.md, "Plans made before the backlog").
_DELIVERED_CLAIM_NEXT = Prepared(
    "e2a_delivery_delivered_claim_next",
    f"""
WITH {_MARK_DELIVERED}, in_flight AS (
    SELECT count(*) FILTER (WHERE l.id <> %(id)s) AS n
    FROM (
        SELECT id FROM deliveries
        WHERE agent_id = %(agent_id)s AND status = 'pending' AND leased_until > %(now)s
        ORDER BY leased_until LIMIT %(per_agent)s + 1
    ) l
), chosen AS (
    SELECT c.id
    FROM deliveries c
    WHERE c.agent_id = %(agent_id)s AND c.id <> %(id)s AND {_DUE_UNLEASED}
      AND EXISTS (SELECT 1 FROM done)
      AND EXISTS (SELECT 1 FROM deliveries f WHERE f.id = %(id)s AND f.leased_until > %(now)s)
      AND (SELECT n FROM in_flight) < %(per_agent)s
    ORDER BY c.next_attempt_at, c.id
    LIMIT 1
    FOR UPDATE OF c SKIP LOCKED
), {_LEASE_CHOSEN}
SELECT (SELECT count(*) FROM done) AS delivered, {_ATTEMPT_COLUMNS}
FROM (SELECT 1) one
LEFT JOIN claimed j ON TRUE
{_ATTEMPT_JOINS}
""",
)


def _delivered_params(job: ClaimedJob, status_code: int, url: str, now: datetime) -> dict[str, Any]:
    return {"code": status_code, "now": now, "url": url, "id": job.id, "lease": job.lease_until}


async def record_delivered(db: Database, job: ClaimedJob, status_code: int, url: str, now: datetime) -> bool:
    """2xx: ``delivered``, and the inbound message becomes ``read`` (api.md §5.1).

    A delivery paused by a concurrent 410 while this attempt was in flight is still marked
    delivered: the receiver did get it. Returns False when the guarded update matched nothing
    (the lease was lost). One round trip (autocommit).
    """
    row = await db.fetchone_prepared(_DELIVERED, _delivered_params(job, status_code, url, now))
    return row is not None and row["n"] == 1


async def record_delivered_and_claim_next(
    db: Database,
    job: ClaimedJob,
    status_code: int,
    url: str,
    now: datetime,
    lease_seconds: float,
    max_per_agent: int,
) -> tuple[bool, ClaimedJob | None]:
    """:func:`record_delivered`, and in the same statement lease the agent's next due job.

    Returns (delivered, next job). The next job is the oldest due, unleased pending delivery
    of ``job``'s agent, leased for ``lease_seconds`` from ``now`` only when the guarded update
    matched and the agent has fewer than ``max_per_agent`` other attempts in flight (the
    finishing one does not count: its slot is what the next job takes). It carries the same
    attempt context as a :func:`claim_due` job. Why: a busy agent's slot then costs one round
    trip per delivery instead of two (record, then claim); everything commits together, so a
    crash can never leave the delivered mark without the lease or the other way round.
    """
    params = _delivered_params(job, status_code, url, now)
    params.update(
        agent_id=job.agent_id,
        per_agent=max_per_agent,
        lease_until=now + timedelta(seconds=lease_seconds),
        max_secrets=MAX_SECRETS,
    )
    row = await db.fetchone_prepared(_DELIVERED_CLAIM_NEXT, params)
    if row is None:
        return False, None
    delivered = row["delivered"] == 1
    if row["id"] is None:
        return delivered, None
    return delivered, _claimed(row)


async def release_lease(db: Database, job: ClaimedJob) -> bool:
    """Give a leased job back without attempting it (the worker could not start it now): it is
    claimable again at once. Guarded like every finishing write."""
    return await _finish(
        db,
        "UPDATE deliveries SET leased_until = NULL"
        " WHERE id = %(id)s AND leased_until = %(lease)s AND status = 'pending' RETURNING id",
        {"id": job.id, "lease": job.lease_until},
    )


async def record_retry(
    db: Database,
    job: ClaimedJob,
    status_code: int | None,
    error: str,
    url: str,
    now: datetime,
    next_attempt_at: datetime,
) -> bool:
    """A failed attempt with attempts left: stays ``pending``, due at ``next_attempt_at``."""
    return await _finish(
        db,
        "UPDATE deliveries SET attempts = attempts + 1, last_status_code = %(code)s, last_error = %(error)s,"
        " last_attempt_at = %(now)s, next_attempt_at = %(next)s, leased_until = NULL, webhook_url = %(url)s"
        " WHERE id = %(id)s AND leased_until = %(lease)s AND status = 'pending' RETURNING id",
        {
            "code": status_code, "error": error, "now": now, "next": next_attempt_at, "url": url,
            "id": job.id, "lease": job.lease_until,
        },
    )


async def record_failed(
    db: Database,
    job: ClaimedJob,
    status_code: int | None,
    error: str,
    now: datetime,
    *,
    attempted: bool,
    url: str | None = None,
) -> bool:
    """Terminal ``failed``: schedule exhausted (``attempted``) or message/agent gone / local mode
    (no attempt made: attempts and last_attempt_at unchanged)."""
    if attempted:
        sql = (
            "UPDATE deliveries SET status = 'failed', attempts = attempts + 1, last_status_code = %(code)s,"
            " last_error = %(error)s, last_attempt_at = %(now)s, next_attempt_at = NULL, leased_until = NULL,"
            " webhook_url = COALESCE(%(url)s, webhook_url)"
            " WHERE id = %(id)s AND leased_until = %(lease)s AND status = 'pending' RETURNING id"
        )
    else:
        sql = (
            "UPDATE deliveries SET status = 'failed', last_error = %(error)s, next_attempt_at = NULL,"
            " leased_until = NULL WHERE id = %(id)s AND leased_until = %(lease)s AND status = 'pending'"
            " RETURNING id"
        )
    return await _finish(
        db,
        sql,
        {"code": status_code, "error": error, "now": now, "url": url, "id": job.id, "lease": job.lease_until},
    )


async def record_paused(db: Database, job: ClaimedJob) -> bool:
    """The agent's webhook is disabled: no attempt, ``paused`` until a PUT re-enables it."""
    return await _finish(
        db,
        "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL, leased_until = NULL"
        " WHERE id = %(id)s AND leased_until = %(lease)s AND status = 'pending' RETURNING id",
        {"id": job.id, "lease": job.lease_until},
    )


async def record_gone(db: Database, job: ClaimedJob, url: str, now: datetime) -> bool:
    """410 (mail.md §4.5): this delivery ``failed``; the agent's webhook ``disabled``; its other
    ``pending`` deliveries ``paused``. The agent row is locked first so concurrent 410s of one
    agent serialise instead of deadlocking on each other's delivery rows."""

    async def _gone_txn(txn: Txn) -> bool:
        await txn.execute("SELECT id FROM agents WHERE id = %s FOR UPDATE", (job.agent_id,))
        await txn.execute(
            "UPDATE deliveries SET status = 'failed', attempts = attempts + 1, last_status_code = 410,"
            " last_error = 'HTTP 410 (webhook disabled)', last_attempt_at = %(now)s, next_attempt_at = NULL,"
            " leased_until = NULL, webhook_url = %(url)s"
            " WHERE id = %(id)s AND leased_until = %(lease)s AND status = 'pending'",
            {"now": now, "url": url, "id": job.id, "lease": job.lease_until},
        )
        if txn.rowcount != 1:
            return False
        await txn.execute(
            "UPDATE agents SET webhook_status = 'disabled', webhook_disabled_at = %s"
            " WHERE id = %s AND agent_mode = 'cloud' AND webhook_status <> 'disabled'",
            (now, job.agent_id),
        )
        await txn.execute(
            "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL"
            " WHERE agent_id = %s AND status = 'pending' AND id <> %s",
            (job.agent_id, job.id),
        )
        return True

    return await db.run("delivery_gone", _gone_txn)


# ------------------------------------------------------------------------------ API side


async def _redeliver_txn(txn: Txn, agent_id: str, message_id: str) -> str:
    agent = await txn.fetchone(
        "SELECT id, agent_mode, webhook_url, webhook_status FROM agents WHERE id = %s FOR UPDATE", (agent_id,)
    )
    if agent is None:
        raise NotFound("agent not found", code="agent_not_found")
    message = await txn.fetchone(
        f"SELECT one.id FROM {INBOUND_BY_ID}", {"id": message_id, "agent": agent_id},
    )
    if message is None:
        raise NotFound("message not found", code="message_not_found")
    if agent["agent_mode"] != "cloud":
        raise Conflict("agent is not in cloud mode", code="agent_not_cloud")
    if agent["webhook_status"] == "disabled":
        raise Conflict("the agent's webhook is disabled; re-enable it with PUT first", code="webhook_disabled")
    existing = await txn.fetchone(
        "UPDATE deliveries SET next_attempt_at = now()"
        " WHERE id = (SELECT id FROM deliveries WHERE message_id = %s AND status = 'pending'"
        "             ORDER BY created_at DESC, id DESC LIMIT 1)"
        " RETURNING id",
        (message_id,),
    )
    if existing is not None:
        delivery_id = existing["id"]
    else:
        delivery_id = ids.new_delivery_id()
        await txn.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at)"
            " VALUES (%s, %s, %s, %s, 'pending', now())",
            (delivery_id, message_id, agent_id, agent["webhook_url"]),
        )
    await txn.notify(CHANNEL_DELIVERY, "")
    return delivery_id


async def redeliver(db: Database, agent_id: str, message_id: str) -> str:
    """api.md §5.4: a new pending delivery due now, or the existing pending one rescheduled to
    now; returns its ``dlv_…`` id and wakes the workers at commit.

    Raises:
        NotFound: ``agent_not_found`` / ``message_not_found`` (not an inbound message of the agent).
        Conflict: ``agent_not_cloud``; ``webhook_disabled``.
    """
    return await db.run("redeliver", _redeliver_txn, agent_id, message_id)


async def list_deliveries(
    db: Database,
    agent_id: str,
    status: str,
    message_id: str | None,
    page_size: int,
    before: tuple[datetime, str] | None,
) -> tuple[list[Delivery], bool]:
    """Newest first, keyset on (created_at, id). ``status`` ``all`` = no filter. Returns (rows, more)."""
    clauses = ["agent_id = %s"]
    params: list[Any] = [agent_id]
    if status != "all":
        clauses.append("status = %s")
        params.append(status)
    if message_id:
        clauses.append("message_id = %s")
        params.append(message_id)
    if before is not None:
        clauses.append("(created_at, id) < (%s, %s)")
        params.extend(before)
    params.append(page_size + 1)
    rows = await db.fetchall(
        f"SELECT {_COLUMNS} FROM deliveries WHERE {' AND '.join(clauses)}"
        " ORDER BY created_at DESC, id DESC LIMIT %s",
        params,
    )
    return [Delivery.from_row(r) for r in rows[:page_size]], len(rows) > page_size


async def latest_for_message(db: Database, message_id: str) -> Delivery | None:
    """The newest delivery of one inbound message (the inbox detail's ``delivery``), if any."""
    row = await db.fetchone(
        f"SELECT {_COLUMNS} FROM deliveries WHERE message_id = %s ORDER BY created_at DESC, id DESC LIMIT 1",
        (message_id,),
    )
    return None if row is None else Delivery.from_row(row)


@dataclass(frozen=True)
class FreshLease:
    """A lease asked for a job as it is inserted (the accept's fresh job, e2a.delivery.port).

    ``until``: the lease's expiry; ``now``: the time live leases are counted at;
    ``max_per_agent``: ``webhooks.max_concurrency_per_agent``.
    """

    until: datetime
    now: datetime
    max_per_agent: int


async def insert_job_txn(
    txn: Txn,
    delivery_id: str,
    message_id: str,
    agent_id: str,
    webhook_url: str,
    *,
    paused: bool,
    lease: FreshLease | None = None,
) -> None:
    """A webhook delivery job: pending and due now, or paused (no due time, no lease) while the
    webhook is disabled.

    With ``lease``, the job is inserted leased when the agent has a free slot counted under its
    lock (``e2a_webhook_slots_free``, module docstring; the insert is a locking write, sent
    last): the caller's own count was read before the transaction and may be stale, since
    another process can have leased meanwhile. Whether it was granted is known once the
    transaction committed (:func:`lease_granted`); when it is not, the job is queued and a
    NOTIFY naming the agent wakes the workers' claim, as for any job inserted unleased.
    """
    if lease is not None and not paused:
        params = {
            "id": delivery_id, "message_id": message_id, "agent_id": agent_id, "url": webhook_url,
            "until": lease.until, "now": lease.now, "max": lease.max_per_agent, "channel": CHANNEL_DELIVERY,
        }
        await txn.execute_locking(
            agent_id,
            "WITH job AS (INSERT INTO deliveries"
            " (id, message_id, agent_id, webhook_url, status, next_attempt_at, leased_until)"
            " VALUES (%(id)s, %(message_id)s, %(agent_id)s, %(url)s, 'pending', now(),"
            " CASE WHEN e2a_webhook_slots_free(%(agent_id)s, %(max)s::integer, %(now)s, NULL::integer) > 0"
            " THEN %(until)s END)"
            " RETURNING agent_id, leased_until)"
            " SELECT pg_notify(%(channel)s, agent_id) FROM job WHERE leased_until IS NULL",
            params,
        )
        await txn.report("SELECT id AS key FROM deliveries WHERE id = %(id)s AND leased_until IS NOT NULL", params)
        return
    await txn.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at)"
        " VALUES (%s, %s, %s, %s, %s, CASE WHEN %s THEN NULL ELSE now() END)",
        (delivery_id, message_id, agent_id, webhook_url, "paused" if paused else "pending", paused),
    )


def lease_granted(txn: Txn, delivery_id: str) -> bool:
    """After the commit: whether :func:`insert_job_txn` got the lease it asked for."""
    return delivery_id in txn.reported
