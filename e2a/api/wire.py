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

from e2a.errors import BadRequest, NotFound
from e2a.mailsyntax.addresses import (
    lookup_key,
    normalise_agent_address,
    parse_recipient,
    split_recipient_text,
)
from e2a.mailsyntax.domains import domain_problem as _domain_problem
from e2a.mailsyntax.text import check_header_text, has_control_chars
from e2a.store.models import ApiKey, Delivery, SigningSecret
from e2a.timefmt import ts_frac as format_ts_frac
from e2a.timefmt import ts_sec

__all__ = [
    "AGENT_MODES",
    "HITL_ACTIONS",
    "HITL_TTL_MAX",
    "MAX_NAME_CHARS",
    "MAX_REVIEWERS",
    "RESERVED_SLUGS",
    "agent_json",
    "api_key_json",
    "check_agent_name",
    "check_header_text",
    "check_slug",
    "decode_cursor",
    "delivery_json",
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
    "signing_secret_json",
    "slug_error",
    "split_recipient_text",
]

# ---------------------------------------------------------------------------- constants

AGENT_MODES = ("cloud", "local")
HITL_ACTIONS = ("approve", "reject")
HITL_TTL_MAX = 604800
MAX_NAME_CHARS = 200
MAX_REVIEWERS = 10
MAX_CURSOR_CHARS = 512

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$")
RESERVED_SLUGS = frozenset(
    {
        "admin", "postmaster", "abuse", "noreply", "no-reply", "mailer-daemon", "info", "help",
        "demo", "test", "www", "mail", "agent", "api", "system", "root",
    }
)


# ---------------------------------------------------------------------------- text rules


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


def path_agent_key(raw: str) -> str:
    """``{email}`` of a path → the lowercase key matched against ``lower(agents.id)``.

    The path is already percent-decoded once by twisted.web (``%40`` → ``@``). The key is
    :func:`e2a.mailsyntax.addresses.lookup_key`'s (the one agent-key rule, shared with SMTP):
    a U-label path finds the A-label agent; anything unparsable is compared as given (and
    simply finds nothing).
    """
    key = lookup_key(raw)
    if key is None:
        # No agent address holds a control character, and a NUL must never reach SQL (the
        # driver refuses it, which would be a 500): "no such agent", like any other miss.
        raise NotFound("agent not found", code="agent_not_found")
    return key


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


def api_key_json(key: ApiKey) -> dict[str, Any]:
    """§11.2 list item: ts-frac times, ``last_used_at`` omitted until used."""
    out: dict[str, Any] = {
        "id": key.id,
        "name": key.name,
        "key_prefix": key.key_prefix,
        "scope": key.scope,
        "agent": key.agent_id if key.scope == "agent" else None,
        "created_at": format_ts_frac(key.created_at),
    }
    if key.last_used_at is not None:
        out["last_used_at"] = format_ts_frac(key.last_used_at)
    return out


def signing_secret_json(secret: SigningSecret) -> dict[str, Any]:
    """§10.1 list item: ts-sec times, never the secret value."""
    out: dict[str, Any] = {
        "id": secret.id,
        "name": secret.name,
        "secret_prefix": secret.secret_prefix,
        "created_at": ts_sec(secret.created_at),
    }
    if secret.last_signed_at is not None:
        out["last_signed_at"] = ts_sec(secret.last_signed_at)
    return out


def delivery_json(d: Delivery, *, next_attempt_always: bool = False) -> dict[str, Any]:
    """The Delivery object of api.md §2.7 (unset times and a missing status code omitted).

    ``next_attempt_always``: the export shows ``next_attempt_at`` whatever the status (a
    record of the row), where the API shows it only while the delivery is pending."""
    out: dict[str, Any] = {
        "id": d.id,
        "message_id": d.message_id,
        "agent_id": d.agent_id,
        "webhook_url": d.webhook_url,
        "status": d.status,
        "attempts": d.attempts,
    }
    if d.last_status_code is not None:
        out["last_status_code"] = d.last_status_code
    out["last_error"] = d.last_error
    out["created_at"] = format_ts_frac(d.created_at)
    if d.last_attempt_at is not None:
        out["last_attempt_at"] = format_ts_frac(d.last_attempt_at)
    if d.next_attempt_at is not None and (d.status == "pending" or next_attempt_always):
        out["next_attempt_at"] = format_ts_frac(d.next_attempt_at)
    if d.delivered_at is not None:
        out["delivered_at"] = format_ts_frac(d.delivered_at)
    return out


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
