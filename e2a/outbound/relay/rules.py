"""Pure rules of outbound SMTP (mail.md §7.6, §7.7): reply code → recipient status, provider id
parsing, retry and deadline math, MX ordering; the timeouts and reply caps. Table-tested without a
reactor (tests/unit/test_relay_rules.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from e2a.policy import backoff

CONNECT_TIMEOUT = 30.0
COMMAND_TIMEOUT = 300.0
DATA_TIMEOUT = 600.0
QUIT_TIMEOUT = 10.0  # QUIT's answer changes nothing; do not hold the outcome for it
MAX_REPLY_CHARS = 512
#: Caps on what a hostile or broken server can make us hold in memory (twisted.mail collects a
#: multi-line reply's lines without limit): lines and bytes of one reply, and complete replies
#: nobody asked for yet (we never pipeline, so more than the greeting plus a stray one is a
#: misbehaving server). Exceeding any of them drops the connection.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
MAX_UNSOLICITED_REPLIES = 4

RecipientStatus = Literal["sent", "deferred", "failed"]


@dataclass(frozen=True)
class SmtpReply:
    code: int
    text: str  # the reply's lines after "NNN-"/"NNN ", joined by "\n"

    def line(self) -> str:
        """One line for ``last_reply``: ``"<code> <text>"``, multi-line text joined by spaces."""
        text = " ".join(part.strip() for part in self.text.splitlines() if part.strip())
        return _clip(f"{self.code} {text}".strip())


@dataclass(frozen=True)
class RecipientOutcome:
    """What one attempt did for one recipient. ``reply`` is the ``last_reply`` line."""

    status: RecipientStatus
    reply: str
    provider_message_id: str = ""
    #: The message data was (at least partly) written but no final reply was read: the far
    #: end may have the message, so a retry can be a duplicate.
    in_doubt: bool = False


def _clip(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= MAX_REPLY_CHARS else text[: MAX_REPLY_CHARS - 3] + "..."


def status_for_code(code: int) -> RecipientStatus | None:
    """mail.md §7.7: 2xx → sent (after the final dot; an accepted step otherwise), 4xx →
    deferred, 5xx → failed. Anything else (1xx, 3xx where not expected, garbage) is a protocol
    error and treated like a temporary failure; ``None`` means "2xx: go on"."""
    if 200 <= code <= 299:
        return None
    if 500 <= code <= 599:
        return "failed"
    return "deferred"


_ANGLE_TOKEN = re.compile(r"<([^<>\s]+)>")
_QUEUED_AS = re.compile(r"queued as\s+(\S+)", re.IGNORECASE)
_OK_TOKEN = re.compile(r"^ok\s+(\S+)\s*$", re.IGNORECASE)


def parse_provider_message_id(text: str) -> str:
    """The provider's id from the final 250 text (mail.md §7.7), ``""`` when there is none.

    Rules in order: the first ``<…>`` token (kept with its brackets, as providers such as SES and
    Postmark use it as a Message-ID); else the token after ``queued as `` (Postfix and friends);
    else, when the whole text is ``Ok <token>``, the token wrapped in ``<…>``.
    """
    text = " ".join(text.split())
    if text[:6].count(".") == 2 and text[:1].isdigit():  # drop an RFC 3463 enhanced code
        text = text.split(" ", 1)[1] if " " in text else ""
    match = _ANGLE_TOKEN.search(text)
    if match:
        return f"<{match.group(1)}>"
    match = _QUEUED_AS.search(text)
    if match:
        return match.group(1).rstrip(".,;)")
    match = _OK_TOKEN.match(text)
    if match:
        return f"<{match.group(1)}>"
    return ""


def next_attempt_at(
    attempt: int,
    queued_at: datetime,
    now: datetime,
    schedule: Sequence[float],
    jitter: float,
    rand: float,
    max_queue_age: float,
) -> datetime | None:
    """When a deferred recipient is tried again after its attempt ``attempt`` (1-based) failed,
    or ``None`` when it is ``failed`` (mail.md §7.8).

    The delay is the webhook schedule step with jitter (:func:`e2a.policy.backoff.step_delay`);
    past the end of the schedule the last step repeats, so a large ``max_queue_age`` is honoured
    rather than cut short. An attempt that would fall later than ``queued_at + max_queue_age`` is
    moved to that deadline and is the last one: an attempt made at or after the deadline that
    fails again gives ``None``.
    """
    deadline = queued_at + timedelta(seconds=max_queue_age)
    if now >= deadline:
        return None
    if not schedule:
        return deadline
    step = backoff.step_delay(min(attempt, len(schedule)), schedule, jitter, rand)
    assert step is not None
    when = now + timedelta(seconds=step)
    return deadline if when >= deadline else when


def order_mx(records: Sequence[tuple[int, str]], rand: Callable[[], float]) -> list[str]:
    """MX hosts by ascending preference, random order among equal preferences (RFC 5321 §5.1).

    ``rand`` is a uniform [0, 1) source (tests pass a fixed one). Duplicate host names are kept
    once, at their best preference.
    """
    keyed = sorted((pref, rand(), host.rstrip(".").lower()) for pref, host in records)
    hosts: list[str] = []
    for _pref, _r, host in keyed:
        if host not in hosts:
            hosts.append(host)
    return hosts


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505: a ``0 .`` record (host ``""`` once the root dot is removed) means no mail."""
    return any(host.rstrip(".") == "" for _pref, host in records)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
