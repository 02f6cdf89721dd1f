"""A raw SMTP test client: send exact bytes, read whole replies (multi-line aware).

Tests of the receive layer need to put arbitrary bytes on the wire (bare LF, smuggling
sequences, pipelined batches), so this client never formats anything for the caller.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

WAIT = 10.0  # seconds; a safety net for a broken test, never a "wait long enough"


@dataclass(frozen=True)
class SmtpReply:
    code: int
    lines: tuple[str, ...]  # text after "NNN-" / "NNN "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code at the start of the last line ('' when absent)."""
        first = self.lines[-1].split(" ", 1)[0] if self.lines else ""
        return first if first[:1].isdigit() and first.count(".") == 2 else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpTestClient(protocol.Protocol):
    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[str] = []
        self.replies: deque[SmtpReply] = deque()
        self._waiters: deque[defer.Deferred[SmtpReply]] = deque()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.connected_ = False
        self.clock: Any = None

    def connectionMade(self) -> None:
        self.connected_ = True

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\r\n" in self._buf:
            line, self._buf = self._buf.split(b"\r\n", 1)
            text = line.decode("ascii")
            self._lines.append(text[4:])
            if text[3:4] != "-":
                reply = SmtpReply(int(text[:3]), tuple(self._lines))
                self._lines = []
                if self._waiters:
                    self._waiters.popleft().callback(reply)
                else:
                    self.replies.append(reply)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected_ = False
        while self._waiters:
            self._waiters.popleft().errback(ConnectionError(f"closed while waiting: {reason.value}"))
        self.closed.callback(None)

    # -- API ------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    async def reply(self) -> SmtpReply:
        """The next complete reply (already received or still to come)."""
        if self.replies:
            return self.replies.popleft()
        if not self.connected_:
            raise ConnectionError("connection closed")
        from twisted.internet import reactor

        d: defer.Deferred[SmtpReply] = defer.Deferred()
        self._waiters.append(d)
        d.addTimeout(WAIT, reactor)
        return await d

    async def command(self, line: bytes | str) -> SmtpReply:
        """Send one line (CRLF appended) and return its reply."""
        if isinstance(line, str):
            line = line.encode("ascii")
        self.send(line + b"\r\n")
        return await self.reply()

    async def wait_closed(self) -> None:
        from twisted.internet import reactor

        if self.connected_:
            await defer.Deferred.addTimeout(self.closed, WAIT, reactor)

    async def start_tls(self, options: Any) -> None:
        """Switch the client side to TLS (after the server's 220)."""
        self.transport.startTLS(options)

    def abort(self) -> None:
        if self.connected_:
            self.transport.abortConnection()


async def connect(port: int, host: str = "127.0.0.1") -> SmtpTestClient:
    """Connect to the test server and consume nothing (the greeting is the first reply)."""
    from twisted.internet import reactor

    client = SmtpTestClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port), client)
    return client
