"""Hostile or broken input never becomes a 500, and the database being down is a 503."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from twisted.internet import threads

from e2a.api.app import redact_query
from tests.support.apiserver import insert_user_with_key


@pytest_twisted.ensureDeferred
async def test_database_down_answers_503_unavailable(api_server_factory, db):
    """A TransientError (database unreachable) maps to 503 `unavailable`, not 500."""
    api = await api_server_factory()
    _, key = await insert_user_with_key(db)
    db.close()
    r = await api.request("GET", "/api/v1/agents", key=key)
    assert (r.code, r.json()["error"]["code"]) == (503, "unavailable")
    assert r.header("Retry-After")


@pytest_twisted.ensureDeferred
async def test_non_utf8_authorization_is_401(api_server_factory):
    """A header that is not UTF-8 is just an invalid key."""
    api = await api_server_factory()
    r = await api.request("GET", "/api/v1/agents", headers={"Authorization": b"Bearer \xff\xfe".decode("latin-1")})
    assert (r.code, r.json()["error"]["code"]) == (401, "unauthorized")


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000 + b"]" * 5000, b'{"message": "a\\u0000b"}', b'{"message": "\\ud800"}', b"\xff\xfe", b"[1]"],
)
@pytest_twisted.ensureDeferred
async def test_unusable_json_is_invalid_request_body(api_server_factory, body):
    """Deep nesting, NUL, lone surrogates, bad UTF-8, non-objects → 400 invalid_request_body."""
    api = await api_server_factory()
    r = await api.request("POST", "/api/feedback", data=body)
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_request_body")


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
async def test_declared_oversize_body_is_refused_without_reading(api_server_factory):
    """Content-Length over a 64 KiB route's cap: 400 body_too_large and the connection closes
    before the server reads the body (it is never sent here)."""
    api = await api_server_factory()
    port = api.port.getHost().port
    request = b"POST /api/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
    response = await threads.deferToThread(_raw_http, port, request)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b'"body_too_large"' in body


@pytest_twisted.ensureDeferred
async def test_streamed_oversize_body_is_cut_off(api_server_factory):
    """A chunked body that grows past the cap is refused once it crosses it."""
    api = await api_server_factory()
    port = api.port.getHost().port
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    request = b"POST /api/v1/keys HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    response = await threads.deferToThread(_raw_http, port, request)
    assert response.startswith(b"HTTP/1.1 400") and b"body_too_large" in response


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/api/v1/agents/a%40b/ws?token=e2a_secret", b"/api/v1/agents/a%40b/ws?token=***"),
        (b"/api/v1/approve?t=abc.def&x=1", b"/api/v1/approve?t=***&x=1"),
        (b"/x?%74oken=e2a_secret", b"/x?%74oken=***"),
        (b"/x?tokens=keep&at=keep", b"/x?tokens=keep&at=keep"),
        (b"/x?api_key=e2a_secret&n=2", b"/x?api_key=***&n=2"),
        (b"/x?key=%65%32%61_secret", b"/x?key=***"),
        (b"/x", b"/x"),
    ],
)
def test_access_log_redacts_secret_query_values(uri, expected):
    """`token` and `t` values, and any value holding an API key, never reach the access log."""
    assert redact_query(uri) == expected


@pytest_twisted.ensureDeferred
async def test_non_utf8_url_answers_json_404(api_server_factory):
    """Percent-encoded bytes that are not UTF-8 get the JSON error shape, not Klein's text."""
    api = await api_server_factory()
    r = await api.request("GET", "/api/v1/agents/%ff/messages")
    assert (r.code, r.json()["error"]["code"]) == (404, "not_found")
    assert r.header("Content-Type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_head_only_where_the_spec_lists_it(api_server_factory):
    """HEAD works on /api/health; elsewhere it is 405 and Allow never offers HEAD."""
    api = await api_server_factory()
    assert (await api.request("HEAD", "/api/health")).code == 200
    r = await api.request("HEAD", "/api/v1/info")
    assert r.code == 405 and r.header("Allow") == "GET"
    r = await api.request("DELETE", "/api/v1/info")
    assert r.code == 405 and r.header("Allow") == "GET"
    r = await api.request("POST", "/api/health")
    assert r.header("Allow") == "GET, HEAD"
