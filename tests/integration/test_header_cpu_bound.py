"""Issue 15.3: a huge To/Cc/Reply-To header section sent to many agents costs one bounded
parse per message, not one per recipient copy on the reactor thread.

The attack: one ~100 KiB header section of addresses to 50 agents. Before the fix every copy
parsed To/Cc/Reply-To again on the reactor (10–13 s to accept, every other session frozen
meanwhile). The test checks the fix itself, not a duration: the section is parsed once, in a
worker thread, so the reactor is free whatever the machine's speed; what one parse costs is
bounded by the parser's input (tests/unit/test_messageview_bounds.py).
"""

from __future__ import annotations

import threading

import pytest_twisted

from e2a import inbound
from tests.support.inboundstack import DOMAIN, InboundStack, send

AGENTS = 50


def _huge_message(size: int = 95_000) -> bytes:
    """To, Cc and Reply-To of quoted display names and addresses, folded, ~``size`` octets."""
    def field(name: str, n: int) -> str:
        parts = [f'"User, {i} (x)" <user{i}@example{i % 7}.com>' for i in range(n)]
        return f"{name}: " + ",\r\n\t".join(parts) + "\r\n"

    n = size // 3 // 42
    head = field("To", n) + field("Cc", n) + field("Reply-To", n)
    return (f"From: Alice <alice@example.com>\r\nSubject: big\r\nMessage-ID: <big@example.com>\r\n{head}\r\nHi\r\n").encode()


@pytest_twisted.async_yield_fixture
async def stack(db):
    s = await InboundStack(db).setup({f"a{i}": "local" for i in range(AGENTS)})
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_huge_address_headers_to_many_agents_parsed_once_off_the_reactor(stack, db, monkeypatch):
    """~95 KiB of To/Cc/Reply-To to 50 agents: one parse of the header section, in a worker
    thread; 250, and every copy stored with ≤ 100 parsed addresses per list."""
    parses: list[bool] = []  # per parse: whether it ran on the reactor's thread
    parse = inbound._parsed_view

    def spy(fields):
        parses.append(threading.current_thread() is threading.main_thread())
        return parse(fields)

    monkeypatch.setattr(inbound, "_parsed_view", spy)
    port = stack.listen()
    raw = _huge_message()
    assert len(raw) > 90_000
    reply = await send(port, "alice@example.com", [f"a{i}@{DOMAIN}" for i in range(AGENTS)], raw)
    assert reply.code == 250, reply
    assert parses == [False]
    rows = await db.fetchall("SELECT to_addrs, cc_addrs, display_from FROM messages")
    assert len(rows) == AGENTS
    assert all(len(r["to_addrs"]) == 100 and len(r["cc_addrs"]) == 100 for r in rows)
    assert rows[0]["to_addrs"][0] == "user0@example0.com"
