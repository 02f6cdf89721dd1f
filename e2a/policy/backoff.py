"""Webhook retry rules (mail.md §4.3, §4.4) as pure functions.

Nothing here reads a clock or a random source: the worker passes ``now`` and a uniform random
value in [0, 1), so the whole schedule, its jitter bounds and the ``Retry-After`` handling are
table-tested without a reactor.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

__all__ = [
    "DELIVERED",
    "GONE",
    "RETRY",
    "Outcome",
    "classify_status",
    "honours_retry_after",
    "next_delay",
    "parse_retry_after",
    "step_delay",
]

Outcome = Literal["delivered", "retry", "gone"]
DELIVERED: Outcome = "delivered"
RETRY: Outcome = "retry"
GONE: Outcome = "gone"


def classify_status(status: int) -> Outcome:
    """Outcome of an HTTP status (mail.md §4.3).

    2xx → delivered; 410 → gone (delivery failed, webhook disabled); everything else —
    including 3xx, which is never followed because a redirect could point anywhere the SSRF
    check never saw — is a failed attempt to retry.
    """
    if 200 <= status <= 299:
        return DELIVERED
    if status == 410:
        return GONE
    return RETRY


def honours_retry_after(status: int) -> bool:
    """Only 429 and 503 make e2a read ``Retry-After`` (mail.md §4.3)."""
    return status in (429, 503)


def step_delay(attempt: int, schedule: Sequence[float], jitter: float, rand: float) -> float | None:
    """Seconds to wait after attempt ``attempt`` (1-based) failed, or ``None`` when the schedule
    is exhausted (after attempt ``len(schedule) + 1`` the delivery is ``failed``).

    The step is multiplied by ``1 - jitter + 2 * jitter * rand``: with ``rand`` uniform in
    [0, 1) that is a uniform factor in [0.9, 1.1) for the default jitter of 0.1, so retries of
    many messages failed by one outage spread out instead of arriving together.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    if attempt > len(schedule):
        return None
    rand = min(max(rand, 0.0), 1.0)
    return float(schedule[attempt - 1]) * (1.0 - jitter + 2.0 * jitter * rand)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

    A date in the past gives 0. Absent, empty, negative or unparseable values give ``None``
    (the caller then uses the schedule step).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC with unknown origin
        when = when.replace(tzinfo=now.tzinfo)
    return max(0.0, (when - now).total_seconds())


def next_delay(
    attempt: int,
    schedule: Sequence[float],
    jitter: float,
    rand: float,
    *,
    status: int | None = None,
    retry_after: str | None = None,
    retry_after_cap: float = 3600,
    now: datetime | None = None,
) -> float | None:
    """Delay before the next attempt after attempt ``attempt`` failed; ``None`` = give up.

    For 429/503: ``max(step, min(Retry-After, retry_after_cap))`` — a receiver may slow us
    down, never speed us up, and never park a delivery for longer than the cap.
    """
    step = step_delay(attempt, schedule, jitter, rand)
    if step is None:
        return None
    if status is not None and honours_retry_after(status) and retry_after is not None and now is not None:
        asked = parse_retry_after(retry_after, now)
        if asked is not None:
            return max(step, min(asked, float(retry_after_cap)))
    return step
