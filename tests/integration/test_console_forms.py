"""Console forms at their edges: large approve bodies, recipients with commas in display
names, HTML (not the API's JSON) for oversized bodies, HEAD and unserved methods on console
paths, and deleting an agent from its page."""

from __future__ import annotations

import email
import email.policy
import re
import socket
from typing import Any

import pytest_twisted

from twisted.internet import threads

from tests.integration.test_console_http import CSP, Browserish, _agent, _hold, _inbound, val
from tests.support.apiserver import insert_user_with_key
from tests.support.hitlstack import StackServer
from tests.support.waiting import wait_for


async def _relayed_to(stack: Any, address: str) -> Any:
    async def arrived() -> bool:
        return any(address in m.recipients for m in stack.sink.messages)

    await wait_for(arrived, timeout=30)
    return next(m for m in stack.sink.messages if address in m.recipients)


def assert_console_html(resp: Any, status: int) -> str:
    assert resp.code == status, (resp.code, resp.body[:300])
    assert resp.header("Content-Type") == "text/html; charset=utf-8"
    assert resp.header("Content-Security-Policy") == CSP
    assert resp.header("X-Frame-Options") == "DENY"
    assert resp.header("Referrer-Policy") == "no-referrer"
    assert resp.header("Cache-Control") == "no-store"
    return resp.body.decode("utf-8")


@pytest_twisted.ensureDeferred
async def test_console_approve_accepts_a_one_mib_edited_body(hitl_stacks):
    """The approve form gets the API's large cap: a ~1 MiB edited text body is approved and relayed whole."""
    stack = await hitl_stacks()
    mid = await stack.hold(subject="big one")
    b = Browserish(StackServer(stack))
    assert (await b.sign_in(stack.key)).code == 303
    line = "0123456789 abcdefghij ABCDEFGHIJ 0123456789 abcdefghij ABCDEFGHIJ xyz\n"
    big = line * (1024 * 1024 // len(line) + 1)
    assert len(big) > 1024 * 1024
    r = await b.post(f"/console/approvals/{mid}/approve", {"body_text": big, "subject": "big one",
                                                          "to": "bob@example.net"})
    assert r.code == 303 and r.header("Location") == "/console/approvals?done=approved", (r.code, r.body[:300])
    assert await stack.status(mid) == "sent"
    mail = await _relayed_to(stack, "bob@example.net")
    text = email.message_from_bytes(mail.content, policy=email.policy.default).get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n") == big


@pytest_twisted.ensureDeferred
async def test_console_recipients_with_commas_in_display_names_stay_one_address(hitl_stacks):
    """``"Doe, Jane" <jane@example.com>`` in the To field is one recipient, parsed by the API's address rule."""
    stack = await hitl_stacks()
    mid = await stack.hold(subject="names")
    b = Browserish(StackServer(stack))
    assert (await b.sign_in(stack.key)).code == 303
    to = '"Doe, Jane" <jane@example.com>, bob@example.net\n"Smith, J. \\"Jo\\"" <JO@Example.com>'
    r = await b.post(f"/console/approvals/{mid}/approve", {"to": to, "cc": "", "bcc": ""})
    assert r.code == 303, (r.code, r.body[:500])
    row = await stack.service.db.fetchone("SELECT to_addrs, edited FROM messages WHERE id = %s", (mid,))
    assert row["to_addrs"] == ["jane@example.com", "bob@example.net", "jo@example.com"] and row["edited"]
    mail = await _relayed_to(stack, "jane@example.com")
    assert sorted(mail.recipients) == ["bob@example.net", "jane@example.com", "jo@example.com"]


@pytest_twisted.ensureDeferred
async def test_console_bad_recipient_is_shown_with_the_api_message(api_server_factory):
    """A malformed entry is refused with the API's invalid-address message; the hold stays pending."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    hold = await _hold(server.db, agent, uid, "bad to")
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    r = await b.post(f"/console/approvals/{hold}/approve", {"to": '"Doe, Jane <jane@example.com>'})
    assert r.code == 400 and b"unterminated quoted string" in r.body, r.body[-800:]
    assert await val(server.db, "SELECT status FROM messages WHERE id = %s", (hold,)) == "pending_approval"
    # an untouched field (same addresses, other spelling) is no edit
    r = await b.post(f"/console/approvals/{hold}/approve", {"to": "Bob <BOB@example.net>"})
    assert await val(server.db, "SELECT edited FROM messages WHERE id = %s", (hold,)) is False


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_oversized_console_form_gets_an_html_page_with_console_headers(api_server_factory):
    """Over the cap on a console path → a 400 HTML page with the console's headers, not the API's JSON."""
    server = await api_server_factory()
    port = server.port.getHost().port
    for path, length in ((b"/console/keys", 70_000), (b"/console/approvals/msg_x/approve", 26 * 1024 * 1024)):
        request = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n"
        response = await threads.deferToThread(_raw_http, port, request)
        head, _, body = response.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines[1:])}
        assert lines[0] == b"HTTP/1.1 400 Bad Request", head
        assert headers[b"content-type"] == b"text/html; charset=utf-8"
        assert headers[b"content-security-policy"] == CSP.encode()
        assert headers[b"x-frame-options"] == b"DENY" and headers[b"cache-control"] == b"no-store"
        assert int(headers[b"content-length"]) == len(body)
        assert body.startswith(b"<!DOCTYPE html>") and b"Request too large" in body and b"{" not in body


@pytest_twisted.ensureDeferred
async def test_head_and_unserved_methods_on_console_paths_answer_html(api_server_factory):
    """HEAD on a console page answers like GET without a body; PUT/DELETE → 405 HTML with Allow."""
    server = await api_server_factory()
    _uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    r = await b.request("HEAD", "/console/signin")
    assert_console_html(r, 200)
    assert r.body == b""
    r = await b.request("HEAD", "/console/")
    assert r.code == 303 and r.header("Location") == "/console/signin"
    assert (await b.sign_in(key)).code == 303
    r = await b.request("HEAD", "/console/approvals")
    assert_console_html(r, 200)
    for method, path in (("PUT", "/console/signin"), ("DELETE", "/console/keys"), ("POST", "/console/nowhere")):
        r = await b.request(method, path)
        body = assert_console_html(r, 405)
        assert "Method not allowed" in body and "<!DOCTYPE html>" in body
        assert r.header("Allow")
    # the API keeps its JSON answers
    r = await b.request("HEAD", "/api/v1/agents")
    assert r.code == 405 and r.header("Content-Type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_agent_deletion_needs_typed_address_and_csrf_and_is_404_for_other_users(api_server_factory):
    """Delete from the agent page: wrong confirmation → 400, no CSRF → 403, other user → 404; the
    owner's typed address deletes it with its mail and agent keys (the DELETE /api/v1/agents store call)."""
    from e2a.store import accounts

    server = await api_server_factory()
    uid_a, key_a = await insert_user_with_key(server.db, "a@example.com")
    _uid_b, key_b = await insert_user_with_key(server.db, "b@example.com")
    agent = await _agent(server, key_a, "alpha")
    mid = await _inbound(server.db, agent, uid_a, "kept until deleted")
    _k, agent_key = await accounts.create_api_key(server.db, uid_a, "agent", agent)
    path = f"/console/agents/{agent}/delete"

    other = Browserish(server)
    assert (await other.sign_in(key_b)).code == 303
    r = await other.post(path, {"confirm": agent})
    assert r.code == 404 and agent.encode() not in r.body

    owner = Browserish(server)
    assert (await owner.sign_in(key_a)).code == 303
    page = (await owner.get(f"/console/agents/{agent}")).body.decode()
    assert f'action="/console/agents/{agent}/delete"' in page and 'for="confirm_address"' in page
    r = await owner.request("POST", path, {"confirm": agent})  # no CSRF token
    assert r.code == 403
    r = await owner.post(path, {"confirm": "alpha"})
    assert r.code == 400 and b"type the agent" in r.body
    assert await val(server.db, "SELECT count(*) FROM agents WHERE id = %s", (agent,)) == 1

    r = await owner.post(path, {"confirm": agent.upper()})
    assert r.code == 303 and r.header("Location") == "/console/?done=agent_deleted"
    assert await val(server.db, "SELECT count(*) FROM agents WHERE id = %s", (agent,)) == 0
    assert await val(server.db, "SELECT count(*) FROM messages WHERE id = %s", (mid,)) == 0
    r = await server.request("GET", "/api/v1/agents", key=agent_key)
    assert r.code == 401  # its agent-scoped key went with it
    overview = await owner.get("/console/?done=agent_deleted")
    assert b"Agent deleted." in overview.body and re.search(rb"No agents yet", overview.body)
    assert (await owner.get(f"/console/agents/{agent}")).code == 404
