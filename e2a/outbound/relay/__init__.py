"""SMTP out: the upstream relay or direct MX delivery, one transaction per message (mail.md §7.6, §7.7).

Why our own client protocol: twisted.mail's ``SMTPClient`` sends the body through
``transformChunk``, which rewrites ``\\n`` to ``\\r\\n`` (so CRLF input turns into ``\\r\\r\\n``,
a bare CR on the wire) and dot-stuffs each 16 KiB chunk on its own, so a ``.`` line that
straddles a chunk boundary goes out unstuffed and ends DATA early — an agent-written body could
then smuggle SMTP commands from e2a's IP address. We keep twisted.mail's reply parser
(:class:`twisted.mail.smtp.SMTPClient` ``lineReceived``: multi-line replies, code checks) and its
address quoting, but drive the session ourselves as one linear coroutine and send DATA as the
exact bytes of :func:`e2a.outbound.compose.smtp_data_bytes` (normalised and stuffed once, over the
whole message).

Everything that is a rule is a small pure function at the top of this module (provider id
parsing, reply → recipient status, retry/deadline math, MX ordering) and table-tested without a
reactor. Timeouts run on the injected clock: connect 30 s, greeting and each command 300 s,
final dot 600 s.

The package follows the old sections of this module, and every name stays importable from
``e2a.outbound.relay``: :mod:`~e2a.outbound.relay.rules` (pure rules, timeouts),
:mod:`~e2a.outbound.relay.routeconfig`, :mod:`~e2a.outbound.relay.tls`,
:mod:`~e2a.outbound.relay.protocol` (the client protocol), :mod:`~e2a.outbound.relay.session`
(one session with one host) and :mod:`~e2a.outbound.relay.sender` (:class:`Relay`, :func:`deliver`).
"""

from __future__ import annotations

from e2a.outbound.relay.protocol import (
    _ClientProtocol as _ClientProtocol,
)
from e2a.outbound.relay.routeconfig import (
    RouteConfig,
)
from e2a.outbound.relay.rules import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    DATA_TIMEOUT,
    MAX_REPLY_BYTES,
    MAX_REPLY_CHARS,
    MAX_REPLY_LINES,
    MAX_UNSOLICITED_REPLIES,
    QUIT_TIMEOUT,
    RecipientOutcome,
    RecipientStatus,
    SmtpReply,
    is_null_mx,
    next_attempt_at,
    order_mx,
    parse_provider_message_id,
    status_for_code,
)
from e2a.outbound.relay.sender import (
    Relay,
    deliver,
)
from e2a.outbound.relay.session import (
    BeforeData,
)

__all__ = [
    "BeforeData",
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DATA_TIMEOUT",
    "MAX_REPLY_BYTES",
    "MAX_REPLY_CHARS",
    "MAX_REPLY_LINES",
    "MAX_UNSOLICITED_REPLIES",
    "QUIT_TIMEOUT",
    "RecipientOutcome",
    "RecipientStatus",
    "Relay",
    "RouteConfig",
    "SmtpReply",
    "deliver",
    "is_null_mx",
    "next_attempt_at",
    "order_mx",
    "parse_provider_message_id",
    "status_for_code",
]
