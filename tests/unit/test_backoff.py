"""Retry schedule, jitter, Retry-After and outcome rules of mail.md §4.3–4.4 (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from e2a.config import WebhooksConfig
from e2a.policy import backoff

SCHEDULE = WebhooksConfig().retry_schedule
NOW = datetime(2026, 4, 27, 12, 0, 0, tzinfo=UTC)

SPEC_STEPS = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400]


def test_default_schedule_matches_spec():
    """The config default is the table of mail.md §4.4."""
    assert list(SCHEDULE) == SPEC_STEPS


@pytest.mark.parametrize("attempt,step", list(enumerate(SPEC_STEPS, start=1)))
def test_step_delay_without_jitter_is_the_step(attempt, step):
    """rand = 0.5 gives factor 1: after attempt n the wait is step n."""
    assert backoff.step_delay(attempt, SCHEDULE, 0.1, 0.5) == pytest.approx(step)


@pytest.mark.parametrize("attempt,step", list(enumerate(SPEC_STEPS, start=1)))
def test_step_delay_jitter_stays_within_ten_percent(attempt, step):
    """Every random value maps into [0.9, 1.1] × step."""
    low = backoff.step_delay(attempt, SCHEDULE, 0.1, 0.0)
    high = backoff.step_delay(attempt, SCHEDULE, 0.1, 1.0)
    assert low == pytest.approx(step * 0.9)
    assert high == pytest.approx(step * 1.1)
    for r in (0.0, 0.1, 0.37, 0.5, 0.99, 0.999999):
        d = backoff.step_delay(attempt, SCHEDULE, 0.1, r)
        assert step * 0.9 - 1e-9 <= d <= step * 1.1 + 1e-9


def test_step_delay_after_attempt_twelve_gives_up():
    """Attempt 12 is the last one: no delay after it fails."""
    assert backoff.step_delay(11, SCHEDULE, 0.1, 0.5) is not None
    assert backoff.step_delay(12, SCHEDULE, 0.1, 0.5) is None
    assert backoff.next_delay(12, SCHEDULE, 0.1, 0.5, status=503, retry_after="10", now=NOW) is None


def test_cumulative_schedule_matches_spec_table():
    """Without jitter attempt 12 starts 51 h 42 min 35 s after attempt 1."""
    total = sum(backoff.step_delay(n, SCHEDULE, 0.1, 0.5) for n in range(1, 12))
    assert total == pytest.approx(51 * 3600 + 42 * 60 + 35)


def test_step_delay_rejects_attempt_zero():
    """Attempts are 1-based."""
    with pytest.raises(ValueError):
        backoff.step_delay(0, SCHEDULE, 0.1, 0.5)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Mon, 27 Apr 2026 12:01:00 GMT", 60.0),
        ("Mon, 27 Apr 2026 11:00:00 GMT", 0.0),  # in the past
        ("Monday, 27-Apr-26 12:02:00 GMT", 120.0),  # obsolete RFC 850 form (RFC 9110: accept it)
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after_seconds_and_dates(value, expected):
    """Delta-seconds or an HTTP-date; anything else is None."""
    got = backoff.parse_retry_after(value, NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "status,retry_after,expected",
    [
        (429, "100", 100.0),  # longer than the 5 s step: honoured
        (503, "100", 100.0),
        (429, "1", 5.0),  # shorter than the step: the step wins
        (429, "999999", 3600.0),  # capped by retry_after_cap
        (503, (NOW + timedelta(minutes=2)).strftime("%a, %d %b %Y %H:%M:%S GMT"), 120.0),
        (429, "garbage", 5.0),  # invalid → step
        (429, None, 5.0),  # absent → step
        (500, "100", 5.0),  # only 429/503 honour Retry-After
        (302, "100", 5.0),
    ],
)
def test_next_delay_honours_retry_after_for_429_and_503(status, retry_after, expected):
    """max(step, min(Retry-After, cap)) for 429/503; the step otherwise."""
    got = backoff.next_delay(
        1, SCHEDULE, 0.1, 0.5, status=status, retry_after=retry_after, retry_after_cap=3600, now=NOW
    )
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "status,outcome",
    [
        (200, "delivered"), (201, "delivered"), (204, "delivered"), (299, "delivered"),
        (301, "retry"), (302, "retry"), (307, "retry"), (308, "retry"),
        (400, "retry"), (404, "retry"), (409, "retry"), (429, "retry"),
        (410, "gone"),
        (500, "retry"), (502, "retry"), (503, "retry"), (100, "retry"),
    ],
)
def test_classify_status_maps_outcomes(status, outcome):
    """2xx delivered, 410 gone, 3xx and everything else retry."""
    assert backoff.classify_status(status) == outcome
