"""SmtpSession glue on StringTransport + task.Clock: timers and memory bounds, deterministic."""

from __future__ import annotations

import dataclasses

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from e2a.config import SmtpConfig
from e2a.smtp.server import CLOSE_GRACE, SmtpFactory


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


# -- output back-pressure, close grace, timeouts during storage ---------------------------------


class BufferedTransport(StringTransport):
    """A StringTransport that, like a real socket transport, pauses its streaming producer once
    more than ``limit`` unread bytes are queued."""

    limit = 4096

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.limit:
            self.producer.pauseProducing()


def buffered_session(**overrides):
    clock = task.Clock()
    fakes = Fakes()
    config = dataclasses.replace(SmtpConfig(domain="mx.test"), **overrides)
    factory = SmtpFactory(config, fakes.lookup, fakes.accept, clock)
    proto = factory.buildProtocol(None)
    transport = BufferedTransport(peerAddress=None)
    proto.makeConnection(transport)
    return proto, transport, clock, fakes


def test_session_registers_as_streaming_producer_on_connect():
    """The session is its transport's push producer, so a full send buffer can pause it."""
    proto, transport, _, _ = session()
    assert transport.producer is proto and transport.streaming is True


def test_pipelined_commands_not_processed_while_consumer_paused():
    """While the transport has paused us no reply is produced and reading is paused; resume goes on."""
    proto, transport, _, _ = session()
    replies(transport)
    proto.pauseProducing()
    assert transport.producerState == "paused"
    proto.dataReceived(b"NOOP\r\n" * 50)
    assert transport.value() == b""
    proto.resumeProducing()
    assert transport.producerState == "producing"
    assert replies(transport) == ["250 2.0.0 Ok"] * 50


def test_pipelined_ehlo_flood_output_bounded_when_client_never_reads():
    """8 KiB of pipelined EHLO never queues more than the send buffer plus one reply."""
    proto, transport, _, _ = buffered_session()
    ehlo_reply = len(transport.value())  # greeting, counted with the first EHLO below
    proto.dataReceived(b"EHLO c\r\n")
    ehlo_reply = len(transport.value()) - ehlo_reply
    sent = 1
    for _ in range(8):
        proto.dataReceived(b"EHLO c\r\n" * 128)
        sent += 128
        assert len(transport.value()) <= BufferedTransport.limit + ehlo_reply
    assert transport.producerState == "paused"
    answered = transport.value().count(b"250 ENHANCEDSTATUSCODES")
    assert answered < sent
    while answered < sent:  # the client reads everything, chunk by chunk
        transport.clear()
        proto.resumeProducing()
        got = transport.value().count(b"250 ENHANCEDSTATUSCODES")
        assert got > 0
        answered += got
    assert answered == sent and not proto._inbuf
    assert transport.producerState == "producing"


def test_quit_unregisters_producer_and_aborts_after_grace():
    """After QUIT an unread socket is aborted CLOSE_GRACE later; connectionLost cancels the timer."""
    proto, transport, clock, _ = session()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    proto.dataReceived(b"QUIT\r\n")
    assert replies(transport)[-1] == "221 2.0.0 Bye"
    assert transport.disconnecting and transport.producer is None
    clock.advance(CLOSE_GRACE - 0.1)
    assert aborted == []
    clock.advance(0.1)
    assert aborted == [True]
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_close_grace_timer_cancelled_when_connection_goes():
    """A client that reads its 421 and disconnects leaves no timer behind."""
    proto, transport, clock, _ = session(idle_timeout=5)
    clock.advance(5)
    assert replies(transport)[-1].startswith("421 4.4.2")
    assert len(clock.getDelayedCalls()) == 1
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_factory_shutdown_completes_when_client_never_reads():
    """A write-blocked session does not block shutdown(): it is aborted after CLOSE_GRACE."""
    proto, transport, clock, _ = session()
    proto.pauseProducing()
    transport.abortConnection = lambda: proto.connectionLost(None)
    d = proto.factory.shutdown()
    assert replies(transport)[-1] == "421 4.3.2 mx.test Service shutting down"
    assert not d.called
    clock.advance(CLOSE_GRACE)
    assert d.called and not proto.factory.sessions


def test_session_timeout_during_store_waits_for_store_reply():
    """A timeout while accept is pending sends the store's reply first, then 421 (no duplicate)."""
    proto, transport, clock, fakes = session(session_timeout=100, store_timeout=30)
    start_data(proto, transport)
    clock.advance(90)
    proto.dataReceived(b"A: b\r\n\r\n.\r\n")
    clock.advance(10)
    assert replies(transport) == [] and not transport.disconnecting
    fakes.pending[0].callback("msg_1")
    assert replies(transport) == ["250 2.0.0 Ok: queued as msg_1", "421 4.4.2 mx.test Timeout, closing connection"]
    assert transport.disconnecting


def test_session_timeout_during_store_bounded_by_store_timeout():
    """A store that never answers still ends: 451 at store_timeout, then the deferred 421."""
    proto, transport, clock, fakes = session(session_timeout=100, store_timeout=30)
    start_data(proto, transport)
    clock.advance(90)
    proto.dataReceived(b"A: b\r\n\r\n.\r\n")
    clock.advance(10)
    assert replies(transport) == []
    clock.advance(20)
    assert replies(transport) == ["451 4.3.0 Temporary failure, try again later", "421 4.4.2 mx.test Timeout, closing connection"]
    assert transport.disconnecting


def test_accepted_content_is_handed_over_as_crlf_only_and_refused_content_never_is():
    """The envelope handed to accept says the DATA scanner found CRLF line ends only (DKIM then
    does not count them again); content with a bare LF never reaches accept (550 5.6.0)."""
    proto, transport, _clock, fakes = session()
    start_data(proto, transport)
    proto.dataReceived(b"A: b\r\n\r\nbody\r\n.\r\n")
    [(envelope, raw)] = fakes.accepted
    assert envelope.crlf_only is True and raw == b"A: b\r\n\r\nbody\r\n"
    fakes.pending[0].callback("msg_" + "0" * 32)
    transport.clear()
    proto.dataReceived(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bot@x.test>\r\nDATA\r\n")
    assert replies(transport)[-1].startswith("354")
    proto.dataReceived(b"A: b\r\n\r\nbare\nLF\r\n.\r\n")
    assert replies(transport)[-1].startswith("550 5.6.0") and len(fakes.accepted) == 1
