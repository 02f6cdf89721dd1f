"""The two wire time formats of api.md §0.5."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from e2a.timefmt import ts_frac, ts_sec


@pytest.mark.parametrize(
    "dt,sec,frac",
    [
        (datetime(2026, 4, 27, 12, 0, 0, tzinfo=UTC), "2026-04-27T12:00:00Z", "2026-04-27T12:00:00.000000Z"),
        (datetime(2026, 4, 27, 12, 0, 0, 123456, tzinfo=UTC), "2026-04-27T12:00:00Z", "2026-04-27T12:00:00.123456Z"),
        (datetime(2026, 4, 27, 12, 0, 59, 999999, tzinfo=UTC), "2026-04-27T12:00:59Z", "2026-04-27T12:00:59.999999Z"),
        (
            datetime(2026, 4, 27, 14, 30, 0, 1, tzinfo=timezone(timedelta(hours=2))),
            "2026-04-27T12:30:00Z",
            "2026-04-27T12:30:00.000001Z",
        ),
        (datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "0999-01-02T03:04:05Z", "0999-01-02T03:04:05.000000Z"),
    ],
)
def test_formats_render_utc_with_z(dt, sec, frac):
    """ts-sec truncates to seconds, ts-frac always has 6 digits; both convert to UTC."""
    assert ts_sec(dt) == sec
    assert ts_frac(dt) == frac


def test_naive_datetime_is_refused():
    """A naive datetime has no defined UTC instant."""
    with pytest.raises(ValueError):
        ts_sec(datetime(2026, 1, 1))
