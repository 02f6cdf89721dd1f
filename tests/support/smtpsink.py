"""A strict fake SMTP receiver (smarthost / MX) on 127.0.0.1:0 that records exact bytes.

Strict on purpose: any bare CR or LF (in a command or in DATA) is a violation, recorded and
answered with 500. DATA ends at the first ``<CRLF>.<CRLF>`` exactly as a real server parses it,
and whatever follows is read as commands — so a client that leaves a ``.`` line unstuffed
shows up here as a truncated message plus smuggled commands (and extra messages).

Usage::

    sink = await start_smtp_sink(reactor, tls=tls_pair, auth={"user": "secret"})
    ...  # deliver to 127.0.0.1:sink.port
    sink.messages[0].raw     # bytes between 354 and the reply, terminator included
    sink.messages[0].content # the message after un-stuffing, CRLF line ends
    await sink.stop()

``script`` maps a step to a list of replies used in order (then the default): steps are
``greeting``, ``EHLO``, ``STARTTLS``, ``MAIL``, ``RCPT <address>``, ``RCPT``, ``DATA``, ``DOT``.
A reply of ``None`` means "never answer" (for timeout tests). A reply may hold several lines
(``"220 go\r\n250 injected"``): they go out in one write.

``stall_data``: stop reading as soon as the first message bytes arrive (the client's writes then
back up mid-DATA); ``wait_for("DATA_BYTES")`` fires at that moment.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from twisted.internet import defer, protocol, ssl

__all__ = ["ReceivedMessage", "SmtpSink", "self_signed_tls", "start_smtp_sink"]


@dataclass
class ReceivedMessage:
    mail_from: str
    recipients: list[str]
    raw: bytes
    content: bytes
    tls: bool
    auth_user: str | None


@dataclass
class SmtpSink:
    tls_options: Any = None
    auth: dict[str, str] | None = None
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    extensions: tuple[str, ...] = ("8BITMIME", "PIPELINING")
    broken_starttls: bool = False  # answer 220 to STARTTLS, then hang up instead of a handshake
    stall_data: bool = False  # stop reading once message data starts (mid-DATA tests)
    script: dict[str, list[str | None]] = field(default_factory=dict)
    messages: list[ReceivedMessage] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    sessions: int = 0
    port: int = 0
    _listener: Any = None
    _protocols: list[Any] = field(default_factory=list)
    _waiters: dict[str, list[defer.Deferred[None]]] = field(default_factory=dict)

    def wait_for(self, step: str) -> defer.Deferred[None]:
        """Fires when the sink next handles ``step`` (after choosing its reply)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault(step, []).append(d)
        return d

    def reply_for(self, step: str, default: str | None) -> str | None:
        queue = self.script.get(step)
        reply = queue.pop(0) if queue else default
        self.fire(step)
        return reply

    def fire(self, step: str) -> None:
        for d in self._waiters.pop(step, []):
            d.callback(None)

    async def stop(self) -> None:
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.abortConnection()
        waits = [p.closed for p in self._protocols if not p.closed.called]
        if self._listener is not None:
            await defer.maybeDeferred(self._listener.stopListening)
        if waits:
            await defer.DeferredList(waits)


class _SinkProtocol(protocol.Protocol):
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        self.buf = b""
        self.in_data = False
        self.tls = False
        self.auth_user: str | None = None
        self.auth_state: str | None = None
        self.login_user = ""
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.sink.sessions += 1
        self.sink._protocols.append(self)
        self.send(self.sink.reply_for("greeting", "220 sink.test ESMTP ready"))

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.sink._protocols:
            self.sink._protocols.remove(self)
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, reply: str | None) -> None:
        if reply is not None and self.transport is not None:
            self.transport.write(reply.encode("ascii") + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.in_data and self.sink.stall_data and self.buf:
                self.transport.pauseProducing()
                self.sink.fire("DATA_BYTES")
                return
            if self.in_data:
                if self.buf.startswith(b".\r\n"):  # buf always starts where the data starts
                    end, cut = 0, 3
                else:
                    idx = self.buf.find(b"\r\n.\r\n")
                    if idx < 0:
                        return
                    end, cut = idx + 2, idx + 5
                raw, self.buf = self.buf[:cut], self.buf[cut:]
                self.in_data = False
                self.end_of_data(raw, raw[:end])
                continue
            idx = self.buf.find(b"\r\n")
            if idx < 0:
                if b"\n" in self.buf or b"\r" in self.buf[:-1]:
                    self.sink.violations.append("bare CR/LF in command")
                    self.buf = b""
                    self.send("500 5.5.2 bare CR or LF")
                return
            line, self.buf = self.buf[:idx], self.buf[idx + 2 :]
            self.command(line)
            if self.transport is None or getattr(self.transport, "disconnecting", False):
                return

    def end_of_data(self, raw: bytes, body: bytes) -> None:
        if b"\r" in body.replace(b"\r\n", b"") or b"\n" in body.replace(b"\r\n", b""):
            self.sink.violations.append("bare CR/LF in DATA")
            self.send("500 5.6.0 bare CR or LF in message")
            self.reset()
            return
        lines = body.split(b"\r\n")[:-1] if body else []
        content = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        reply = self.sink.reply_for("DOT", "250 2.0.0 Ok: queued as ABC123")
        if reply is not None and reply.startswith("2"):
            self.sink.messages.append(
                ReceivedMessage(self.mail_from or "", list(self.rcpts), raw, content, self.tls, self.auth_user)
            )
        self.send(reply)
        self.reset()

    def reset(self) -> None:
        self.mail_from = None
        self.rcpts = []

    def command(self, line: bytes) -> None:
        self.sink.commands.append(line)
        if b"\r" in line or b"\n" in line:
            self.sink.violations.append("bare CR/LF in command")
            self.send("500 5.5.2 bare CR or LF")
            return
        text = line.decode("utf-8", "replace")
        if self.auth_state is not None:
            self.auth_continue(text)
            return
        verb = text.split(" ", 1)[0].upper()
        arg = text[len(verb) + 1 :]
        if verb == "EHLO":
            ext = list(self.sink.extensions)
            if self.sink.tls_options is not None and not self.tls:
                ext.append("STARTTLS")
            if self.sink.auth is not None:
                ext.append("AUTH " + " ".join(self.sink.auth_mechanisms))
            default = "\r\n".join(["250-sink.test"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"]) if ext else "250 sink.test"
            self.send(self.sink.reply_for("EHLO", default))
        elif verb == "HELO":
            self.send("250 sink.test")
        elif verb == "STARTTLS":
            if self.sink.tls_options is None or self.tls:
                self.send("502 5.5.1 no")
                return
            reply = self.sink.reply_for("STARTTLS", "220 2.0.0 go ahead")
            self.send(reply)
            if reply is None or not reply.startswith("220"):
                return
            if self.sink.broken_starttls:
                self.transport.loseConnection()
                return
            self.transport.startTLS(self.sink.tls_options)
            self.tls = True
            self.reset()
        elif verb == "AUTH":
            self.auth_start(arg)
        elif verb == "MAIL":
            if self.sink.auth is not None and self.auth_user is None:
                self.send("530 5.7.0 authentication required")
                return
            self.mail_from = arg.split(":", 1)[1].split(" ")[0].strip("<>") if ":" in arg else ""
            self.rcpts = []
            self.send(self.sink.reply_for("MAIL", "250 2.1.0 Ok"))
        elif verb == "RCPT":
            addr = arg.split(":", 1)[1].strip().strip("<>") if ":" in arg else ""
            reply = self.sink.reply_for(f"RCPT {addr}", None) or self.sink.reply_for("RCPT", "250 2.1.5 Ok")
            if reply is not None and reply.startswith("2"):
                self.rcpts.append(addr)
            self.send(reply)
        elif verb == "DATA":
            if self.mail_from is None or not self.rcpts:
                self.send("503 5.5.1 need MAIL and RCPT")
                return
            reply = self.sink.reply_for("DATA", "354 End data with <CR><LF>.<CR><LF>")
            if reply is not None and reply.startswith("354"):
                self.in_data = True
            self.send(reply)
        elif verb == "RSET":
            self.reset()
            self.send("250 2.0.0 Ok")
        elif verb == "NOOP":
            self.send("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.send("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.send("500 5.5.2 unknown command")

    def auth_start(self, arg: str) -> None:
        parts = arg.split()
        mech = parts[0].upper() if parts else ""
        if self.sink.auth is None or mech not in self.sink.auth_mechanisms:
            self.send("504 5.5.4 mechanism not supported")
            return
        if mech == "PLAIN":
            if len(parts) > 1:
                self.check_plain(parts[1])
            else:
                self.auth_state = "plain"
                self.send("334 ")
        else:
            self.auth_state = "login-user"
            self.send("334 VXNlcm5hbWU6")

    def auth_continue(self, text: str) -> None:
        state, self.auth_state = self.auth_state, None
        if text == "*":
            self.send("501 5.7.0 cancelled")
        elif state == "plain":
            self.check_plain(text)
        elif state == "login-user":
            self.login_user = base64.b64decode(text).decode()
            self.auth_state = "login-pass"
            self.send("334 UGFzc3dvcmQ6")
        else:
            self.finish_auth(self.login_user, base64.b64decode(text).decode())

    def check_plain(self, token: str) -> None:
        _authz, user, password = base64.b64decode(token).decode().split("\0")
        self.finish_auth(user, password)

    def finish_auth(self, user: str, password: str) -> None:
        assert self.sink.auth is not None
        if self.sink.auth.get(user) == password:
            self.auth_user = user
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 bad credentials")


class _SinkFactory(protocol.ServerFactory):
    implicit = False

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> _SinkProtocol:
        proto = _SinkProtocol(self.sink)
        proto.tls = self.implicit
        return proto


async def start_smtp_sink(reactor: Any, *, implicit_tls: Any = None, **settings: Any) -> SmtpSink:
    """Listen on 127.0.0.1 on a random port; ``settings`` are :class:`SmtpSink` fields.

    ``implicit_tls``: server TLS options to speak TLS from the first byte (port-465 style).
    """
    sink = SmtpSink(**settings)
    factory = _SinkFactory(sink)
    if implicit_tls is not None:
        factory.implicit = True
        sink._listener = reactor.listenSSL(0, factory, implicit_tls, interface="127.0.0.1")
    else:
        sink._listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
    sink.port = sink._listener.getHost().port
    return sink


def self_signed_tls(hostname: str = "localhost") -> Any:
    """Server TLS options with a fresh self-signed certificate for ``hostname``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)
    return ssl.PrivateCertificate.loadPEM(pem).options()
