"""SmtpSession glue on StringTransport + task.Clock: timers and memory bounds, deterministic."""

from __future__ import annotations

import dataclasses

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from e2a.config import SmtpConfig
from e2a.smtp.server import SmtpFactory


class Fakes:
    def __init__(self) -> None:
        self.accepted: list = []
        self.pending: list[defer.Deferred] = []

    async def lookup(self, address: str) -> str | None:
        return address if address.startswith("bot@") else None

    def accept(self, envelope, raw):
        self.accepted.append((envelope, raw))
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def session(**overrides):
    clock = task.Clock()
    fakes = Fakes()
    config = dataclasses.replace(SmtpConfig(domain="mx.test"), **overrides)
    factory = SmtpFactory(config, fakes.lookup, fakes.accept, clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=None)
    proto.makeConnection(transport)
    return proto, transport, clock, fakes


def replies(transport: StringTransport) -> list[str]:
    out = transport.value().decode().split("\r\n")
    transport.clear()
    return [line for line in out if line]


def start_data(proto, transport):
    proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bot@x.test>\r\nDATA\r\n")
    assert replies(transport)[-1].startswith("354")


def test_data_lines_do_not_reset_data_timeout():
    """A sender trickling DATA lines is still cut off data_timeout after 354 (stock resets per line)."""
    proto, transport, clock, _ = session(data_timeout=600, idle_timeout=300)
    start_data(proto, transport)
    for _ in range(59):
        clock.advance(10)
        proto.dataReceived(b"X-Line: keeps coming\r\n")
    assert not transport.disconnecting
    clock.advance(10)
    assert replies(transport) == ["421 4.4.2 mx.test Timeout, closing connection"]
    assert transport.disconnecting


def test_data_lines_do_not_reset_idle_timer_either():
    """The idle timer is off during DATA; a slow message past idle_timeout is not cut by it."""
    proto, transport, clock, fakes = session(data_timeout=600, idle_timeout=30)
    start_data(proto, transport)
    clock.advance(100)
    proto.dataReceived(b"A: b\r\n\r\n.\r\n")
    assert not transport.disconnecting and len(fakes.accepted) == 1


def test_partial_command_does_not_reset_idle():
    """Bytes without a CRLF are not a command line: the idle timer keeps running."""
    proto, transport, clock, _ = session(idle_timeout=300)
    replies(transport)
    for _ in range(29):
        clock.advance(10)
        proto.dataReceived(b"N")
    clock.advance(10)
    assert replies(transport)[-1].startswith("421 4.4.2")


def test_session_timeout_421():
    """The whole connection is limited by session_timeout even when busy with commands."""
    proto, transport, clock, _ = session(session_timeout=1800, idle_timeout=300)
    for _ in range(8):
        clock.advance(200)
        proto.dataReceived(b"NOOP\r\n")
    clock.advance(199)
    assert not transport.disconnecting
    clock.advance(1)
    assert replies(transport)[-1].startswith("421 4.4.2")


def test_reading_paused_while_store_pending_and_pipelined_reply_follows():
    """While accept is pending the transport is paused; the pipelined QUIT is answered after 250."""
    proto, transport, clock, fakes = session()
    start_data(proto, transport)
    proto.dataReceived(b"A: b\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert transport.producerState == "paused"
    assert replies(transport) == []
    fakes.pending[0].callback("msg_x")
    assert replies(transport) == ["250 2.0.0 Ok: queued as msg_x", "221 2.0.0 Bye"]


def test_idle_timer_not_running_while_store_pending():
    """Our own slowness never counts as the client's idle time; store_timeout governs instead."""
    proto, transport, clock, fakes = session(idle_timeout=10, store_timeout=30)
    start_data(proto, transport)
    proto.dataReceived(b"A: b\r\n\r\n.\r\n")
    clock.advance(29)
    assert replies(transport) == []
    clock.advance(1)
    assert replies(transport) == ["451 4.3.0 Temporary failure, try again later"]
    assert fakes.pending[0].called  # cancelled


def test_command_flood_buffer_bounded():
    """An endless command line never grows the buffer past the command limit."""
    proto, transport, clock, _ = session()
    for _ in range(63):
        proto.dataReceived(b"Z" * 1024)
        assert len(proto._inbuf) <= 512
    assert not transport.disconnecting
    proto.dataReceived(b"Z" * 1024)
    assert replies(transport)[-1].startswith("421 4.7.0")
    assert transport.disconnecting


def test_data_memory_bounded_for_oversize_message():
    """An oversize message is counted, not buffered: the scanner holds nothing past the limit."""
    proto, transport, clock, _ = session(max_message_size=10000)
    start_data(proto, transport)
    proto.dataReceived(b"A: b\r\n\r\n")
    for _ in range(100):
        proto.dataReceived((b"y" * 98 + b"\r\n") * 10)
    assert proto._scanner._chunks is None and proto._scanner.size > 10000
    proto.dataReceived(b".\r\n")
    assert replies(transport)[-1].startswith("552 5.3.4")


def test_shutdown_waits_for_pending_store_reply():
    """shutdown() lets a message being stored get its 250 before 421 4.3.2."""
    proto, transport, clock, fakes = session()
    start_data(proto, transport)
    proto.dataReceived(b"A: b\r\n\r\n.\r\n")
    d = proto.factory.shutdown()
    assert not transport.disconnecting
    fakes.pending[0].callback("msg_1")
    assert replies(transport) == ["250 2.0.0 Ok: queued as msg_1", "421 4.3.2 mx.test Service shutting down"]
    proto.connectionLost(None)
    assert d.called
