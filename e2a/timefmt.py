"""The two wire time formats of api.md §0.5, as pure formatters.

Every JSON field names which one it uses; keeping both here (rather than in each route) means
a field can only ever be rendered one of the two agreed ways.
"""

from __future__ import annotations

from datetime import UTC, datetime


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    return dt.astimezone(UTC)


def ts_sec(dt: datetime) -> str:
    """``ts-sec``: ``YYYY-MM-DDTHH:MM:SSZ`` in UTC; the sub-second part is truncated."""
    d = _utc(dt)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}Z"


def ts_frac(dt: datetime) -> str:
    """``ts-frac``: RFC 3339 in UTC with exactly 6 fractional digits and ``Z``."""
    d = _utc(dt)
    return ts_sec(d)[:-1] + f".{d.microsecond:06d}Z"


def ts_sec_opt(dt: datetime | None) -> str | None:
    return None if dt is None else ts_sec(dt)


def ts_frac_opt(dt: datetime | None) -> str | None:
    return None if dt is None else ts_frac(dt)
