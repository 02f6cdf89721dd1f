"""The SMTP client protocol: twisted.mail's reply parser driven as one linear coroutine (see
:mod:`e2a.outbound.relay` for why not ``SMTPClient``'s own body path), with bounded replies.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic
from twisted.python.failure import Failure

from e2a.outbound.relay.rules import (
    COMMAND_TIMEOUT,
    MAX_REPLY_BYTES,
    MAX_REPLY_LINES,
    MAX_UNSOLICITED_REPLIES,
    QUIT_TIMEOUT,
    SmtpReply,
)

log = Logger()


class _SessionLost(Exception):
    """The connection closed (or was reset) while a reply was awaited."""


class _SessionTimeout(Exception):
    """No reply within the step's timeout."""


class _TlsFailed(Exception):
    """The TLS handshake after STARTTLS (or before the greeting) did not complete."""


class _ClientProtocol(smtp.SMTPClient):
    """twisted.mail's reply parser, driven by coroutines instead of the ``smtpState_*`` chain.

    ``command``/``read_reply`` return the next complete reply; ``send_data`` writes exact
    pre-stuffed bytes through a ``FileSender`` (flow-controlled, so a 25 MiB message never sits
    twice in memory) and never transforms them.
    """

    debug = False  # the LineLog would keep AUTH lines (credentials) in memory

    def __init__(self, clock: Any) -> None:
        super().__init__(identity=b"")
        self._clock = clock
        self._replies: list[SmtpReply] = []
        self._waiting: defer.Deferred[SmtpReply] | None = None
        self._lost: Failure | None = None
        self._aborted = False
        self._abort_reason = ""
        self._reply_lines = 0
        self._reply_bytes = 0
        #: True while message data is being written: the stream is mid-DATA, so no command
        #: (not even QUIT) may be written — it would become part of the message.
        self._in_data = False
        self.closed: defer.Deferred[None] = defer.Deferred()

    # twisted.mail plumbing ------------------------------------------------------------
    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self._expected = range(0, 1000)
        self._okresponse = self._on_reply
        self._failresponse = self._on_reply

    def lineReceived(self, line: bytes) -> Any:  # noqa: N802 - Twisted API
        if self._aborted or self._lost is not None:
            return None  # lines still buffered behind an abort are not ours to act on
        self._reply_lines += 1
        self._reply_bytes += len(line) + 2
        if self._reply_lines > MAX_REPLY_LINES or self._reply_bytes > MAX_REPLY_BYTES:
            log.warn("SMTP server reply exceeds {lines} lines or {size} bytes; dropping the connection",
                     lines=MAX_REPLY_LINES, size=MAX_REPLY_BYTES)
            self.resp = []
            self.abort("reply too long")
            return None
        why = super().lineReceived(line)
        if not self.resp:  # a reply completed (or an ignored line): the next one starts afresh
            self._reply_lines = self._reply_bytes = 0
        return why

    def _on_reply(self, code: int, resp: bytes) -> None:
        reply = SmtpReply(code, resp.decode("utf-8", "replace"))
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(reply)
        elif len(self._replies) >= MAX_UNSOLICITED_REPLIES:
            log.warn("SMTP server sent more than {count} replies nobody asked for; dropping the connection",
                     count=MAX_UNSOLICITED_REPLIES)
            self.abort("too many unsolicited replies")
        else:
            self._replies.append(reply)

    def sendError(self, exc: Exception) -> None:  # noqa: N802 - called by SMTPClient.lineReceived
        # An unparsable reply line: the session cannot continue.
        log.warn("SMTP protocol error from server: {error}", error=str(exc))
        self.abort("protocol error")

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 - Twisted API
        self.abort("reply line too long")

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:  # noqa: N802
        self._lost = reason
        self.setTimeout(None)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(_SessionLost(self._abort_reason or reason.getErrorMessage()))
        if not self.closed.called:
            self.closed.callback(None)

    # coroutine face --------------------------------------------------------------------
    async def read_reply(self, timeout: float) -> SmtpReply:
        if self._aborted:
            raise _SessionLost(self._abort_reason or "connection aborted")
        if self._replies:
            return self._replies.pop(0)
        if self._lost is not None:
            raise _SessionLost(self._lost.getErrorMessage())
        d: defer.Deferred[SmtpReply] = defer.Deferred()
        self._waiting = d

        def expire() -> None:
            if self._waiting is d:
                self._waiting = None
                d.errback(_SessionTimeout())

        timer = self._clock.callLater(timeout, expire)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()
            if self._waiting is d:
                self._waiting = None

    async def command(self, line: bytes, timeout: float = COMMAND_TIMEOUT) -> SmtpReply:
        if b"\r" in line or b"\n" in line or b"\0" in line:
            raise ValueError("refusing to send a command containing CR, LF or NUL")
        if self._in_data:
            raise RuntimeError("refusing to send a command while message data is being written")
        if self._aborted:
            raise _SessionLost(self._abort_reason or "connection aborted")
        self.transport.write(line + b"\r\n")
        return await self.read_reply(timeout)

    async def send_data(self, payload: bytes, idle_timeout: float, final_timeout: float) -> SmtpReply:
        """Write ``payload`` exactly (already stuffed and terminated); the final reply."""
        idle: list[Any] = [None]

        def stalled() -> None:
            log.warn("SMTP server stopped reading DATA for {seconds} s", seconds=idle_timeout)
            self.abort()

        def progress(chunk: bytes) -> bytes:
            if idle[0] is not None and idle[0].active():
                idle[0].reset(idle_timeout)
            return chunk  # exactly as given: no newline rewriting, no per-chunk stuffing

        idle[0] = self._clock.callLater(idle_timeout, stalled)
        self._in_data = True
        try:
            await basic.FileSender().beginFileTransfer(BytesIO(payload), self.transport, progress)
        except Exception as exc:
            # Cancelled or failed mid-transfer: the far end is inside DATA, and anything we
            # wrote now (QUIT included) would become message text. Drop the connection instead;
            # the transport then stops the FileSender as well.
            why = self._abort_reason or str(exc) or type(exc).__name__
            self.abort("message data not completely sent")
            raise _SessionLost(f"connection lost while sending message data ({why})") from exc
        finally:
            if idle[0].active():
                idle[0].cancel()
        self._in_data = False
        return await self.read_reply(final_timeout)

    def start_tls(self, creator: Any) -> None:
        """Switch to TLS after the server's 2xx to STARTTLS.

        RFC 3207 §6: anything the server sent in plain text after that reply (already parsed
        into replies, or still in the line buffer) is discarded, never read as an answer to a
        command sent over TLS.
        """
        stale = len(self._replies) + (1 if self.clearLineBuffer() else 0)
        self._replies.clear()
        self.resp = []
        self._reply_lines = self._reply_bytes = 0
        if stale:
            log.warn("discarded plaintext the SMTP server sent after its STARTTLS reply")
        self.transport.startTLS(creator)

    async def close(self) -> None:
        """QUIT (best effort), then close and wait for the transport to be gone.

        Mid-DATA (the transfer did not finish) there is no QUIT: it would land in the message
        body. The connection is aborted instead."""
        if self._in_data:
            self.abort("message data not completely sent")
        if self._lost is None and not self._aborted:
            try:
                await self.command(b"QUIT", QUIT_TIMEOUT)
            except (_SessionLost, _SessionTimeout):
                pass
        if self._lost is None and not self._aborted:
            self.transport.loseConnection()
        timer = self._clock.callLater(QUIT_TIMEOUT, self.abort)
        try:
            await self.closed
        finally:
            if timer.active():
                timer.cancel()

    def abort(self, reason: str = "") -> None:
        """Drop the connection now (timeouts, protocol errors): nothing more is sent, and
        nothing more that arrives is read."""
        if self._lost is None and not self._aborted and self.transport is not None:
            self._aborted = True
            self._abort_reason = reason
            self._replies.clear()
            self.clearLineBuffer()
            self.transport.abortConnection()


def _extensions(ehlo_text: str) -> dict[str, str]:
    items: dict[str, str] = {}
    for line in ehlo_text.splitlines()[1:]:
        parts = line.strip().split(None, 1)
        if parts:
            items[parts[0].upper()] = parts[1] if len(parts) > 1 else ""
    return items
