"""Addresses (api.md §0.11): agent addresses, recipients, and the agent key (pure).

:func:`agent_key` is the ONE key an address is matched to an agent by
(``lower(agents.id)``): SMTP RCPT TO and the API's ``{email}`` paths and ``from`` values all
go through it, so a U-label, an upper-case domain or a trailing dot finds the same agent
everywhere.
"""

from __future__ import annotations

import re

from e2a.errors import BadRequest
from e2a.mailsyntax.domains import domain_problem
from e2a.mailsyntax.text import has_control_chars

__all__ = [
    "MAX_ADDRESS_OCTETS",
    "MAX_LOCAL_OCTETS",
    "agent_key",
    "lookup_key",
    "normalise_agent_address",
    "parse_recipient",
    "split_recipient_text",
]

MAX_LOCAL_OCTETS = 64
MAX_ADDRESS_OCTETS = 254

# RFC 5322 atext: ASCII letters, digits and these specials (api.md §0.11).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
DOT_ATOM_RE = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
# A quoted local part: qtext (printable ASCII except \ and ") or quoted-pairs, and spaces.
QUOTED_LOCAL_RE = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')


def agent_key(address: str) -> str | None:
    """The key an address is matched to an agent by: ``local@domain`` lowercased, the domain as
    IDNA A-labels with one trailing dot dropped (:func:`~e2a.mailsyntax.domains.domain_problem`).

    None when the address has no ``@``, an empty local part, or a domain that is no valid
    name: such an address cannot be any agent's (agents are stored normalised).
    """
    local, sep, domain_raw = address.rpartition("@")
    if not sep or not local:
        return None
    domain, _problem = domain_problem(domain_raw)
    if domain is None:
        return None
    return f"{local}@{domain}".lower()


def lookup_key(raw: str) -> str | None:
    """An address typed by a caller (an API path's ``{email}``, a ``from`` value) → the key to
    look its agent up by: :func:`agent_key`, or the text lowercased as given when it does not
    parse (it then simply finds nothing). None when it holds a control character or a lone
    surrogate: no agent address does, and a NUL must never reach SQL (the driver refuses it).
    """
    if has_control_chars(raw) or any("\ud800" <= ch <= "\udfff" for ch in raw):
        return None
    key = agent_key(raw)
    return raw.lower() if key is None else key


def normalise_agent_address(raw: str) -> tuple[str, str]:
    """An agent address per api.md §0.11 → (address as stored, domain).

    The local part is kept as given (dot-atom, ≤ 64 octets); the domain is normalised; the
    whole address is at most 254 octets.

    Raises:
        BadRequest: 400 ``invalid_email``.
    """

    def bad(reason: str) -> BadRequest:
        return BadRequest(f"invalid agent address: {reason}", code="invalid_email")

    if raw.count("@") != 1:
        raise bad("expected local@domain")
    local, _, domain_raw = raw.partition("@")
    if not local:
        raise bad("empty local part")
    if not local.isascii() or not DOT_ATOM_RE.fullmatch(local):
        raise bad("local part must be a dot-atom of ASCII letters, digits and !#$%&'*+-/=?^_`{|}~")
    if len(local) > MAX_LOCAL_OCTETS:
        raise bad(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    domain, problem = domain_problem(domain_raw)
    if domain is None:
        raise bad(problem)
    address = f"{local}@{domain}"
    if len(address) > MAX_ADDRESS_OCTETS:
        raise bad(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return address, domain


def _split_angle(text: str) -> tuple[str, str]:
    """(display part, address part) of ``Name <addr>`` / ``addr``; raises ValueError."""
    in_quote = False
    escaped = False
    lt = -1
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
            continue
        if ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == "<" and not in_quote:
            if lt >= 0:
                raise ValueError("more than one '<'")
            lt = i
        elif ch in ":;" and not in_quote and lt < 0:
            raise ValueError("group syntax is not supported")
    if in_quote:
        raise ValueError("unterminated quoted string")
    if lt < 0:
        return "", text
    if not text.endswith(">"):
        raise ValueError("text after '>'")
    inner = text[lt + 1 : -1]
    if "<" in inner or ">" in inner:
        raise ValueError("nested angle brackets")
    return text[:lt].strip(), inner.strip()


def _split_addr_spec(spec: str) -> tuple[str, str]:
    """(local, domain) of an addr-spec whose local part may be quoted; raises ValueError."""
    if spec.startswith('"'):
        end = 1
        while end < len(spec):
            ch = spec[end]
            if ch == "\\":
                end += 2
                continue
            if ch == '"':
                break
            end += 1
        else:
            raise ValueError("unterminated quoted local part")
        local, rest = spec[: end + 1], spec[end + 1 :]
        if not rest.startswith("@"):
            raise ValueError("expected '@' after the quoted local part")
        return local, rest[1:]
    if spec.count("@") != 1:
        raise ValueError("expected local@domain")
    local, _, domain = spec.partition("@")
    return local, domain


def parse_recipient(raw: str, field: str = "address") -> str | None:
    """A recipient per api.md §0.11 → the bare address, lowercased; ``None`` when blank.

    Accepts ``addr`` or ``Display Name <addr>`` (the display name is dropped). The local part
    may be a dot-atom or a quoted string; no source routes (``<@a:b@c>``), no group syntax,
    no domain literals, no non-ASCII address.

    Raises:
        BadRequest: ``invalid_header_value`` for control characters (they would reach a mail
            header), else ``invalid_address``.
    """
    if has_control_chars(raw):
        raise BadRequest(f"{field} contains a control character", code="invalid_header_value")
    text = raw.strip()
    if not text:
        return None

    def bad(reason: str) -> BadRequest:
        return BadRequest(f"invalid {field} {text!r}: {reason}", code="invalid_address")

    try:
        _display, spec = _split_angle(text)
        if spec.startswith("@"):
            raise ValueError("source routes are not supported")
        if not spec.isascii():
            raise ValueError("non-ASCII addresses are not supported")
        local, domain_raw = _split_addr_spec(spec)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if not local:
        raise bad("empty local part")
    if not (DOT_ATOM_RE.fullmatch(local) or QUOTED_LOCAL_RE.fullmatch(local)):
        raise bad("local part is not a dot-atom or quoted string")
    if len(local) > MAX_LOCAL_OCTETS:
        raise bad(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    if domain_raw.startswith("["):
        raise bad("domain literals are not supported")
    domain, problem = domain_problem(domain_raw)
    if domain is None:
        raise bad(problem)
    address = f"{local}@{domain}".lower()
    if len(address) > MAX_ADDRESS_OCTETS:
        raise bad(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return address


def split_recipient_text(text: str) -> list[str]:
    """The entries of a recipient list typed as one text (the console's To/Cc/Bcc and
    reviewer fields): split at new lines and at commas outside a quoted display name or an
    ``<…>``, so ``"Doe, Jane" <jane@example.com>`` stays one entry. Only splits: each entry
    still goes through :func:`parse_recipient`, the API's one address rule. A line never
    continues on the next, so one malformed line cannot swallow the rest."""
    out: list[str] = []
    for line in text.splitlines():
        current: list[str] = []
        in_quote = escaped = angle = False
        for ch in line:
            if escaped:
                escaped = False
            elif in_quote:
                if ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_quote = False
            elif ch == '"':
                in_quote = True
            elif ch == "<":
                angle = True
            elif ch == ">":
                angle = False
            elif ch == "," and not angle:
                out.append("".join(current))
                current = []
                continue
            current.append(ch)
        out.append("".join(current))
    return [entry.strip() for entry in out if entry.strip()]
