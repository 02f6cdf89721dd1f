"""The mail-flow log lines: one event per accepted or refused message, per webhook attempt and per
outbound recipient outcome, plus the start-up block (docs/logging.md).

Why one module: the events are emitted from the SMTP layer, the inbound pipeline and two workers,
and an operator greps them (text) or queries them (JSON) as one family. Each helper emits exactly
one event in the ``e2a.mail`` namespace whose structured fields are the documented keys (they
become the keys of a ``logging.format: json`` line) and whose text rendering is a single line.

What never goes in: message bodies, raw messages, header values other than the verdict, API keys,
signing secrets, magic-link tokens, passwords. The helpers take only the fields they log, so a
caller cannot hand them a body by accident; :func:`redact_dsn` and :func:`redact_text` clean the
two free-form values that could carry a secret (a database URL, an error text).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.logger import Logger

__all__ = [
    "EVENT_ACCEPTED",
    "EVENT_OUTBOUND",
    "EVENT_REFUSED",
    "EVENT_STARTED",
    "EVENT_WEBHOOK",
    "accepted",
    "domain_of",
    "outbound_recipient",
    "redact_dsn",
    "redact_text",
    "refused",
    "verdict_parts",
    "started",
    "webhook_attempt",
]

log = Logger(namespace="e2a.mail")

EVENT_ACCEPTED = "mail.accepted"
EVENT_REFUSED = "mail.refused"
EVENT_WEBHOOK = "webhook.attempt"
EVENT_OUTBOUND = "outbound.recipient"
EVENT_STARTED = "e2a.started"

# key=value secrets in free text (libpq DSNs, query strings, "Bearer …", e2a API keys).
_SECRET_PATTERNS = (
    (re.compile(r"(?i)\b(password|passwd|pwd|token|secret|key)=([^\s&;'\"]+)"), r"\1=***"),
    (re.compile(r"(?i)\bbearer\s+[^\s,;]+"), "Bearer ***"),
    (re.compile(r"\be2a_[0-9a-f]{16,}\b"), "e2a_***"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), "whsec_***"),
)


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_text(text: str) -> str:
    """``text`` with ``password=…``/``token=…``-style values, bearer tokens and e2a keys as ``***``."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_dsn(dsn: str) -> str:
    """A database URL or libpq DSN without its password (``postgresql://u:***@host/db``)."""
    if not dsn:
        return ""
    if not _URL_SCHEME.match(dsn):
        return redact_text(dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, redact_text(parts.query), ""))


def domain_of(address: str) -> str:
    """The domain of a MAIL FROM address, lowercased; ``<>`` for the null reverse-path."""
    if not address:
        return "<>"
    return address.rpartition("@")[2].lower() or "<>"


def verdict_parts(domain_check: str) -> dict[str, str]:
    """``spf=pass; dkim=none; dmarc=none`` → ``{"spf": "pass", "dkim": "none", "dmarc": "none"}``
    (missing parts are ``none``)."""
    parts = {"spf": "none", "dkim": "none", "dmarc": "none"}
    for item in domain_check.split(";"):
        name, _, value = item.strip().partition("=")
        if name in parts and value:
            parts[name] = value
    return parts


def accepted(
    *,
    message_id: str,
    client_ip: str,
    mail_from: str,
    agents: Sequence[str],
    domain_check: str,
    size: int,
    ms: float,
) -> None:
    """One line per message committed (the 250): ``ms`` is end of DATA → commit;
    ``domain_check`` the signed ``spf=…; dkim=…; dmarc=…`` verdict."""
    v = verdict_parts(domain_check)
    spf, dkim, dmarc = v["spf"], v["dkim"], v["dmarc"]
    log.info(
        "accepted {message_id} from {client_ip} mail_from_domain={mail_from_domain} "
        "agents={agents_text} spf={spf} dkim={dkim} dmarc={dmarc} size={size} ms={ms}",
        event=EVENT_ACCEPTED,
        message_id=message_id,
        client_ip=client_ip,
        mail_from_domain=domain_of(mail_from),
        agents=list(agents),
        agents_text=",".join(agents) or "-",
        spf=spf,
        dkim=dkim,
        dmarc=dmarc,
        size=size,
        ms=round(ms, 1),
    )


def refused(*, code: int, reason: str, client_ip: str, mail_from: str | None = None, size: int | None = None) -> None:
    """One line per message (or recipient) refused with a 4xx/5xx reply: ``reason`` is the
    reply text or the internal cause, never message content."""
    log.info(
        "refused {code} from {client_ip} mail_from_domain={mail_from_domain} size={size_text}: {reason}",
        event=EVENT_REFUSED,
        code=code,
        reason=redact_text(reason),
        client_ip=client_ip,
        mail_from_domain=domain_of(mail_from) if mail_from is not None else "-",
        size=size,
        size_text="-" if size is None else size,
    )


def webhook_attempt(
    *,
    delivery_id: str,
    message_id: str,
    agent: str,
    attempt: int,
    status: int | None,
    outcome: str,
    ms: float,
    next_retry_s: float | None = None,
    error: str = "",
) -> None:
    """One line per webhook POST: ``outcome`` is ``delivered``, ``retry``, ``failed`` or ``disabled``;
    ``next_retry_s`` the delay before the next attempt (``retry`` only)."""
    error = redact_text(error) if error else ""  # once: both fields show the same redacted text
    log.info(
        "webhook {delivery_id} {message_id} to {agent} attempt {attempt}: status={status_text} "
        "{outcome} ms={ms} next_retry={next_retry_text}{error_text}",
        event=EVENT_WEBHOOK,
        delivery_id=delivery_id,
        message_id=message_id,
        agent=agent,
        attempt=attempt,
        status=status,
        status_text="-" if status is None else status,
        outcome=outcome,
        ms=round(ms, 1),
        next_retry_s=None if next_retry_s is None else round(next_retry_s, 1),
        next_retry_text="-" if next_retry_s is None else f"{next_retry_s:.1f}s",
        error=error,
        error_text=f" error={error!r}" if error else "",
    )


def outbound_recipient(
    *, message_id: str, recipient: str, status: str, attempt: int, reply: str, next_attempt_at: Any = None
) -> None:
    """One line per outbound recipient outcome of a relay/direct-MX attempt."""
    log.info(
        "outbound {message_id} to {recipient} attempt {attempt}: {status} next_attempt={next_text} reply={reply!r}",
        event=EVENT_OUTBOUND,
        message_id=message_id,
        recipient=recipient,
        status=status,
        attempt=attempt,
        reply=redact_text(reply),
        next_attempt_at=None if next_attempt_at is None else str(next_attempt_at),
        next_text="-" if next_attempt_at is None else str(next_attempt_at),
    )


def started(
    *,
    config_file: str | None,
    env_keys: Iterable[str],
    env: str,
    data_dir: str,
    database: str,
    http: str,
    smtp: str,
    shared_domain: str,
    smtp_domain: str,
    processes: int,
) -> None:
    """The start-up block: where the configuration came from and what this server serves.
    ``database`` is passed through :func:`redact_dsn` here, whatever the caller did."""
    env_list = sorted(env_keys)
    log.info(
        "e2a started ({env})\n"
        "  config file:   {config_file_text}\n"
        "  environment:   {env_text}\n"
        "  data dir:      {data_dir}\n"
        "  database:      {database}\n"
        "  http:          {http}\n"
        "  smtp:          {smtp} (smtp.domain {smtp_domain})\n"
        "  shared domain: {shared_domain_text}\n"
        "  processes:     {processes}",
        event=EVENT_STARTED,
        env=env,
        config_file=config_file,
        config_file_text=config_file or "(none: defaults and environment)",
        env_keys=env_list,
        env_text=", ".join(env_list) or "(no E2A_* variables)",
        data_dir=data_dir,
        database=redact_dsn(database),
        http=http,
        smtp=smtp,
        smtp_domain=smtp_domain,
        shared_domain=shared_domain,
        shared_domain_text=shared_domain or "(none: slug registration disabled)",
        processes=processes,
    )
