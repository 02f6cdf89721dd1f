"""Wire rules of api.md: validation of request values and the JSON shapes of responses (pure).

Everything here is a small function of its arguments (no database, no reactor, no clock), so
each rule is table-tested in tests/unit/test_wire.py and routes stay thin: parse → call a rule
→ store → serialise.

Error codes follow api.md §0.3: ``invalid_email`` (agent addresses), ``invalid_domain``,
``invalid_slug``, ``invalid_address`` (recipients and reviewers), ``invalid_header_value``
(control characters in header-bound text), ``invalid_field`` (ranges and enums),
``invalid_pagination_token``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any

import idna

from e2a.errors import BadRequest, NotFound
from e2a.timefmt import ts_frac as format_ts_frac

__all__ = [
    "AGENT_MODES",
    "HITL_ACTIONS",
    "HITL_TTL_MAX",
    "MAX_NAME_CHARS",
    "MAX_REVIEWERS",
    "RESERVED_SLUGS",
    "agent_json",
    "check_agent_name",
    "check_header_text",
    "check_slug",
    "decode_cursor",
    "domain_json",
    "dkim_record_value",
    "encode_cursor",
    "format_ts_frac",
    "has_control_chars",
    "normalise_agent_address",
    "normalise_domain",
    "parse_recipient",
    "parse_reviewers",
    "path_agent_key",
    "path_domain",
    "path_id",
    "query_id",
    "slug_error",
]

# ---------------------------------------------------------------------------- constants

AGENT_MODES = ("cloud", "local")
HITL_ACTIONS = ("approve", "reject")
HITL_TTL_MAX = 604800
MAX_NAME_CHARS = 200
MAX_REVIEWERS = 10
MAX_LOCAL_OCTETS = 64
MAX_ADDRESS_OCTETS = 254
MAX_DOMAIN_OCTETS = 253
MIN_LABELS = 2
MAX_LABELS = 127
MAX_CURSOR_CHARS = 512

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$")
RESERVED_SLUGS = frozenset(
    {
        "admin", "postmaster", "abuse", "noreply", "no-reply", "mailer-daemon", "info", "help",
        "demo", "test", "www", "mail", "agent", "api", "system", "root",
    }
)

# RFC 5322 atext: ASCII letters, digits and these specials (api.md §0.11).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_ATOM_RE = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
# A quoted local part: qtext (printable ASCII except \ and ") or quoted-pairs, and spaces.
_QUOTED_LOCAL_RE = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LDH_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# C0 controls and DEL, except TAB (api.md §0.11 header-bound text).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# ---------------------------------------------------------------------------- text rules


def has_control_chars(text: str) -> bool:
    """True when ``text`` holds CR, LF, NUL or any other C0 control or DEL (TAB is fine)."""
    return _CONTROL_RE.search(text) is not None


def check_header_text(field: str, value: str) -> str:
    """Header-bound text rule (api.md §0.11): returns ``value`` or raises 400
    ``invalid_header_value``. Such values end up in mail headers, where a CR/LF would let a
    caller inject headers of their own."""
    if has_control_chars(value):
        raise BadRequest(f"{field} contains a control character", code="invalid_header_value")
    return value


def check_agent_name(value: str) -> str:
    """Agent ``name`` (api.md §4.2): header-bound text, at most 200 characters."""
    check_header_text("name", value)
    if len(value) > MAX_NAME_CHARS:
        raise BadRequest(f"name must be at most {MAX_NAME_CHARS} characters", code="invalid_field")
    return value


# ---------------------------------------------------------------------------- slugs


def slug_error(slug: str) -> str | None:
    """Why ``slug`` breaks the slug rules of api.md §4.2, or ``None`` when it is valid."""
    if not SLUG_RE.fullmatch(slug):
        return "slug must be 2-40 characters of a-z, 0-9 and '-', not starting or ending with '-'"
    if slug in RESERVED_SLUGS:
        return f"slug {slug!r} is reserved"
    return None


def check_slug(slug: str) -> str:
    """Return ``slug`` or raise 400 ``invalid_slug``. No case folding: uppercase is refused."""
    problem = slug_error(slug)
    if problem is not None:
        raise BadRequest(problem, code="invalid_slug")
    return slug


# ---------------------------------------------------------------------------- domains


def _domain_problem(raw: str) -> tuple[str | None, str]:
    """(normalised domain, "") or (None, reason)."""
    if not raw:
        return None, "domain is empty"
    if has_control_chars(raw) or any(c.isspace() for c in raw):
        return None, "domain contains whitespace or control characters"
    try:
        mapped = idna.uts46_remap(raw, std3_rules=True, transitional=False)
    except (idna.IDNAError, UnicodeError) as exc:
        return None, f"domain is not a valid name ({exc})"
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = mapped.split(".")
    if not MIN_LABELS <= len(labels) <= MAX_LABELS:
        return None, f"domain must have {MIN_LABELS} to {MAX_LABELS} labels"
    out = []
    for label in labels:
        if not label:
            return None, "domain has an empty label"
        try:
            alabel = label if label.isascii() else idna.alabel(label).decode("ascii")
            if alabel.startswith("xn--"):
                idna.decode(alabel)  # a broken punycode label is not a name
        except (idna.IDNAError, UnicodeError) as exc:
            return None, f"domain label is not valid IDNA ({exc})"
        if not _LDH_LABEL_RE.fullmatch(alabel):
            return None, "domain labels are 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        out.append(alabel)
    name = ".".join(out)
    if len(name) > MAX_DOMAIN_OCTETS:
        return None, f"domain is longer than {MAX_DOMAIN_OCTETS} octets"
    return name, ""


def normalise_domain(raw: str, *, code: str = "invalid_domain") -> str:
    """api.md §0.11 domain: lowercase, one trailing dot removed, IDNA (UTS 46) A-labels;
    2-127 labels of ``[a-z0-9-]`` (1-63, no leading/trailing ``-``); at most 253 octets.

    Raises:
        BadRequest: with ``code`` (``invalid_domain`` by default).
    """
    name, problem = _domain_problem(raw)
    if name is None:
        raise BadRequest(problem, code=code)
    return name


def path_domain(raw: str) -> str | None:
    """``{domain}`` of a path (api.md §0.6): normalised, or ``None`` when it cannot name any
    domain (the route then answers 404, as for a missing domain)."""
    name, _problem = _domain_problem(raw)
    return name


# ---------------------------------------------------------------------------- addresses


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
    if not local.isascii() or not _DOT_ATOM_RE.fullmatch(local):
        raise bad("local part must be a dot-atom of ASCII letters, digits and !#$%&'*+-/=?^_`{|}~")
    if len(local) > MAX_LOCAL_OCTETS:
        raise bad(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    domain, problem = _domain_problem(domain_raw)
    if domain is None:
        raise bad(problem)
    address = f"{local}@{domain}"
    if len(address) > MAX_ADDRESS_OCTETS:
        raise bad(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return address, domain


def path_agent_key(raw: str) -> str:
    """``{email}`` of a path → the lowercase key matched against ``lower(agents.id)``.

    The path is already percent-decoded once by twisted.web (``%40`` → ``@``). The domain is
    IDNA-normalised when it can be, so a U-label path finds the A-label agent; anything
    unparsable is compared as given (and simply finds nothing).
    """
    if has_control_chars(raw) or any("\ud800" <= ch <= "\udfff" for ch in raw):
        # No agent address holds a control character, and a NUL must never reach SQL (the
        # driver refuses it, which would be a 500): "no such agent", like any other miss.
        raise NotFound("agent not found", code="agent_not_found")
    local, sep, domain_raw = raw.rpartition("@")
    if not sep:
        return raw.lower()
    domain, _problem = _domain_problem(domain_raw)
    return f"{local}@{domain if domain is not None else domain_raw}".lower()


def path_id(raw: str, pattern: re.Pattern[str], code: str, what: str) -> str:
    """A ``msg_``/``apk_``/``wsec_``/``dlv_`` id from a path (api.md §0.4: exact lookups).

    Anything not of the id's exact form cannot name an object, so it is the route's 404 without
    a query — which also keeps NUL and other bytes PostgreSQL refuses out of SQL.
    """
    if pattern.fullmatch(raw) is None:
        raise NotFound(f"{what} not found", code=code)
    return raw


def query_id(raw: str | None, pattern: re.Pattern[str], name: str) -> str | None:
    """An optional id filter from the query string: absent/empty → None, malformed → 400
    ``invalid_field`` (it would match nothing, and NUL must not reach SQL)."""
    if not raw:
        return None
    if pattern.fullmatch(raw) is None:
        raise BadRequest(f"{name} is not a valid id", code="invalid_field")
    return raw


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
    if not (_DOT_ATOM_RE.fullmatch(local) or _QUOTED_LOCAL_RE.fullmatch(local)):
        raise bad("local part is not a dot-atom or quoted string")
    if len(local) > MAX_LOCAL_OCTETS:
        raise bad(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    if domain_raw.startswith("["):
        raise bad("domain literals are not supported")
    domain, problem = _domain_problem(domain_raw)
    if domain is None:
        raise bad(problem)
    address = f"{local}@{domain}".lower()
    if len(address) > MAX_ADDRESS_OCTETS:
        raise bad(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return address


def parse_reviewers(values: list[str]) -> list[str]:
    """``hitl_reviewers`` (api.md §4.4): ≤ 10 addresses, lowercased, deduplicated in order;
    blank strings dropped; ``[]`` means the account email.

    Raises:
        BadRequest: ``invalid_address`` / ``invalid_header_value`` for a bad entry,
            ``invalid_field`` for more than 10.
    """
    out: list[str] = []
    for value in values:
        address = parse_recipient(value, "hitl_reviewers entry")
        if address is not None and address not in out:
            out.append(address)
    if len(out) > MAX_REVIEWERS:
        raise BadRequest(f"hitl_reviewers holds at most {MAX_REVIEWERS} addresses", code="invalid_field")
    return out


# ---------------------------------------------------------------------------- JSON shapes


def agent_json(agent: Any) -> dict[str, Any]:
    """The Agent object of api.md §2.1, exact fields; never ``user_id`` or secrets.

    ``agent`` is an :class:`e2a.store.models.Agent` (any object with its attributes).
    """
    body: dict[str, Any] = {
        "id": agent.id,
        "domain": agent.domain,
        "email": agent.id,
        "name": agent.name,
        "webhook_url": agent.webhook_url,
        "agent_mode": agent.agent_mode,
        "domain_verified": bool(agent.domain_verified),
        "created_at": format_ts_frac(agent.created_at),
        "hitl_enabled": bool(agent.hitl_enabled),
        "hitl_ttl_seconds": int(agent.hitl_ttl_seconds),
        "hitl_expiration_action": agent.hitl_expiration_action,
        "hitl_notify": bool(agent.hitl_notify),
        "hitl_reviewers": list(agent.hitl_reviewers),
        "webhook_status": agent.webhook_status,
    }
    if agent.webhook_status == "disabled" and agent.webhook_disabled_at is not None:
        body["webhook_disabled_at"] = format_ts_frac(agent.webhook_disabled_at)
    return body


def dkim_record_value(public_key_b64: str) -> str:
    """The DKIM TXT value users publish (mail.md §7.5)."""
    return f"v=DKIM1; k=rsa; p={public_key_b64}"


def domain_json(domain: Any, smtp_domain: str) -> dict[str, Any]:
    """The Domain object of api.md §2.8. ``smtp_domain`` is the MX value (``smtp.domain``).

    ``domain`` is an :class:`e2a.store.models.Domain` (any object with its attributes).
    """
    body: dict[str, Any] = {
        "domain": domain.domain,
        "verified": bool(domain.verified),
        "verification_token": domain.verification_token,
        "dns_records": {
            "mx": {"host": "@", "value": smtp_domain, "priority": 10},
            "txt": {"host": "@", "value": domain.verification_token},
            "dkim": {
                "host": f"{domain.dkim_selector}._domainkey",
                "value": dkim_record_value(domain.dkim_public_key),
            },
        },
        "created_at": format_ts_frac(domain.created_at),
    }
    if domain.verified and domain.verified_at is not None:
        body["verified_at"] = format_ts_frac(domain.verified_at)
    return body


# ---------------------------------------------------------------------------- pagination


def _invalid_cursor() -> BadRequest:
    return BadRequest("invalid pagination token", code="invalid_pagination_token")


def encode_cursor(created_at: datetime, row_id: str, filter_value: str, agent_id: str) -> str:
    """The §0.7 recommended cursor: base64url (no padding) of
    ``{"c":<ts-frac>,"i":<id>,"s":<filter>,"a":<agent id>}``; keyset on (created_at, id)."""
    payload = {"c": format_ts_frac(created_at), "i": row_id, "s": filter_value, "a": agent_id}
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(token: str, filter_value: str, agent_id: str) -> tuple[datetime, str]:
    """(created_at, id) of a cursor made by :func:`encode_cursor` for the same filter and
    agent (agent compared case-insensitively).

    Raises:
        BadRequest: 400 ``invalid_pagination_token`` when malformed, too long or bound to
            another filter or agent.
    """
    if not token or len(token) > MAX_CURSOR_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        raise _invalid_cursor()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _invalid_cursor() from None
    if not isinstance(payload, dict) or set(payload) != {"c", "i", "s", "a"}:
        raise _invalid_cursor()
    c, i, s, a = payload["c"], payload["i"], payload["s"], payload["a"]
    if not all(isinstance(v, str) for v in (c, i, s, a)):
        raise _invalid_cursor()
    if s != filter_value or a.lower() != agent_id.lower():
        raise _invalid_cursor()
    m = re.fullmatch(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{6})Z", c)
    if m is None:
        raise _invalid_cursor()
    try:
        created_at = datetime(*(int(g) for g in m.groups()), tzinfo=UTC)  # type: ignore[misc]
    except ValueError:
        raise _invalid_cursor() from None
    return created_at, i
