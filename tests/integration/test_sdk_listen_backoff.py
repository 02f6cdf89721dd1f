"""listen() against a scripted local WebSocket server: the backoff sequence, its reset after a
healthy connection, ack after the loop body, no retry on 403, clean close on cancellation.

The server is a plain ``websockets`` server on 127.0.0.1 whose answer per connection attempt
is scripted, so the reconnect rules (cli-sdk.md §4) are checked without waiting real seconds:
``backoff_delay`` is replaced by a recorder that returns 0.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import pytest
from websockets.asyncio.server import serve

from e2a.v1 import AsyncE2AClient, E2AApiError
from e2a.v1 import client as client_module

KEY = "e2a_" + "2" * 64
AGENT = "bot@agents.test"
NOTE = {"type": "message", "message_id": "msg_" + "a" * 32, "from": "alice@example.org", "recipient": AGENT,
        "subject": "Hi", "received_at": "2026-04-27T12:00:00.000000Z"}


def _error(connection, status: int, code: str):
    return connection.respond(HTTPStatus(status), json.dumps({"error": {"code": code, "message": code}}))


async def _scripted(script: list[str]):
    """A server answering connection attempt n as ``script[n]``; returns (server, log)."""
    log: dict = {"attempts": 0, "acks": [], "close_codes": [], "closed": asyncio.Event()}

    def process_request(connection, request):
        step = script[min(log["attempts"], len(script) - 1)]
        log["attempts"] += 1
        connection.step = step
        if step == "503":
            return _error(connection, 503, "unavailable")
        if step == "403":
            return _error(connection, 403, "origin_not_allowed")
        return None

    async def handler(ws):
        step = ws.step
        if step == "message":
            await ws.send(json.dumps(NOTE))
            try:
                frame = await asyncio.wait_for(ws.recv(), 10)
                log["acks"].append(json.loads(frame))
            finally:
                await ws.close(1001, "server shutting down")
        elif step == "close":
            await ws.close(1001, "server shutting down")
        elif step in ("hold", "message-hold"):
            if step == "message-hold":
                await ws.send(json.dumps(NOTE))
            await ws.wait_closed()
            log["close_codes"].append(ws.close_code)
            log["closed"].set()

    server = await serve(handler, "127.0.0.1", 0, process_request=process_request)
    return server, log


def test_listen_backoff_doubles_resets_after_a_healthy_connection_and_stops_on_403(monkeypatch):
    """503, 503 → attempts 0, 1; a connection that delivered a message resets to 0; an
    immediately closed one counts on (1); 403 raises at once without another attempt. The
    message is acked when the loop asks for the next one."""
    attempts: list[int] = []

    def recorder(attempt: int, rng=None) -> float:
        attempts.append(attempt)
        return 0.0

    monkeypatch.setattr(client_module, "backoff_delay", recorder)

    async def scenario():
        server, log = await _scripted(["503", "503", "message", "close", "403", "message"])
        port = server.sockets[0].getsockname()[1]
        seen = []
        try:
            async with AsyncE2AClient(api_key=KEY, base_url=f"http://127.0.0.1:{port}", agent_email=AGENT) as c:
                with pytest.raises(E2AApiError) as info:
                    async for note in c.listen():
                        seen.append(note.message_id)
        finally:
            server.close()
            await server.wait_closed()
        return info.value, seen, log

    err, seen, log = asyncio.run(scenario())
    assert (err.status_code, err.code) == (403, "origin_not_allowed")
    assert seen == [NOTE["message_id"]]
    assert log["acks"] == [{"type": "ack", "message_id": NOTE["message_id"]}]
    assert attempts == [0, 1, 0, 1]
    assert log["attempts"] == 5  # nothing after the 403


@pytest.mark.parametrize("how", ["cancel", "break"])
def test_listen_cancelled_or_left_closes_the_socket_cleanly(how):
    """Cancelling the listening task, or leaving the loop and closing the generator, closes
    the WebSocket with 1000 (normal closure), not 1011."""

    async def scenario():
        server, log = await _scripted(["hold" if how == "cancel" else "message-hold"])
        port = server.sockets[0].getsockname()[1]
        connected = asyncio.Event()
        client = AsyncE2AClient(api_key=KEY, base_url=f"http://127.0.0.1:{port}", agent_email=AGENT)

        async def consume():
            notes = client.listen(on_state=lambda event, _d: connected.set())
            async for _note in notes:
                break
            await notes.aclose()

        task = asyncio.ensure_future(consume())
        try:
            await asyncio.wait_for(connected.wait(), 10)
            if how == "cancel":
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await asyncio.wait_for(task, 10)
            await asyncio.wait_for(log["closed"].wait(), 10)
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
        return log

    log = asyncio.run(scenario())
    assert log["close_codes"] == [1000]
