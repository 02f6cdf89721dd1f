"""The prepared statements of the mail path read only the rows they look for, whatever
PostgreSQL knows about the tables.

The server runs them with generic plans (``plan_cache_mode = force_generic_plan``, see
``e2a.store.database.Prepared``), and a new installation has no statistics until autovacuum's
first ANALYZE. Before the accept's lookups were fenced to one index each, PostgreSQL served the
agent id from the inbox index (in the generic plan even with statistics): each accept read
every message the agent had received in the last hour (the duplicate check) or ever (the
conversation lookup). Here an agent has a few thousand messages (or delivered jobs) and the
lookups miss, which is when such a plan reads the most; the plan is asked for rows and pages
read, not for index names, so any plan that reads only the matching rows passes.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from e2a.store import agents, deliveries, messages
from e2a.store.database import Txn
from e2a.store.models import InboundMessage
from tests.storage.storehelpers import agent_with_due_jobs, user_with_agent

N = 3000  # messages of each direction; the old plans read all of them per lookup
MOST_ROWS_READ = 20
MOST_PAGES_ONE_SCAN = 8  # per loop: a primary-key probe touches 3; the agent's history, 40 to 90 here


async def _busy_agent(db) -> tuple[str, str]:
    """An agent with N inbound and N outbound messages of the last ten minutes, each in its own
    conversation; returns (user_id, agent)."""
    user_id, agent = await user_with_agent(db, mode="local")
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status, email_message_id, envelope_from,"
        " client_ip, conversation_id, content_sha256, created_at)"
        " SELECT 'msg_in_' || g, %s, %s, 'inbound', 'unread', '<in' || g || '@sender.example>',"
        " 'alice@sender.example', '192.0.2.1', 'conv_in_' || g, 'sha', now() - make_interval(secs => g %% 600)"
        " FROM generate_series(1, %s) g",
        (agent, user_id, N),
    )
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status, smtp_message_id, provider_message_id,"
        " conversation_id, created_at)"
        " SELECT 'msg_out_' || g, %s, %s, 'outbound', 'sent', '<out' || g || '@agents.test>',"
        " '<q' || g || '>', 'conv_out_' || g, now() - make_interval(secs => g %% 600)"
        " FROM generate_series(1, %s) g",
        (agent, user_id, N),
    )
    return user_id, agent


def _rows_read(plan: dict[str, Any], tables: tuple[str, ...] = ("messages",)) -> int:
    """Rows the plan's scans of ``tables`` produced or filtered away, over all loops."""
    total = 0
    if plan.get("Relation Name") in tables and "Scan" in plan["Node Type"]:
        loops = plan.get("Actual Loops", 1)
        total += round(plan.get("Actual Rows", 0) * loops)
        total += round(plan.get("Rows Removed by Filter", 0) + plan.get("Rows Removed by Index Recheck", 0))
    for child in plan.get("Plans", []):
        total += _rows_read(child, tables)
    return total


def _pages(plan: dict[str, Any]) -> int:
    return plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)


def _most_pages_one_scan(plan: dict[str, Any], tables: tuple[str, ...]) -> float:
    """The most pages (index and table) one scan of ``tables`` touched, per loop. Rows alone miss
    an index scan that skips through a whole index to return one row (PostgreSQL 18's skip
    scan: the agent's id from ``messages_inbox_idx`` with the message id as its last column)."""
    most = 0.0
    if plan.get("Relation Name") in tables and "Scan" in plan["Node Type"]:
        # EXPLAIN counts a node's pages with those of the nodes below it (a subquery the scan
        # compares with, say): the scan's own are the difference
        pages = _pages(plan) - sum(_pages(child) for child in plan.get("Plans", []))
        most = pages / max(plan.get("Actual Loops", 1), 1)
    for child in plan.get("Plans", []):
        most = max(most, _most_pages_one_scan(child, tables))
    return most


def _explain(cur: Any, sql: str) -> tuple[int, Any]:
    """(rows of ``messages`` read, the statement's first row) for ``sql`` run for real; also
    checks that no scan of ``messages`` touched more pages than a few index probes do."""
    cur.execute(sql)
    row = cur.fetchone()
    cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)
    (doc,) = cur.fetchone()
    doc = doc if isinstance(doc, list) else json.loads(doc)
    pages = _most_pages_one_scan(doc[0]["Plan"], ("messages",))
    assert pages <= MOST_PAGES_ONE_SCAN, f"one scan of messages touched {pages} pages"
    return _rows_read(doc[0]["Plan"]), row


def _statistics(cur: Any, statistics: str, tables: tuple[str, ...] = ("messages",)) -> None:
    """Keep autovacuum off ``tables`` (its ANALYZE would change the plans mid-test) and give
    them statistics or none (a new installation)."""
    for table in tables:
        cur.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        if statistics == "analyzed":
            cur.execute(f"ANALYZE {table}")


def _set_statistics(dsn: str, statistics: str, tables: tuple[str, ...] = ("messages",)) -> None:
    """:func:`_statistics` on a connection of its own, committed and closed."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            _statistics(cur, statistics, tables)
    finally:
        conn.close()


@contextmanager
def _autocommit_cursor(dsn: str, statistics: str) -> Iterator[Any]:
    """A cursor of an autocommit connection of its own, after :func:`_statistics` on
    ``messages``; the connection is closed after."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            _statistics(cur, statistics)
            yield cur
    finally:
        conn.close()


def _context_params(agent: str, mid: str, candidates: list[str]) -> dict[str, Any]:
    return {
        "now": datetime.now(UTC),
        "in_flight_cap": 4,
        "max_secrets": 3,
        "rcpt": agent,
        "mid": mid,
        "sender": "alice@sender.example",
        "window": messages.DUPLICATE_WINDOW_SECONDS,
        "ip": "192.0.2.1",
        "check": "",
        "verified": "false",
        "auth_sender": "",
        "sha": "sha",
        "n": len(candidates),
        "c": candidates,
        "bases": messages.provider_id_bases(candidates),
    }


MISSES = ["<nobody@elsewhere.example>", "<q9999999@relay.example>"]


@pytest_twisted.ensureDeferred
async def test_every_pooled_connection_keeps_one_plan_per_prepared_statement(db):
    """What the tests below assume of the server: generic plans on each of its connections."""
    rows = [await db.fetchone("SHOW plan_cache_mode") for _ in range(3)]
    assert [r["plan_cache_mode"] for r in rows] == ["force_generic_plan"] * 3


@pytest.mark.parametrize("statistics", ["none", "analyzed"])
@pytest.mark.parametrize("plan_mode", ["force_generic_plan", "force_custom_plan"])
@pytest_twisted.ensureDeferred
async def test_the_accept_read_reads_only_the_rows_it_looks_for(db, db_dsn, statistics, plan_mode):
    """The accept's one read statement (agent, secrets, duplicate, conversation), prepared as
    the server prepares it, for a new Message-ID whose references match nothing."""
    _user, agent = await _busy_agent(db)
    with _autocommit_cursor(db_dsn, statistics) as cur:
        cur.execute(f"SET plan_cache_mode = {plan_mode}")
        cur.execute(messages._INBOUND_CONTEXT.prepare_sql)
        execute = messages._INBOUND_CONTEXT.execute_sql

        miss = cur.mogrify(execute, _context_params(agent, "<new@sender.example>", MISSES)).decode()
        read, _row = _explain(cur, miss)
        assert read <= MOST_ROWS_READ, f"read {read} of the agent's messages for a lookup that finds none"

        # The same plan still finds what is there: a resend of message 17, a reply to
        # outbound 23 by its Message-ID, and one to outbound 29 by the relay's bare id.
        cur.execute(
            "UPDATE messages SET auth_headers = jsonb_build_object('X-E2A-Auth-Domain-Check', '',"
            " 'X-E2A-Auth-Verified', 'false', 'X-E2A-Auth-Sender', '') WHERE id = 'msg_in_17'"
        )
        hits = [
            ("<in17@sender.example>", [], "msg_in_17", ""),
            ("<new@sender.example>", ["<out23@agents.test>"], None, "conv_out_23"),
            ("<new@sender.example>", ["<q29@relay.example>"], None, "conv_out_29"),
            ("<new@sender.example>", ["<in31@sender.example>", "<nobody@x.example>"], None, "conv_in_31"),
        ]
        for mid, candidates, duplicate, conversation in hits:
            sql = cur.mogrify(execute, _context_params(agent, mid, candidates)).decode()
            read, row = _explain(cur, sql)
            assert read <= MOST_ROWS_READ, (mid, candidates, read)
            assert row[-2:] == (duplicate, conversation), (mid, candidates, row[-2:])


@pytest.mark.parametrize("statistics", ["none", "analyzed"])
@pytest_twisted.ensureDeferred
async def test_the_conversation_lookup_of_a_sent_reply_reads_only_the_rows_it_looks_for(db, db_dsn, statistics):
    """find_conversation_txn (outbound replies and the inbound path outside the prepared read)."""
    _user, agent = await _busy_agent(db)
    with _autocommit_cursor(db_dsn, statistics) as cur:
        for candidates, expected in ((MISSES, None), (["<in5@sender.example>"], "conv_in_5")):
            sql = cur.mogrify(
                messages._conversation_select(agent="%(agent)s", c="%(c)s::text[]", bases="%(bases)s::text[]"),
                {"agent": agent, "c": candidates, "bases": messages.provider_id_bases(candidates)},
            ).decode()
            read, row = _explain(cur, sql)
            assert read <= MOST_ROWS_READ, (candidates, read)
            assert (row[0] if row else None) == expected


class _Capture:
    """A txn that keeps the one prepared write it is given (its statement and parameters)."""

    async def execute_prepared(self, statement, params) -> None:
        self.statement, self.params = statement, params


async def _remembered_insert(
    agent: str, user: str, n: int, mid: str | None = None, candidates: list[str] = MISSES
) -> tuple[Any, dict[str, Any]]:
    """The statement and parameters of copy ``msg_new_<n>`` written with a remembered context
    (Message-ID ``mid``, by default a new one; references ``candidates``, by default ones
    that match nothing)."""
    capture = _Capture()
    copy = InboundMessage(
        id=f"msg_new_{n}", agent_id=agent, user_id=user, status="unread", route="smtp", sender="",
        display_from="", recipient=agent, envelope_from="alice@sender.example", client_ip="192.0.2.1",
        subject="", to_addrs=None, cc_addrs=None, email_message_id=mid or f"<new{n}@sender.example>",
        in_reply_to="", references_ids="", conversation_id="", auth_headers={}, raw_message=b"x",
        created_at=datetime.now(UTC),
    )
    await messages.insert_inbound_txn(capture, copy, "sha", messages.Remembered("wsec_plan", "", "false", candidates))
    return capture.statement, capture.params


@pytest.mark.parametrize("statistics", ["none", "analyzed"])
@pytest_twisted.ensureDeferred
async def test_a_copy_written_with_a_remembered_context_reads_only_the_rows_it_looks_for(db, db_dsn, statistics):
    """The INSERT of a copy written without the accept's read (e2a.store.messages.Remembered)
    does the read's checks and lookups itself, prepared and planned as the server does: for a
    new message and for a reply it reads only the rows it looks for; a resend is refused for
    being one (a statement that fails cannot be measured, so only its answer is checked)."""
    user, agent = await _busy_agent(db)
    await db.execute(
        "INSERT INTO signing_secrets (id, user_id, secret, secret_prefix) VALUES ('wsec_plan', %s, 'x', 'x')", (user,)
    )
    with _autocommit_cursor(db_dsn, statistics) as cur:
        cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute("UPDATE messages SET auth_headers = jsonb_build_object('X-E2A-Auth-Domain-Check', '',"
                    " 'X-E2A-Auth-Verified', 'false', 'X-E2A-Auth-Sender', '') WHERE id = 'msg_in_17'")
        prepared = False
        for n, (mid, candidates, conversation) in enumerate((
            ("<new@sender.example>", MISSES, ""),
            ("<new@sender.example>", ["<out23@agents.test>"], "conv_out_23"),
            ("<in17@sender.example>", [], None),
        )):
            statement, params = await _remembered_insert(agent, user, n, mid, candidates)
            if not prepared:
                cur.execute(statement.prepare_sql)
                prepared = True
            sql = cur.mogrify(statement.execute_sql, params).decode()
            cur.execute("BEGIN")
            try:
                if conversation is None:
                    with pytest.raises(psycopg2.Error) as refused:
                        cur.execute(sql)
                    assert messages.remembered_context_stale(refused.value)
                    assert "(duplicate)" in str(refused.value)
                    continue
                cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)
                (doc,) = cur.fetchone()
                plan = (doc if isinstance(doc, list) else json.loads(doc))[0]["Plan"]
                assert _rows_read(plan) <= MOST_ROWS_READ, (mid, candidates, _rows_read(plan))
                tables = ("messages", "agents", "signing_secrets")
                assert _most_pages_one_scan(plan, tables) <= MOST_PAGES_ONE_SCAN, (mid, candidates)
                cur.execute("SELECT conversation_id FROM messages WHERE id = %s", (f"msg_new_{n}",))
                assert cur.fetchone() == (conversation,)
            finally:
                cur.execute("ROLLBACK")


class _PlanProbe:
    """Runs each prepared statement the store sends under ``EXPLAIN ANALYZE`` first, on a side
    connection with the server's plan mode, in a transaction rolled back (so the store's own
    call then finds the same state), and records the rows read and the most pages one scan
    touched of the mail path's tables (messages, deliveries, agents, domains, secrets)."""

    def __init__(self, dsn: str, db) -> None:
        self.conn = psycopg2.connect(dsn)
        with self.conn.cursor() as cur:
            cur.execute("SET plan_cache_mode = force_generic_plan")
        self.conn.commit()
        self.prepared: set[str] = set()
        self.read: dict[str, list[int]] = {}
        self.pages: dict[str, list[float]] = {}
        original = db.fetchall_prepared  # fetchone_prepared goes through it

        def probing(statement, params, *a, **kw):
            self._probe(statement, params)
            return original(statement, params, *a, **kw)

        db.fetchall_prepared = probing

    def nested(self) -> None:
        """From now on also record the statements that functions called by the probed ones
        run (``e2a_webhook_slots_free``'s count, planned and cached per session like a
        prepared statement), as ``"<statement> > nested"``: ``auto_explain`` sends their plans
        back as notices."""
        with self.conn.cursor() as cur:
            for sql in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_analyze = on", "SET auto_explain.log_buffers = on",
                        "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_format = json",
                        "SET auto_explain.log_level = notice", "SET client_min_messages = notice"):
                cur.execute(sql)
        self.conn.commit()

    def _probe(self, statement, params) -> None:
        tables = ("deliveries", "messages", "agents", "domains", "signing_secrets")
        with self.conn.cursor() as cur:
            if statement.name not in self.prepared:
                cur.execute(statement.prepare_sql)
                self.conn.commit()
                self.prepared.add(statement.name)
            del self.conn.notices[:]
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement.execute_sql, params)
            (doc,) = cur.fetchone()
        self.conn.rollback()
        for notice in self.conn.notices:
            if "{" not in notice:
                continue
            logged = json.loads(notice[notice.index("{"):])
            if not logged["Query Text"].lstrip().upper().startswith(("EXPLAIN", "EXECUTE", "PREPARE")):
                nested = f"{statement.name} > nested"
                self.pages.setdefault(nested, []).append(_most_pages_one_scan(logged["Plan"], tables))
        doc = doc if isinstance(doc, list) else json.loads(doc)
        plan = doc[0]["Plan"]
        self.read.setdefault(statement.name, []).append(_rows_read(plan, tables))
        self.pages.setdefault(statement.name, []).append(_most_pages_one_scan(plan, tables))

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("statistics", ["none", "analyzed"])
@pytest_twisted.ensureDeferred
async def test_the_delivery_statements_read_the_backlog_not_the_history(db, db_dsn, statistics):
    """An agent with N delivered jobs behind it and a few due: the claim, the hand-on, the
    delivered mark and the backlog counts read the pending rows, never the delivered ones."""
    _user, agent = await agent_with_due_jobs(db, 6)
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status)"
        " SELECT 'msg_h_' || g, %s, (SELECT user_id FROM agents WHERE id = %s), 'inbound', 'read'"
        " FROM generate_series(1, %s) g",
        (agent, agent, N),
    )
    await db.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, attempts, delivered_at, created_at)"
        " SELECT 'dlv_h_' || g, 'msg_h_' || g, %s, 'https://hook.example/in', 'delivered', 1, now(),"
        " now() - make_interval(secs => 900 + g) FROM generate_series(1, %s) g",
        (agent, N),
    )
    _set_statistics(db_dsn, statistics, ("messages", "deliveries"))
    probe = _PlanProbe(db_dsn, db)
    try:
        now = datetime.now(UTC)
        assert await deliveries.count_due(db, now, 1000) == 6
        await deliveries.due_by_agent(db, now, 1000, 1)
        jobs = await deliveries.claim_due(db, now, 2, 60.0, 4)
        assert len(jobs) == 2
        delivered, following = await deliveries.record_delivered_and_claim_next(
            db, jobs[0], 200, "https://hook.example/in", now, 60.0, 4
        )
        assert delivered and following is not None
        assert await deliveries.record_delivered(db, jobs[1], 200, "https://hook.example/in", now + timedelta(seconds=1))
    finally:
        probe.close()
    assert set(probe.read) == {
        "e2a_count_due_deliveries", "e2a_due_deliveries_by_agent", "e2a_claim_deliveries",
        "e2a_delivery_delivered_claim_next", "e2a_delivery_delivered",
    }
    for name, reads in probe.read.items():
        assert max(reads) <= MOST_ROWS_READ + 6 * 4, (name, reads)
    for name, pages in probe.pages.items():
        assert max(pages) <= MOST_PAGES_ONE_SCAN, (name, pages)


@pytest_twisted.ensureDeferred
async def test_plans_made_on_nearly_empty_tables_still_read_only_what_they_look_for(db, db_dsn):
    """A pooled connection keeps the generic plan it made at a statement's first execution
    until the next ANALYZE, and a new installation makes its plans while the tables hold a few
    rows. Two such plans read through whole indexes once the tables had grown: the delivered
    mark served the message id from the inbox index (every agent's unread mail, which grows
    fastest while a backlog drains), and the check of a remembered agent served the agent from
    its owner's agents (an owner with an agent per customer). The mail path's prepared
    statements (the RCPT lookup, the accept's read and remembered write, webhook delivery's)
    are planned here on nearly empty tables, the tables then grow without statistics (N agents
    of one owner on one domain, N unread messages), and each must still touch no more pages
    than a few index probes do."""
    user, agent = await user_with_agent(db, "Local@agents.test", mode="local", email="local@example.com")
    await db.execute(
        "INSERT INTO signing_secrets (id, user_id, secret, secret_prefix) VALUES ('wsec_plan', %s, 'x', 'x')", (user,)
    )
    cloud_user, cloud = await agent_with_due_jobs(db, 6)
    _set_statistics(db_dsn, "none", ("messages", "deliveries", "agents", "signing_secrets"))  # committed: DDL replans
    accept = (messages._INBOUND_CONTEXT, messages._INSERT_INBOUND_REMEMBERED)
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    # An attempt in flight while the plans are made: with a live lease there, PostgreSQL made
    # the slot count's plan from the agent's pending jobs, not its leases.
    await deliveries.claim_due(db, datetime.now(UTC), 1, 60.0, 4)
    probe = _PlanProbe(db_dsn, db)  # the delivery statements, on a connection of its own
    copies = itertools.count()  # a new id for each remembered copy

    async def one_of_each(explain: bool) -> dict[str, float]:
        """Run each statement once as the mail path does (the accept's two in a transaction
        rolled back); with ``explain``, the most pages one scan of each touched."""
        pages = {}
        statement, params = await _remembered_insert(agent, user, next(copies))
        runs = [(messages._INBOUND_CONTEXT, _context_params(agent, "<new@sender.example>", MISSES)),
                (messages._INBOUND_CONTEXT, _context_params(cloud, "<new@sender.example>", MISSES)),
                (statement, params)]
        with conn.cursor() as cur:
            for statement, params in runs:
                cur.execute("BEGIN")
                try:
                    cur.execute(("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " if explain else "")
                                + statement.execute_sql, params)
                    row = cur.fetchone() if explain else None
                finally:
                    cur.execute("ROLLBACK")
                if explain:
                    plan = (row[0] if isinstance(row[0], list) else json.loads(row[0]))[0]["Plan"]
                    tables = ("messages", "deliveries", "agents", "signing_secrets")
                    pages[statement.name] = max(pages.get(statement.name, 0), _most_pages_one_scan(plan, tables))
        now = datetime.now(UTC)
        probe.pages.clear()
        assert await agents.find_receiving_agent(db, agent.lower()) == agent
        # the counts read at most their cap of due jobs, by design: a small one here
        await deliveries.count_due(db, now, 4)
        await deliveries.due_by_agent(db, now, 4, 1)
        jobs = await deliveries.claim_due(db, now, 2, 60.0, 4)
        assert len(jobs) == 2
        delivered, _following = await deliveries.record_delivered_and_claim_next(
            db, jobs[0], 200, "https://hook.example/in", now, 60.0, 4
        )
        assert delivered
        assert await deliveries.record_delivered(db, jobs[1], 200, "https://hook.example/in", now)
        pages.update({name: max(p) for name, p in probe.pages.items()})
        return pages

    try:
        with conn.cursor() as cur:
            cur.execute("SET plan_cache_mode = force_generic_plan")
            for statement in accept:
                cur.execute(statement.prepare_sql)
        await one_of_each(explain=False)  # every plan made now, on tables of a few rows
        await db.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode)"
            " SELECT 'bot' || g || '@agents.test', %s, 'agents.test', 'local' FROM generate_series(1, %s) g",
            (user, N),
        )
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, email_message_id, created_at)"
            " SELECT 'msg_u_' || g, 'bot' || (g %% 50 + 1) || '@agents.test', %s, 'inbound', 'unread',"
            " '<u' || g || '@sender.example>', now() - make_interval(secs => g) FROM generate_series(1, %s) g",
            (user, N),
        )
        # The cloud agent's webhook was down: N jobs are due behind the ones due first.
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status)"
            " SELECT 'msg_b_' || g, %s, %s, 'inbound', 'unread' FROM generate_series(1, %s) g",
            (cloud, cloud_user, N),
        )
        await db.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at)"
            " SELECT 'dlv_b_' || g, 'msg_b_' || g, %s, 'https://hook.example/in', 'pending', now() - interval '1 second'"
            " FROM generate_series(1, %s) g",
            (cloud, N),
        )
        probe.nested()
        pages = await one_of_each(explain=True)
    finally:
        probe.close()
        conn.close()
    assert set(pages) == {s.name for s in accept} | {
        "e2a_rcpt_lookup", "e2a_count_due_deliveries", "e2a_due_deliveries_by_agent", "e2a_claim_deliveries",
        "e2a_delivery_delivered_claim_next", "e2a_delivery_delivered", "e2a_claim_deliveries > nested",
    }
    assert {name: p for name, p in pages.items() if p > MOST_PAGES_ONE_SCAN} == {}


class _StatementProbe:
    """Runs each plain statement the store sends about ``messages`` under ``EXPLAIN ANALYZE``
    first, on a side connection, in a transaction rolled back; the values are bound in the
    text as psycopg2 binds them, so PostgreSQL plans each call for its values, as it does the
    store's."""

    def __init__(self, dsn: str, db, monkeypatch) -> None:
        self.conn = psycopg2.connect(dsn)
        self.plans: list[tuple[str, int, float]] = []  # (statement, rows read, most pages one scan)
        single = db._single

        def probing_single(desc, sql, params):
            if isinstance(sql, str):
                self._probe(sql, params)
            return single(desc, sql, params)

        def wrap(method):
            def probing(txn, sql, params=None):
                self._probe(sql, params)
                return method(txn, sql, params)

            return probing

        monkeypatch.setattr(db, "_single", probing_single)
        monkeypatch.setattr(Txn, "fetchall", wrap(Txn.fetchall))
        monkeypatch.setattr(Txn, "execute", wrap(Txn.execute))

    def _probe(self, sql: str, params) -> None:
        if not re.search(r"\b(FROM|UPDATE) messages\b", sql):
            return
        with self.conn.cursor() as cur:
            text = cur.mogrify(sql, params).decode()
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + text)
            (doc,) = cur.fetchone()
        self.conn.rollback()
        doc = doc if isinstance(doc, list) else json.loads(doc)
        plan = doc[0]["Plan"]
        self.plans.append((" ".join(sql.split())[:90], _rows_read(plan), _most_pages_one_scan(plan, ("messages",))))

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("statistics", ["none", "analyzed"])
@pytest_twisted.ensureDeferred
async def test_the_reads_of_one_message_read_only_that_message(db, db_dsn, statistics, monkeypatch):
    """The API's and the delivery's reads and writes of one message by its id and agent (read,
    read without the mark, the WebSocket ack, the live push's summary, the reply's source, the
    redelivery's check, the attempt of a job built outside the claim), for a message of an
    agent with thousands: each reads that message's row, whatever PostgreSQL knows."""
    _user, agent = await _busy_agent(db)
    await db.execute(
        "UPDATE agents SET agent_mode = 'cloud', webhook_url = 'https://hook.example/in', webhook_status = 'active'"
        " WHERE id = %s",
        (agent,),
    )
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status, conversation_id, raw_message, auth_headers)"
        " SELECT 'msg_one_' || g, %s, user_id, 'inbound', 'unread', 'conv_one_' || g, 'Subject: hi\r\n\r\nhi\r\n',"
        " '{\"X-E2A-Auth-Verified\": \"true\"}' FROM agents, generate_series(1, 3) g WHERE id = %s",
        (agent, agent),
    )
    _set_statistics(db_dsn, statistics)
    probe = _StatementProbe(db_dsn, db, monkeypatch)
    try:
        assert (await messages.read_inbound(db, agent, "msg_one_1", mark_read=False)).id == "msg_one_1"
        assert await messages.mark_read(db, agent, "msg_one_1")
        assert (await messages.read_inbound(db, agent, "msg_one_2")).status == "read"
        assert (await messages.fetch_summary(db, agent.lower(), "msg_one_3")).conversation_id == "conv_one_3"
        assert (await messages.get_reply_source(db, agent, "msg_one_1")).conversation_id == "conv_one_1"
        assert await deliveries.redeliver(db, agent, "msg_one_1")
        job = deliveries.ClaimedJob(id="dlv_x", message_id="msg_one_3", agent_id=agent, attempts=0)
        assert (await deliveries.load_attempt(db, job, b"\0" * 32)).message_id == "msg_one_3"
        # another agent's message, or an outbound one, is not found by the same statements
        assert await messages.read_inbound(db, "other@agents.test", "msg_one_3") is None
        assert not await messages.mark_read(db, "other@agents.test", "msg_one_3")
        assert await messages.read_inbound(db, agent, "msg_out_20", mark_read=False) is None
        job = deliveries.ClaimedJob(id="dlv_y", message_id="msg_one_3", agent_id="other@agents.test", attempts=0)
        assert await deliveries.load_attempt(db, job, b"\0" * 32) is None
    finally:
        probe.close()
    assert len(probe.plans) == 11, probe.plans
    over = [(statement, read, pages) for statement, read, pages in probe.plans if read > 2 or pages > MOST_PAGES_ONE_SCAN]
    assert not over, over


@pytest.mark.parametrize("statistics", ["none", "analyzed"])
@pytest_twisted.ensureDeferred
async def test_a_backlog_is_not_read_by_each_delivery(db, db_dsn, statistics):
    """An agent with N due jobs waiting (mail that came while its webhook was down): what each
    delivery runs (the hand-on, the delivered mark), the agent's slot count and the accept's
    in-flight count read the few leased rows and the next candidate, not the backlog, so
    draining it costs the same per message at the start as at the end. The claim, run per
    wake-up rather than per delivery, reads the due rows it ranks once (docs/decisions.md, "A
    backlog is not read by each delivery") and then only the rows it locks."""
    user_id, agent = await user_with_agent(db)
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status)"
        " SELECT 'msg_b_' || g, %s, %s, 'inbound', 'unread' FROM generate_series(1, %s) g",
        (agent, user_id, N),
    )
    await db.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at, created_at)"
        " SELECT 'dlv_b_' || lpad(g::text, 5, '0'), 'msg_b_' || g, %s, 'https://hook.example/in', 'pending',"
        " now() - make_interval(secs => %s - g), now() - make_interval(secs => %s - g) FROM generate_series(1, %s) g",
        (agent, 2 * N, 2 * N, N),
    )
    _set_statistics(db_dsn, statistics, ("messages", "deliveries"))
    probe = _PlanProbe(db_dsn, db)
    try:
        now = datetime.now(UTC)
        jobs = await deliveries.claim_due(db, now, 2, 60.0, 4)
        assert [j.id for j in jobs] == ["dlv_b_00001", "dlv_b_00002"]
        delivered, following = await deliveries.record_delivered_and_claim_next(
            db, jobs[0], 200, "https://hook.example/in", now, 60.0, 4
        )
        assert delivered and following is not None and following.id == "dlv_b_00003"
        assert await deliveries.record_delivered(db, jobs[1], 200, "https://hook.example/in", now)
    finally:
        probe.close()
    assert set(probe.read) == {"e2a_claim_deliveries", "e2a_delivery_delivered_claim_next", "e2a_delivery_delivered"}
    claim_read = probe.read.pop("e2a_claim_deliveries")
    del probe.pages["e2a_claim_deliveries"]
    assert max(claim_read) <= N + MOST_ROWS_READ, claim_read
    for name, reads in probe.read.items():
        assert max(reads) <= MOST_ROWS_READ + 4 * 2, (name, reads)
    for name, pages in probe.pages.items():
        assert max(pages) <= MOST_PAGES_ONE_SCAN, (name, pages)
    read = await db.fetchall("SELECT status, count(*) AS n FROM messages GROUP BY status ORDER BY status")
    assert [(r["status"], r["n"]) for r in read] == [("read", 2), ("unread", N - 2)]

    # the counts of the agent's live leases outside those statements: the slot count under
    # the agent's lock (its queries run inside the function, so the pages of the whole call)
    # and the accept's read
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute("SET plan_cache_mode = force_generic_plan")
        for _ in range(6):  # compiled and planned (PL/pgSQL's generic plan): the catalog pages are read once
            cur.execute("SELECT e2a_webhook_slots_free(%s, 4, %s, 0)", (agent, now))
        cur.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT e2a_webhook_slots_free(%s, 4, %s, 0)", (agent, now)
        )
        (doc,) = cur.fetchone()
        doc = doc if isinstance(doc, list) else json.loads(doc)
        assert _pages(doc[0]["Plan"]) <= MOST_PAGES_ONE_SCAN, doc
        cur.execute(messages._INBOUND_CONTEXT.prepare_sql)
        sql = cur.mogrify(
            messages._INBOUND_CONTEXT.execute_sql, _context_params(agent, "<new@sender.example>", [])
        ).decode()
        read, row = _explain(cur, sql)
        assert read <= MOST_ROWS_READ and row[0] == agent
        conn.rollback()
