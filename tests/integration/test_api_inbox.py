"""Inbox REST (api.md §5.1–5.2) on a real socket: filters, cursors, read marking, scope, limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest_twisted

from e2a.config import RateLimitConfig
from tests.support.apiserver import insert_user_with_key, make_test_config


async def _agent_with_mail(db, n: int, agent: str = "bot@agents.test", email: str = "owner@example.com"):
    user_id, key = await insert_user_with_key(db, email)
    await db.execute(
        "INSERT INTO domains (domain, is_shared, verified) VALUES ('agents.test', TRUE, TRUE) ON CONFLICT DO NOTHING"
    )
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES (%s, %s, 'agents.test', 'local', 'none')",
        (agent, user_id),
    )
    base = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    ids = []
    for i in range(n):
        mid = f"msg_{i:032x}"
        ids.append(mid)
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, display_from, recipient, subject,"
            " to_addrs, raw_message, auth_headers, created_at) VALUES (%s, %s, %s, 'inbound', 'unread',"
            " 'alice@example.org', %s, %s, %s, %s, %s, %s)",
            (mid, agent, user_id, agent, f"m{i}", json.dumps([agent]), b"Subject: x\r\n\r\nbody\r\n",
             json.dumps({"X-E2A-Auth-Verified": "false"}), base + timedelta(seconds=i)),
        )
    return user_id, key, ids


@pytest_twisted.ensureDeferred
async def test_inbox_pages_oldest_first_with_cursor(api_server_factory, db):
    """page_size pages oldest first; next_token only while more rows exist; cursor is bound."""
    api = await api_server_factory()
    _, key, ids = await _agent_with_mail(db, 5)
    first = (await api.request("GET", "/api/v1/agents/bot@agents.test/messages?page_size=2", key=key)).json()
    assert [m["message_id"] for m in first["messages"]] == ids[:2] and "next_token" in first
    assert first["messages"][0]["created_at"] == "2026-11-30T12:00:00Z" and first["messages"][0]["to"] == ["bot@agents.test"]
    second = (await api.request(
        "GET", f"/api/v1/agents/bot@agents.test/messages?page_size=2&token={first['next_token']}", key=key)).json()
    assert [m["message_id"] for m in second["messages"]] == ids[2:4]
    third = (await api.request(
        "GET", f"/api/v1/agents/bot@agents.test/messages?page_size=2&token={second['next_token']}", key=key)).json()
    assert [m["message_id"] for m in third["messages"]] == ids[4:] and "next_token" not in third
    # a cursor made for the unread filter is refused for another filter, and garbage is refused
    for query in (f"status=all&token={first['next_token']}", "token=%%%garbage"):
        r = await api.request("GET", f"/api/v1/agents/bot@agents.test/messages?{query}", key=key)
        assert (r.code, r.json()["error"]["code"]) == (400, "invalid_pagination_token")
    # out-of-range page sizes silently become 50
    r = await api.request("GET", "/api/v1/agents/bot@agents.test/messages?page_size=1000", key=key)
    assert len(r.json()["messages"]) == 5


@pytest_twisted.ensureDeferred
async def test_detail_marks_read_and_filters_follow(api_server_factory, db):
    """Reading a message marks it read; status filters then split the inbox."""
    api = await api_server_factory()
    _, key, ids = await _agent_with_mail(db, 3)
    detail = (await api.request("GET", f"/api/v1/agents/BOT@agents.test/messages/{ids[1]}", key=key)).json()
    assert detail["status"] == "read" and detail["cc"] is None and detail["conversation_id"] == ""
    unread = (await api.request("GET", "/api/v1/agents/bot@agents.test/messages", key=key)).json()["messages"]
    read = (await api.request("GET", "/api/v1/agents/bot@agents.test/messages?status=read", key=key)).json()["messages"]
    every = (await api.request("GET", "/api/v1/agents/bot@agents.test/messages?status=all", key=key)).json()["messages"]
    assert [m["message_id"] for m in unread] == [ids[0], ids[2]]
    assert [m["message_id"] for m in read] == [ids[1]] and len(every) == 3
    bad = await api.request("GET", "/api/v1/agents/bot@agents.test/messages?status=new", key=key)
    assert (bad.code, bad.json()["error"]["code"]) == (400, "invalid_field")


@pytest_twisted.ensureDeferred
async def test_other_users_agent_and_message_are_404(api_server_factory, db):
    """Foreign agents and messages answer exactly like missing ones."""
    api = await api_server_factory()
    _, _, ids = await _agent_with_mail(db, 1)
    _, stranger = await insert_user_with_key(db, "stranger@example.com")
    r = await api.request("GET", "/api/v1/agents/bot@agents.test/messages", key=stranger)
    assert (r.code, r.json()["error"]["code"]) == (404, "agent_not_found")
    r = await api.request("GET", f"/api/v1/agents/bot@agents.test/messages/{ids[0]}", key=stranger)
    assert (r.code, r.json()["error"]["code"]) == (404, "agent_not_found")
    r = await api.request("GET", "/api/v1/agents/bot@agents.test/messages")
    assert r.code == 401 and r.header("WWW-Authenticate") == 'Bearer realm="e2a"'


@pytest_twisted.ensureDeferred
async def test_poll_limit_answers_429(api_server_factory, db):
    """List and detail share the per-user poll bucket."""
    api = await api_server_factory(config=make_test_config(rate_limits=RateLimitConfig(poll_per_minute=2)))
    _, key, ids = await _agent_with_mail(db, 1)
    assert (await api.request("GET", "/api/v1/agents/bot@agents.test/messages", key=key)).code == 200
    assert (await api.request("GET", f"/api/v1/agents/bot@agents.test/messages/{ids[0]}", key=key)).code == 200
    r = await api.request("GET", "/api/v1/agents/bot@agents.test/messages", key=key)
    assert r.code == 429 and r.header("Retry-After")
