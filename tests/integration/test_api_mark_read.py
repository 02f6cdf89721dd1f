"""GET /api/v1/agents/{email}/messages/{id}?mark_read=false leaves the message unread (api.md §5.2)."""

from __future__ import annotations

import pytest_twisted

from tests.integration.test_websocket import AGENT, insert_message, owner, status_of


@pytest_twisted.ensureDeferred
async def test_message_detail_mark_read_false_leaves_unread_default_marks_read(db, api_server_factory):
    """mark_read=false: detail served, still unread; absent or true: read; anything else: 400 invalid_field."""
    api = await api_server_factory()
    user_id, key = await owner(db)
    message_id = await insert_message(db, user_id)
    path = f"/api/v1/agents/{AGENT}/messages/{message_id}"

    resp = await api.request("GET", path + "?mark_read=false", key=key)
    assert resp.code == 200 and resp.json()["status"] == "unread"
    assert await status_of(db, message_id) == "unread"

    for bad in ("no", "False", "1", ""):
        resp = await api.request("GET", path + f"?mark_read={bad}", key=key)
        assert resp.code == 400 and resp.json()["error"]["code"] == "invalid_field", bad
    assert await status_of(db, message_id) == "unread"

    resp = await api.request("GET", path + "?mark_read=true", key=key)
    assert resp.code == 200 and resp.json()["status"] == "read"
    other = await insert_message(db, user_id)
    resp = await api.request("GET", f"/api/v1/agents/{AGENT}/messages/{other}", key=key)
    assert resp.json()["status"] == "read" and await status_of(db, other) == "read"

    resp = await api.request("GET", f"/api/v1/agents/{AGENT}/messages/msg_{'0' * 32}?mark_read=false", key=key)
    assert resp.code == 404 and resp.json()["error"]["code"] == "message_not_found"
