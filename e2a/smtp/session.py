"""One inbound SMTP connection (:class:`SmtpSession`; see :mod:`e2a.smtp.server` for why the
input path of twisted.mail's ESMTP is replaced) and the callables it is given.
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    ITLSTransport,
)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from e2a import maillog
from e2a.abort import AbortSignal
from e2a.errors import TransientError
from e2a.metrics import metrics_of
from e2a.smtp.dataparser import DataLimits, DataScanner
from e2a.smtp.envelope import (
    Envelope,
    EnvelopeError,
    MailFrom,
    parse_mail_from,
    parse_rcpt_to,
    recipient_key,
)
from e2a.smtp.replies import (
    R_BYE,
    R_COMMAND_TOO_LONG,
    R_DATA_GO,
    R_DIRTY_COMMAND,
    R_FLOOD,
    R_HELP,
    R_MAIL_OK,
    R_NEED_ARG,
    R_NO_ARG,
    R_NO_RCPT,
    R_NO_VALID_RCPT,
    R_NOT_IMPLEMENTED,
    R_OK,
    R_PIPELINE_AFTER_REFUSED_DATA,
    R_RCPT_OK,
    R_SEQUENCE,
    R_SHUTDOWN,
    R_TIMEOUT,
    R_TLS_GO,
    R_TOO_BIG,
    R_TOO_MANY_ERRORS,
    R_TOO_MANY_MESSAGES,
    R_TOO_MANY_RCPT,
    R_TRANSIENT,
    R_UNKNOWN_COMMAND,
    R_VRFY,
    MessageRejected,
    Reply,
    envelope_error_reply,
    failure_reply,
    queued_reply,
    verdict_reply,
)
from e2a.smtp.sendnow import write_now

if TYPE_CHECKING:
    from e2a.smtp.factory import SmtpFactory

log = Logger()

RecipientLookup = Callable[[str], Awaitable[str | None]]
"""``(address) -> canonical agent address | None``; raising means "try later" (451 4.3.0)."""

AcceptFn = Callable[[Envelope, bytes], Awaitable[str]]
"""``(envelope, raw) -> msg id of the first stored copy``; resolves only after COMMIT.

When ``store_timeout`` expires the session sets ``envelope.abort`` (:class:`e2a.abort.AbortSignal`).
An implementation that marks the signal ``handled`` must then stop promptly and resolve with
its real outcome (raise when rolled back, return the id when the commit won the race); the
reply follows that outcome. Otherwise the call is cancelled and the reply is 451.
"""

# Seconds the session still waits, after setting the abort signal, for an accept that
# promised to honour it; past this it is cancelled and answered 451 (logged as an error).
ABORT_GRACE = 30.0

# Seconds the session waits for ``envelope.abort.probe`` (one read: did the failed or
# given-up accept commit after all?) before answering 451 anyway.
PROBE_TIMEOUT = 5.0

# Bytes of a command line without CRLF before the session is dropped (mail.md §1.3).
COMMAND_FLOOD_LIMIT = 65536

# Seconds a closing session may take to flush its last reply before the socket is aborted: a
# client that stops reading would otherwise hold its connection slot (and shutdown) forever.
CLOSE_GRACE = 10.0


def _log_failure(what: str, failure: Failure, **fields: Any) -> None:
    """Expected failures (transient, timeouts, explicit rejections) get one line, bugs a traceback."""
    if failure.check(MessageRejected):
        return
    if failure.check(defer.TimeoutError) and failure.value.args:
        # addTimeout's error reads as the bare tuple "(5, 'Deferred')"
        log.warn(what + " failed: no answer within {seconds} s", seconds=failure.value.args[0], **fields)
    elif failure.check(defer.TimeoutError):
        log.warn(what + " failed: timed out", **fields)
    elif failure.check(TransientError, defer.CancelledError):
        log.warn(what + " failed: {error}", error=str(failure.value), **fields)
    else:
        log.failure(what + " failed", failure, **fields)


def _call_async(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """Call a coroutine function, Deferred-returning or plain function; always a Deferred."""
    try:
        result = fn(*args)
    except Exception:
        return defer.fail()
    if inspect.iscoroutine(result):
        return defer.Deferred.fromCoroutine(result)
    if isinstance(result, defer.Deferred):
        return result
    if inspect.isawaitable(result):
        return defer.ensureDeferred(result)
    return defer.succeed(result)



class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"


_DIRTY = re.compile(rb"[\r\n\x00\x80-\xff]")

_COMMANDS = {
    "HELO": "do_HELO",
    "EHLO": "do_EHLO",
    "MAIL": "do_MAIL",
    "RCPT": "do_RCPT",
    "DATA": "do_DATA",
    "RSET": "do_RSET",
    "NOOP": "do_NOOP",
    "VRFY": "do_VRFY",
    "HELP": "do_HELP",
    "QUIT": "do_QUIT",
    "STARTTLS": "do_STARTTLS",
    "EXPN": "do_NOT_IMPLEMENTED",
    "AUTH": "do_NOT_IMPLEMENTED",
    "BDAT": "do_NOT_IMPLEMENTED",
    "ETRN": "do_NOT_IMPLEMENTED",
    "TURN": "do_NOT_IMPLEMENTED",
}


@implementer(IPushProducer)
class SmtpSession(smtp.ESMTP):
    """One inbound SMTP connection. Built by :class:`SmtpFactory`; not for direct use.

    The session is a streaming producer on its own transport: when the client stops reading
    our replies the transport pauses us, and we stop reading and parsing commands until it
    resumes us, so a pipelining client cannot make us queue output without limit (§1.2).
    """

    def __init__(self, factory: SmtpFactory) -> None:
        super().__init__(chal={}, contextFactory=factory.tls)
        self.factory = factory
        self._config = factory.config
        self._clock = factory.clock
        self.host = self._config.domain
        self._inbuf = bytearray()
        self._mode = _Mode.COMMAND
        self._busy = False  # a reply waits for an async call; input is not parsed meanwhile
        self._pumping = False
        self._paused = False  # we paused the transport's reading
        self._write_blocked = False  # the transport paused us: its send buffer is full
        self._producing = False  # registered as the transport's streaming producer
        self._closing = False
        self._registered = False
        self._discarding = False  # inside an over-long command line, dropping to CRLF
        self._discarded = 0
        self._tls = False
        self._can_tls = False
        self._client_ip = ""
        self._helo_name: str | None = None
        self._helo_kind = ""
        self._mail: MailFrom | None = None
        self._rcpts: list[str] = []
        self._rcpt_keys: set[str] = set()
        self._scanner: DataScanner | None = None
        self._messages = 0
        self._errors = 0
        self._pending: defer.Deferred[Any] | None = None
        self._pending_is_store = False
        self._close_after_reply: Reply | None = None
        self._close_call: IDelayedCall | None = None  # aborts a close that never flushes
        self._idle_call: IDelayedCall | None = None
        self._data_call: IDelayedCall | None = None
        self._session_call: IDelayedCall | None = None
        self._store_call: IDelayedCall | None = None  # store_timeout / abort grace timer

    # -- twisted.mail hooks we neutralise -------------------------------------------------------

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        """No Received header here: the accept function writes the trace headers (mail.md §1.8)."""
        return None

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"SIZE": [str(self._config.max_message_size).encode()],
            b"8BITMIME": None,
            b"PIPELINING": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self._can_tls and not self._tls:
            ext[b"STARTTLS"] = None
        return ext

    def lookupMethod(self, command: bytes | str) -> Callable[[str], None] | None:
        if isinstance(command, bytes):
            command = command.decode("ascii", "replace")
        name = _COMMANDS.get(command.upper())
        return getattr(self, name) if name else None

    def greeting(self) -> bytes:
        return f"{self._config.domain} ESMTP e2a".encode("ascii")

    # -- connection lifecycle -----------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._client_ip = str(getattr(peer, "host", peer))
        refusal = self.factory.register(self)
        metrics_of(self.factory).smtp_connection(refusal is None)
        if refusal is not None:
            self._close(refusal)
            return
        self._registered = True
        self.transport.registerProducer(self, True)
        self._producing = True
        self._can_tls = self.ctx is not None and ITLSTransport.providedBy(self.transport)
        write_now(self.transport, b"220 " + self.greeting() + b"\r\n")
        self._session_call = self._clock.callLater(self._config.session_timeout, self._on_timeout)
        self._restart_idle()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closing = True
        self._producing = False  # the transport drops (and stops) its producer itself
        self._cancel_timers()
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        self._scanner = None
        self._inbuf = bytearray()
        pending, self._pending = self._pending, None
        if pending is not None and not self._pending_is_store:
            # A lookup nobody will read: stop it. Storage is left to finish (or hit its own
            # timeout and roll back) so a commit is never torn in half by a disconnect.
            pending.cancel()
        if self._registered:
            self._registered = False
            self.factory.unregister(self)

    def shutdown(self) -> None:
        """Answer ``421 4.3.2`` and close; a message being stored gets its reply first."""
        if self._closing:
            return
        if self._pending is not None and self._pending_is_store:
            self._close_after_reply = R_SHUTDOWN
            return
        self._close(R_SHUTDOWN)

    # -- IPushProducer: the transport tells us when its send buffer is full or drained -----------

    def pauseProducing(self) -> None:
        """The client is not reading our replies: stop reading and parsing its commands."""
        self._write_blocked = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        """The send buffer drained: read again and go on with any buffered commands."""
        if not self._write_blocked:
            return
        self._write_blocked = False
        if self._closing:
            return
        self._pump()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost does the cleanup."""
        self._producing = False

    # -- input pump ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._mode is _Mode.DATA and not self._blocked() and not self._inbuf:
            # Fast path: content goes straight to the scanner without a buffer copy.
            self._feed_scanner(data)
        else:
            self._inbuf += data
        self._pump()

    def _pump(self) -> None:
        """Process buffered input strictly one command at a time, until blocked or starved."""
        if self._pumping:
            return  # re-entered from a synchronously completed async call; the loop goes on
        self._pumping = True
        try:
            while not self._blocked() and not self._closing and self._inbuf:
                if self._mode is _Mode.DATA:
                    data = bytes(self._inbuf)
                    self._inbuf.clear()
                    self._feed_scanner(data)
                elif not self._pump_command():
                    break
        finally:
            self._pumping = False
        self._sync_reading()

    def _blocked(self) -> bool:
        """No input is parsed while a reply is pending or while the client is not reading ours."""
        return self._busy or self._write_blocked

    def _sync_reading(self) -> None:
        """Pause the transport while a reply is pending and input is waiting, or while the
        client does not read our replies, so input and output stay bounded and ordered.

        Ordering never depends on the pause (the pump parses nothing while busy); the pause
        bounds memory. A client that waits for each reply (no pipelining) sends nothing while
        we are busy, so pausing then would only cost two ``epoll_ctl`` calls per lookup and
        per stored message. Hence: pause once bytes are buffered behind a pending reply (the
        first chunk that arrives while busy pauses reading), resume when idle again. A full
        send buffer (:meth:`pauseProducing`) pauses reading at once.
        """
        if self._closing:
            return
        if not self._paused and (self._write_blocked or (self._busy and self._inbuf)):
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not self._blocked():
            self._paused = False
            self.transport.resumeProducing()

    def _pump_command(self) -> bool:
        """Take one command line off the buffer. Returns False when more input is needed."""
        buf = self._inbuf
        if self._discarding:
            end = buf.find(b"\r\n")
            if end < 0:
                drop = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
                self._discarded += drop
                del buf[:drop]
                if self._discarded >= COMMAND_FLOOD_LIMIT:
                    self._close(R_FLOOD)
                return False
            self._discarded += end
            del buf[: end + 2]
            self._discarding = False
            if self._discarded >= COMMAND_FLOOD_LIMIT:
                self._close(R_FLOOD)
                return False
            self._restart_idle()
            self._reply(R_COMMAND_TOO_LONG)
            return True
        limit = self._config.max_command_length
        end = buf.find(b"\r\n", 0, limit)
        if end < 0:
            if len(buf) >= limit:
                self._discarding = True
                self._discarded = 0
                return True
            return False
        line = bytes(buf[:end])
        del buf[: end + 2]
        self._restart_idle()
        self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        if _DIRTY.search(line):
            self._reply(R_DIRTY_COMMAND)
            return
        verb, _, arg = line.decode("ascii").strip(" ").partition(" ")
        method = self.lookupMethod(verb)
        if method is None:
            self._reply(R_UNKNOWN_COMMAND)
            return
        method(arg.strip(" "))

    # -- output -------------------------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        if self._closing:
            return
        write_now(self.transport, bytes(reply))
        if reply.is_error and reply.code != 421:
            self._errors += 1
            if self._errors >= self._config.max_errors:
                self._close(R_TOO_MANY_ERRORS)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Kept for twisted.mail compatibility; everything here goes through :meth:`_reply`."""
        self._reply(Reply(code, message.decode("ascii", "replace")))

    def _close(self, reply: Reply) -> None:
        if self._closing:
            return
        write_now(self.transport, bytes(Reply(reply.code, reply.text.format(domain=self._config.domain))))
        self._finish()

    def _finish(self) -> None:
        """Stop everything and close once the last reply is flushed, or abort after CLOSE_GRACE.

        The producer is unregistered first: a transport with a registered producer never
        closes. The grace timer bounds a client that stops reading (it would otherwise keep its
        connection slot and block :meth:`SmtpFactory.shutdown`); connectionLost cancels it.
        """
        self._closing = True
        self._cancel_timers()
        self._inbuf.clear()
        self._scanner = None
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._close_call is None:
            self._close_call = self._clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._close_call = None
        log.info("SMTP client {ip} did not read its last reply; aborting", ip=self._client_ip)
        self.transport.abortConnection()

    # -- timers -------------------------------------------------------------------------------

    def _restart_idle(self) -> None:
        if self._closing:
            self._stop_idle()
            return
        if self._idle_call is not None and self._idle_call.active():
            # Same deadline as cancel + callLater, without a new DelayedCall per command.
            self._idle_call.reset(self._config.idle_timeout)
            return
        self._idle_call = self._clock.callLater(self._config.idle_timeout, self._on_timeout)

    def _stop_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _cancel_timers(self) -> None:
        for call in (self._idle_call, self._data_call, self._session_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._data_call = self._session_call = None

    def _on_timeout(self) -> None:
        """Idle, DATA and session timeouts all answer ``421 4.4.2``; nothing is stored.

        While a message is being stored the store may still commit, so its reply goes out
        first (else the sender retries a stored message); ``store_timeout`` bounds the wait.
        """
        if self._pending is not None and self._pending_is_store:
            if self._close_after_reply is None:
                self._close_after_reply = R_TIMEOUT
            return
        self._close(R_TIMEOUT)

    # -- async calls --------------------------------------------------------------------------

    def _confirm_not_stored(self, failure: Failure, abort: AbortSignal) -> Any:
        """Errback of an accept, before its reply: a failure is answered 451 only once the
        accept's ``abort.probe`` says its copies are not stored (mail.md §1.7 item 4: 250
        only after COMMIT, and never 451 after one). The failure is not always the real
        outcome: the accept may be given up after ``ABORT_GRACE`` while the cancel request is
        still on its way and the writes have committed, or PostgreSQL may report "canceled"
        for a statement whose COMMIT was already applied. The probe is one read, bounded by
        ``PROBE_TIMEOUT`` without cancelling it (a read cancelled mid-flight is the very race
        this is about); past the bound, or when it fails, the answer stays 451."""
        probe = abort.probe
        if probe is None:
            return failure
        settled: defer.Deferred[Any] = defer.Deferred()

        def settle(found: Any) -> None:
            if not settled.called:
                settled.callback(found)

        timer = self._clock.callLater(PROBE_TIMEOUT, settle, None)

        def probed(found: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(found, Failure):
                log.warn("could not check whether a failed accept committed: {error}", error=str(found.value))
                found = None
            settle(found)

        _call_async(probe).addBoth(probed)

        def decide(found: Any) -> Any:
            if not found:
                return failure
            log.warn(
                "accept failed ({error}) but its copies are committed; answering 250 {msg_id}",
                error=str(failure.value), msg_id=found,
            )
            return found

        return settled.addCallback(decide)

    def _await(
        self,
        deferred: defer.Deferred[Any],
        timeout: float,
        on_result: Callable[[Any], None],
        *,
        store: bool = False,
        abort: AbortSignal | None = None,
    ) -> None:
        """Block the pump until ``deferred`` fires; ``on_result`` gets its value or Failure.

        With ``abort`` (storage), ``timeout`` sets the signal rather than cancelling: an accept
        that honours it (``abort.handled``) is waited for, so the reply says whether the
        message was really committed (mail.md §1.7 item 4); ``ABORT_GRACE`` bounds that wait.
        """
        self._busy = True
        self._stop_idle()
        self._pending = deferred
        self._pending_is_store = store
        if abort is None:
            deferred.addTimeout(timeout, self._clock)
        else:

            def give_up() -> None:
                self._store_call = None
                log.error("accept ignored its abort for {grace} s; answering 451", grace=ABORT_GRACE)
                deferred.cancel()

            def timed_out() -> None:
                self._store_call = None
                abort.request()
                if abort.handled:
                    self._store_call = self._clock.callLater(ABORT_GRACE, give_up)
                else:
                    deferred.cancel()

            self._store_call = self._clock.callLater(timeout, timed_out)

        def done(result: Any) -> None:
            if abort is not None and self._store_call is not None:
                if self._store_call.active():
                    self._store_call.cancel()
                self._store_call = None
            if self._pending is deferred:
                self._pending = None
            if self._closing:
                if isinstance(result, Failure) and not result.check(defer.CancelledError):
                    log.failure("SMTP async call failed after close", result)
                return
            self._busy = False
            on_result(result)
            if self._close_after_reply is not None:
                self._close(self._close_after_reply)
                return
            if not self._closing:
                self._restart_idle()
            self._pump()

        deferred.addBoth(done).addErrback(lambda f: log.failure("SMTP session bug", f))

    # -- commands -----------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._mail = None
        self._rcpts = []
        self._rcpt_keys = set()

    def _greet(self, arg: str, kind: str) -> bool:
        if not arg:
            self._reply(R_NEED_ARG)
            return False
        self._helo_name = arg.split(" ")[0]
        self._helo_kind = kind
        self._reset_transaction()
        return True

    def do_HELO(self, arg: str) -> None:
        if self._greet(arg, "HELO"):
            self._reply(Reply(250, self._config.domain))

    def do_EHLO(self, arg: str) -> None:
        if not self._greet(arg, "EHLO"):
            return
        lines = [self._config.domain]
        for keyword, values in self.extensions().items():
            lines.append(b" ".join([keyword, *(values or [])]).decode("ascii"))
        self._reply(Reply(250, "\n".join(lines)))

    def do_MAIL(self, arg: str) -> None:
        if self._messages >= self._config.max_messages_per_session:
            self._close(R_TOO_MANY_MESSAGES)
            return
        if self._helo_name is None or self._mail is not None:
            self._reply(R_SEQUENCE)
            return
        try:
            mail = parse_mail_from(arg)
        except EnvelopeError as e:
            self._reply(envelope_error_reply(e, command="MAIL"))
            return
        if mail.size is not None and mail.size > self._config.max_message_size:
            self._reply(R_TOO_BIG)
            return
        self._mail = mail
        self._rcpts = []
        self._rcpt_keys = set()
        self._reply(R_MAIL_OK)

    def do_RCPT(self, arg: str) -> None:
        if self._mail is None:
            self._reply(R_SEQUENCE)
            return
        try:
            address = parse_rcpt_to(arg)
        except EnvelopeError as e:
            self._reply(envelope_error_reply(e, command="RCPT"))
            return
        key = recipient_key(address)
        if key in self._rcpt_keys:
            self._reply(R_RCPT_OK)  # same agent again: 250, still one copy
            return
        if len(self._rcpts) >= self._config.max_recipients:
            self._reply(R_TOO_MANY_RCPT)
            return

        def looked_up(result: Any) -> None:
            if isinstance(result, Failure):
                _log_failure("recipient lookup for {address}", result, address=address)
                reply = failure_reply(result)
                maillog.refused(code=reply.code, reason=f"{reply.text}: {address} ({type(result.value).__name__})",
                                client_ip=self._client_ip, mail_from=self._mail.address if self._mail else None)
                self._reply(reply)
            elif result is None:
                maillog.refused(code=R_NO_RCPT.code, reason=f"{R_NO_RCPT.text}: {address}",
                                client_ip=self._client_ip, mail_from=self._mail.address if self._mail else None)
                self._reply(R_NO_RCPT)
            else:
                canonical = str(result)
                if canonical not in self._rcpts:
                    self._rcpts.append(canonical)
                self._rcpt_keys.add(key)
                self._reply(R_RCPT_OK)

        d = _call_async(self.factory.recipients, address)
        self._await(d, self._config.store_timeout, looked_up)

    def do_DATA(self, arg: str) -> None:
        refusal: Reply | None = None
        if arg:
            refusal = R_NO_ARG
        elif self._mail is None:
            refusal = R_SEQUENCE
        elif not self._rcpts:
            refusal = R_NO_VALID_RCPT
        if refusal is not None:
            self._reply(refusal)
            if self._inbuf:
                # The client pipelined content after a DATA we refused: those bytes would be
                # read as commands. Stop here instead (mail.md §1.3 Pipelining).
                self._close(R_PIPELINE_AFTER_REFUSED_DATA)
            return
        self._reply(R_DATA_GO)
        self._mode = _Mode.DATA
        self._scanner = DataScanner(
            DataLimits(
                max_message_size=self._config.max_message_size,
                max_line_length=self._config.max_line_length,
                max_header_size=self._config.max_header_size,
            )
        )
        self._stop_idle()
        self._data_call = self._clock.callLater(self._config.data_timeout, self._on_timeout)

    def do_RSET(self, arg: str) -> None:
        if arg:
            self._reply(R_NO_ARG)
            return
        self._reset_transaction()
        self._reply(R_OK)

    def do_NOOP(self, arg: str) -> None:
        self._reply(R_OK)

    def do_VRFY(self, arg: str) -> None:
        # mail.md §1.6 answers VRFY with 252 unconditionally: e2a never confirms or denies an
        # address (no directory harvesting), so even a missing argument gets the same reply.
        self._reply(R_VRFY)

    def do_HELP(self, arg: str) -> None:
        self._reply(R_HELP)

    def do_QUIT(self, arg: str) -> None:
        if arg:
            self._reply(R_NO_ARG)
            return
        self._reply(R_BYE)
        self._finish()

    def do_NOT_IMPLEMENTED(self, arg: str) -> None:
        self._reply(R_NOT_IMPLEMENTED)

    def do_STARTTLS(self, arg: str) -> None:
        if self._tls:
            self._reply(R_SEQUENCE)
        elif not self._can_tls:
            self._reply(R_NOT_IMPLEMENTED)
        elif arg:
            self._reply(R_NO_ARG)
        elif self._mail is not None:
            self._reply(R_SEQUENCE)
        else:
            self._reply(R_TLS_GO)
            if self._closing:
                return
            # STARTTLS injection defence: nothing sent before the handshake may count.
            self._inbuf.clear()
            self._discarding = False
            self._helo_name = None
            self._helo_kind = ""
            self._reset_transaction()
            self._tls = True
            self.transport.startTLS(self.ctx)
            # startTLS re-registers us behind a fresh TLS producer membrane that does not know
            # we were paused, so it would never resume us; and the client's handshake must be
            # read. Start unblocked: the next full send buffer pauses us again.
            if self._write_blocked:
                self._write_blocked = False
                self._sync_reading()

    # -- DATA ---------------------------------------------------------------------------------

    def _feed_scanner(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        consumed = scanner.feed(data)
        if consumed is None:
            return
        rest = data[consumed:]
        if rest:
            self._inbuf[:0] = rest
        self._end_of_data(scanner)

    def _end_of_data(self, scanner: DataScanner) -> None:
        if self._data_call is not None and self._data_call.active():
            self._data_call.cancel()
        self._data_call = None
        self._scanner = None
        self._mode = _Mode.COMMAND
        self._messages += 1
        assert self._mail is not None
        envelope = Envelope(
            client_ip=self._client_ip,
            helo=self._helo_name or "",
            helo_kind=self._helo_kind,
            tls=self._tls,
            mail_from=self._mail.address,
            recipients=tuple(self._rcpts),
            crlf_only=True,  # what the scanner checked; a message that fails it is refused below
        )
        self._reset_transaction()
        verdict = scanner.verdict
        if verdict is not None:
            reply = verdict_reply(verdict)
            maillog.refused(code=reply.code, reason=f"{reply.text} ({verdict.value})", client_ip=self._client_ip,
                            mail_from=envelope.mail_from, size=scanner.size)
            metrics_of(self.factory).smtp_message(reply.code)
            self._reply(reply)
            self._restart_idle()
            return
        raw = scanner.content

        def stored(result: Any) -> None:
            if isinstance(result, Failure):
                _log_failure("accepting a message from {ip}", result, ip=self._client_ip)
                reply = failure_reply(result)
                maillog.refused(code=reply.code, reason=f"{reply.text} ({type(result.value).__name__})",
                                client_ip=self._client_ip, mail_from=envelope.mail_from, size=len(raw))
                metrics_of(self.factory).smtp_message(reply.code)
                self._reply(reply)
                return
            try:
                reply = queued_reply(result)
            except ValueError:
                log.error("accept returned an unusable message id {msg_id!r}", msg_id=result)
                reply = R_TRANSIENT
            metrics_of(self.factory).smtp_message(reply.code)
            self._reply(reply)

        d = _call_async(self.factory.accept, envelope, raw)
        d.addErrback(self._confirm_not_stored, envelope.abort)
        self._await(d, self._config.store_timeout, stored, store=True, abort=envelope.abort)
