"""Inbound SMTP receive layer (mail.md §1): an ESMTP subclass and its factory.

twisted.mail's ESMTP gives us the protocol skeleton, but its stock input handling has holes the
spec forbids (bare LF accepted as a line end in practice, over-long DATA lines drop back to
command mode and execute the rest of the body, any eomReceived failure answers 550, no SIZE,
the idle timer is reset per DATA line, pipelined commands race async lookups, buffered bytes
survive STARTTLS). So this subclass replaces the byte-level input path entirely:

* :meth:`SmtpSession.dataReceived` keeps one bounded input buffer and a strict, one-command-
  at-a-time pump. While a reply depends on an async call (recipient lookup, storage) the
  transport is paused and nothing further is parsed, so replies leave in command order and
  bytes after an accepted ``DATA`` are only ever content.
* DATA content goes through :class:`e2a.smtp.dataparser.DataScanner` (raw bytes, no per-line
  Python work, memory bounded); only ``<CRLF>.<CRLF>`` ends it.
* Every reply comes from the table of ``R_*`` constants and the small mapping functions below.
  Storage failures are never 5xx.

Authentication and storage live behind two injected async callables (:data:`RecipientLookup`,
:data:`AcceptFn`); timers run on the injected clock.

The code lives in three modules along the old sections of this file, and this module keeps
every name importable from here: :mod:`e2a.smtp.replies` (the reply table),
:mod:`e2a.smtp.session` (:class:`SmtpSession`) and :mod:`e2a.smtp.factory`
(:class:`SmtpFactory`, :func:`load_tls_options`, :func:`connection_key`).
"""

from __future__ import annotations

from e2a.smtp.envelope import Envelope
from e2a.smtp.factory import SmtpFactory, connection_key, load_tls_options
from e2a.smtp.replies import (
    R_BAD_HEADER,
    R_BAD_LINE_ENDING,
    R_BAD_PARAM,
    R_BAD_RCPT,
    R_BAD_SENDER,
    R_BYE,
    R_COMMAND_TOO_LONG,
    R_DATA_GO,
    R_DIRTY_COMMAND,
    R_FLOOD,
    R_HEADER_TOO_BIG,
    R_HELP,
    R_LINE_TOO_LONG,
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
    R_TOO_MANY_CONNECTIONS,
    R_TOO_MANY_ERRORS,
    R_TOO_MANY_MESSAGES,
    R_TOO_MANY_RCPT,
    R_TRANSIENT,
    R_UNKNOWN_COMMAND,
    R_UNKNOWN_PARAM,
    R_VRFY,
    MessageRejected,
    Reply,
    envelope_error_reply,
    failure_reply,
    queued_reply,
    verdict_reply,
)
from e2a.smtp.session import (
    ABORT_GRACE,
    CLOSE_GRACE,
    COMMAND_FLOOD_LIMIT,
    AcceptFn,
    RecipientLookup,
    SmtpSession,
)

__all__ = [
    "MessageRejected",
    "Reply",
    "envelope_error_reply",
    "failure_reply",
    "queued_reply",
    "verdict_reply",
    "ABORT_GRACE",
    "AcceptFn",
    "CLOSE_GRACE",
    "COMMAND_FLOOD_LIMIT",
    "Envelope",
    "R_BAD_HEADER",
    "R_BAD_LINE_ENDING",
    "R_BAD_PARAM",
    "R_BAD_RCPT",
    "R_BAD_SENDER",
    "R_BYE",
    "R_COMMAND_TOO_LONG",
    "R_DATA_GO",
    "R_DIRTY_COMMAND",
    "R_FLOOD",
    "R_HEADER_TOO_BIG",
    "R_HELP",
    "R_LINE_TOO_LONG",
    "R_MAIL_OK",
    "R_NEED_ARG",
    "R_NOT_IMPLEMENTED",
    "R_NO_ARG",
    "R_NO_RCPT",
    "R_NO_VALID_RCPT",
    "R_OK",
    "R_PIPELINE_AFTER_REFUSED_DATA",
    "R_RCPT_OK",
    "R_SEQUENCE",
    "R_SHUTDOWN",
    "R_TIMEOUT",
    "R_TLS_GO",
    "R_TOO_BIG",
    "R_TOO_MANY_CONNECTIONS",
    "R_TOO_MANY_ERRORS",
    "R_TOO_MANY_MESSAGES",
    "R_TOO_MANY_RCPT",
    "R_TRANSIENT",
    "R_UNKNOWN_COMMAND",
    "R_UNKNOWN_PARAM",
    "R_VRFY",
    "RecipientLookup",
    "SmtpFactory",
    "SmtpSession",
    "connection_key",
    "load_tls_options",
]
