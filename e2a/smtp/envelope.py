"""Envelope rules (mail.md §1.4): pure parsing of MAIL FROM / RCPT TO arguments.

Kept apart from the protocol so every rule is a table test. The parsers raise one exception
class per reply the server sends; the server owns the mapping to reply codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from e2a.abort import AbortSignal


class EnvelopeError(ValueError):
    """Base for envelope refusals."""


class PathSyntaxError(EnvelopeError):
    """Malformed path, non-ASCII, or a length limit exceeded (MAIL → 501 5.1.7, RCPT → 501 5.1.3)."""


class UnknownParameter(EnvelopeError):
    """An ESMTP parameter we do not implement (555 5.5.4)."""


class ParameterSyntaxError(EnvelopeError):
    """A known parameter with a malformed or duplicated value (MAIL: 501 5.1.7, mail.md §1.6)."""


class RecipientRefused(EnvelopeError):
    """A syntactically valid forward-path that can never be an agent (550 5.1.1, no lookup)."""


@dataclass(frozen=True)
class Envelope:
    """What the receive layer hands to ``accept`` together with the raw content.

    ``recipients`` are canonical agent addresses in RCPT order, deduplicated; ``mail_from`` is
    ``''`` for the null reverse-path. Trace data (received time, message ids) is the accept
    function's business.
    """

    client_ip: str
    helo: str
    helo_kind: str  # 'EHLO' | 'HELO'
    tls: bool
    mail_from: str
    recipients: tuple[str, ...] = field(default_factory=tuple)
    # Set by the session for content its DATA scanner let through: every line ends with CRLF
    # and no CR or LF stands alone (mail.md §1.5), so DKIM need not count them again.
    crlf_only: bool = False
    # Set by the session when ``store_timeout`` expires (e2a.abort): accept stops and reports
    # its real outcome instead of being cancelled mid-commit.
    abort: AbortSignal = field(default_factory=AbortSignal, compare=False, repr=False)


@dataclass(frozen=True)
class MailFrom:
    address: str  # '' for the null path; source route dropped
    size: int | None = None  # declared SIZE=, if any
    body: str | None = None  # '7BIT' | '8BITMIME', if declared


MAX_PATH = 256  # octets including the angle brackets (RFC 5321 §4.5.3.1.3)
MAX_LOCAL = 64
MAX_DOMAIN = 255

_MAIL_PREFIX = re.compile(r"FROM:[ ]*", re.I)
_RCPT_PREFIX = re.compile(r"TO:[ ]*", re.I)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
_ROUTE = re.compile(rf"@{_DOMAIN.pattern}(?:,@{_DOMAIN.pattern})*:")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")


def _split_path(text: str) -> tuple[str, str]:
    """Split ``<path> params`` into the inside of the brackets and the parameter text.

    Quotes are honoured so a quoted local part may contain ``>`` or spaces.
    """
    if not text.startswith("<"):
        raise PathSyntaxError("path must be enclosed in <>")
    i, n, quoted = 1, len(text), False
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            inner, rest = text[1:i], text[i + 1 :]
            if rest and not rest.startswith(" "):
                raise PathSyntaxError("garbage after path")
            return inner, rest.strip(" ")
        i += 1
    raise PathSyntaxError("unterminated path")


def _check_mailbox(mailbox: str) -> tuple[str, str]:
    """Validate ``local@domain`` strictly (RFC 5321 Mailbox); returns (local, domain)."""
    if mailbox.startswith('"'):
        m = _QUOTED.match(mailbox)
    else:
        m = _DOT_STRING.match(mailbox)
    if m is None or mailbox[m.end() : m.end() + 1] != "@":
        raise PathSyntaxError("bad local part")
    local, domain = mailbox[: m.end()], mailbox[m.end() + 1 :]
    if not (_DOMAIN.fullmatch(domain) or _ADDRESS_LITERAL.fullmatch(domain)):
        raise PathSyntaxError("bad domain")
    if len(local) > MAX_LOCAL or len(domain) > MAX_DOMAIN:
        raise PathSyntaxError("local part or domain too long")
    return local, domain


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split():
        m = _PARAM.fullmatch(token)
        if m is None:
            raise ParameterSyntaxError(f"bad parameter {token!r}")
        key = m.group(1).upper()
        if key in params:
            raise ParameterSyntaxError(f"duplicate parameter {key}")
        params[key] = m.group(2)
    return params


def parse_mail_from(arg: str) -> MailFrom:
    """Parse the text after ``MAIL `` (``FROM:<path> [SIZE=n] [BODY=…]``)."""
    if not arg.isascii():
        raise PathSyntaxError("non-ASCII")
    m = _MAIL_PREFIX.match(arg)
    if m is None:
        raise PathSyntaxError("expected FROM:<address>")
    inner, rest = _split_path(arg[m.end() :])
    if len(inner) + 2 > MAX_PATH:
        raise PathSyntaxError("path too long")
    address = ""
    if inner:
        route = _ROUTE.match(inner)
        mailbox = inner[route.end() :] if route else inner
        local, domain = _check_mailbox(mailbox)
        address = f"{local}@{domain}"
    params = _parse_params(rest)
    size: int | None = None
    body: str | None = None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise ParameterSyntaxError("bad SIZE value")
            size = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise ParameterSyntaxError("bad BODY value")
            body = value.upper()
        else:
            raise UnknownParameter(key)
    return MailFrom(address=address, size=size, body=body)


def parse_rcpt_to(arg: str) -> str:
    """Parse the text after ``RCPT `` and return the address to look up (domain lowercased).

    Forms that can never name an agent are refused here, without a lookup: quoted local part,
    ``%``, ``!``, a second ``@``, IP-literal domain, trailing dot, any source route, a bare
    ``postmaster``.
    """
    if not arg.isascii():
        raise PathSyntaxError("non-ASCII")
    m = _RCPT_PREFIX.match(arg)
    if m is None:
        raise PathSyntaxError("expected TO:<address>")
    inner, rest = _split_path(arg[m.end() :])
    if rest:
        raise UnknownParameter(rest.split()[0])
    if not inner:
        raise PathSyntaxError("empty forward-path")
    if len(inner) + 2 > MAX_PATH:
        raise PathSyntaxError("path too long")
    if inner.startswith("@"):
        raise RecipientRefused("source route")
    if inner.startswith('"'):
        raise RecipientRefused("quoted local part")
    if "@" not in inner:
        if inner.lower() == "postmaster":
            raise RecipientRefused("bare postmaster")
        raise PathSyntaxError("address without domain")
    if inner.count("@") > 1:
        raise RecipientRefused("extra @")
    local, domain = inner.split("@")
    if "%" in local or "!" in local:
        raise RecipientRefused("relay syntax in local part")
    if domain.startswith("["):
        raise RecipientRefused("IP-literal domain")
    if domain.endswith("."):
        raise RecipientRefused("trailing dot")
    local, domain = _check_mailbox(inner)
    return f"{local}@{domain.lower()}"


def recipient_key(address: str) -> str:
    """Case-insensitive identity of a looked-up address, for the duplicate check at the cap."""
    return address.lower()
