"""SMTP replies (mail.md §1): the :class:`Reply` table of ``R_*`` constants and the small
functions mapping verdicts, envelope errors and failures to them.

Why a table: every reply the receive layer sends is one of these constants, so the wire text is
reviewable in one place and storage failures can never turn into a 5xx by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.python.failure import Failure

from e2a.smtp.dataparser import DataVerdict
from e2a.smtp.envelope import (
    EnvelopeError,
    ParameterSyntaxError,
    PathSyntaxError,
    RecipientRefused,
    UnknownParameter,
)


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``text`` starts with the RFC 3463 code where one is required."""

    code: int
    text: str

    def __bytes__(self) -> bytes:
        lines = self.text.split("\n")
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n")
        return "".join(out).encode("ascii")

    @property
    def is_error(self) -> bool:
        return 400 <= self.code < 600


class MessageRejected(Exception):
    """An accept function may raise this to send a specific (4xx/5xx) end-of-data reply."""

    def __init__(self, reply: Reply) -> None:
        if not reply.is_error:
            raise ValueError("MessageRejected needs a 4xx/5xx reply")
        super().__init__(reply.text)
        self.reply = reply


R_OK = Reply(250, "2.0.0 Ok")
R_MAIL_OK = Reply(250, "2.1.0 Ok")
R_RCPT_OK = Reply(250, "2.1.5 Ok")
R_DATA_GO = Reply(354, "End data with <CR><LF>.<CR><LF>")
R_VRFY = Reply(252, "2.5.0 Cannot VRFY user, but will accept message for existing agents")
R_HELP = Reply(214, "2.0.0 See RFC 5321")
R_BYE = Reply(221, "2.0.0 Bye")
R_TLS_GO = Reply(220, "2.0.0 Ready to start TLS")
R_BAD_SENDER = Reply(501, "5.1.7 Bad sender address syntax")
R_BAD_RCPT = Reply(501, "5.1.3 Bad recipient address syntax")
R_BAD_PARAM = Reply(501, "5.5.4 Invalid parameter")
R_NEED_ARG = Reply(501, "5.5.4 Syntax error: argument required")
R_NO_ARG = Reply(501, "5.5.4 Syntax error: no arguments allowed")
R_UNKNOWN_PARAM = Reply(555, "5.5.4 Unsupported parameter")
R_NO_RCPT = Reply(550, "5.1.1 recipient not found")
R_TOO_MANY_RCPT = Reply(452, "4.5.3 Too many recipients")
R_SEQUENCE = Reply(503, "5.5.1 Bad sequence of commands")
R_NO_VALID_RCPT = Reply(554, "5.5.1 No valid recipients")
R_NOT_IMPLEMENTED = Reply(502, "5.5.1 Command not implemented")
R_UNKNOWN_COMMAND = Reply(500, "5.5.2 Command not recognized")
R_COMMAND_TOO_LONG = Reply(500, "5.5.2 Line too long")
R_DIRTY_COMMAND = Reply(500, "5.5.2 Invalid characters in command")
R_TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed limit")
R_LINE_TOO_LONG = Reply(552, "5.3.4 Line too long")
R_HEADER_TOO_BIG = Reply(552, "5.3.4 Header section too large")
R_BAD_LINE_ENDING = Reply(550, "5.6.0 Bare CR, bare LF or NUL in message content")
R_BAD_HEADER = Reply(550, "5.6.0 Malformed header section")
R_TRANSIENT = Reply(451, "4.3.0 Temporary failure, try again later")
R_TIMEOUT = Reply(421, "4.4.2 {domain} Timeout, closing connection")
R_TOO_MANY_ERRORS = Reply(421, "4.7.0 {domain} Too many errors, closing connection")
R_TOO_MANY_MESSAGES = Reply(421, "4.7.0 {domain} Too many messages on one connection")
R_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0 {domain} Too many connections, try again later")
R_FLOOD = Reply(421, "4.7.0 {domain} Line too long, closing connection")
R_PIPELINE_AFTER_REFUSED_DATA = Reply(421, "4.5.0 {domain} Input after refused DATA, closing")
R_SHUTDOWN = Reply(421, "4.3.2 {domain} Service shutting down")

_VERDICT_REPLIES: dict[DataVerdict, Reply] = {
    DataVerdict.TOO_LARGE: R_TOO_BIG,
    DataVerdict.LINE_TOO_LONG: R_LINE_TOO_LONG,
    DataVerdict.BAD_LINE_ENDING: R_BAD_LINE_ENDING,
    DataVerdict.HEADER_TOO_LARGE: R_HEADER_TOO_BIG,
    DataVerdict.HEADER_MALFORMED: R_BAD_HEADER,
}

_SAFE_ID = re.compile(r"[\x21-\x7e]{1,200}")


def verdict_reply(verdict: DataVerdict) -> Reply:
    """The end-of-data refusal for a scanner verdict (mail.md §1.5 items 1–5)."""
    return _VERDICT_REPLIES[verdict]


def queued_reply(msg_id: str) -> Reply:
    """``250 2.0.0 Ok: queued as <id>``; an id that could break the reply line is a bug → 451."""
    if not isinstance(msg_id, str) or not _SAFE_ID.fullmatch(msg_id):
        raise ValueError(f"unusable message id {msg_id!r}")
    return Reply(250, f"2.0.0 Ok: queued as {msg_id}")


def envelope_error_reply(error: EnvelopeError, *, command: str) -> Reply:
    """Map an envelope parse error to its reply; ``command`` is ``'MAIL'`` or ``'RCPT'``."""
    if isinstance(error, UnknownParameter):
        return R_UNKNOWN_PARAM
    if isinstance(error, ParameterSyntaxError):
        # mail.md §1.4/§1.6 name one reply for a MAIL syntax error, parameters included.
        return R_BAD_SENDER if command == "MAIL" else R_BAD_PARAM
    if isinstance(error, RecipientRefused):
        return R_NO_RCPT
    if isinstance(error, PathSyntaxError):
        return R_BAD_SENDER if command == "MAIL" else R_BAD_RCPT
    raise TypeError(error)  # pragma: no cover


def failure_reply(failure: Failure) -> Reply:
    """Reply for a failed lookup/accept: only an explicit MessageRejected may be permanent."""
    if failure.check(MessageRejected):
        return failure.value.reply
    return R_TRANSIENT
