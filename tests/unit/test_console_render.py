"""Pure rules of the web console's rendering (e2a/console/render.py, routes helpers)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from e2a.console import render
from e2a.console.routes import _first_form, _split_addresses, login_link_url
from e2a.store.console import DayCount

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _flat(tag) -> str:
    out: list[bytes] = []
    render.flattenString(None, tag).addCallback(out.append)  # synchronous for plain tags
    return out[0].decode()


@pytest.mark.parametrize(("deadline", "expected"), [
    (None, "no deadline"),
    (NOW, "expired"),
    (NOW - timedelta(seconds=1), "expired"),
    (NOW + timedelta(seconds=30), "30 s left"),
    (NOW + timedelta(minutes=5, seconds=10), "5 min left"),
    (NOW + timedelta(hours=2, minutes=3), "2 h 3 min left"),
    (NOW + timedelta(days=6, hours=23, minutes=59), "6 d 23 h left"),
])
def test_time_left_reads_like_a_person_would(deadline, expected):
    """The approval queue's "time left" column, at the edges."""
    assert render.time_left(deadline, NOW) == expected


def test_verdict_badges_show_verified_sender_entity_and_checks():
    """A verified message: green badge, signed sender, entity type and the spf/dkim/dmarc summary."""
    html = _flat(render.tags.p(*render.verdict_badges({
        "X-E2A-Auth-Verified": "true", "X-E2A-Auth-Sender": "a@example.org", "X-E2A-Auth-Entity-Type": "agent",
        "X-E2A-Auth-Domain-Check": "spf=pass; dkim=pass; dmarc=pass"})))
    assert 'class="badge good">verified<' in html and "a@example.org" in html and ">agent<" in html
    assert "spf=pass; dkim=pass; dmarc=pass" in html


def test_verdict_badges_without_headers_say_not_verified():
    """No auth headers at all → only "not verified"."""
    assert _flat(render.tags.p(*render.verdict_badges({}))) == '<p><span class="badge bad">not verified</span></p>'


def test_bidi_and_clip_escape_and_isolate_attacker_text():
    """Text is escaped, isolated in <bdi> and cut with an ellipsis."""
    assert _flat(render.bidi('<b x="1">\u202e', 3)) == '<bdi class="subject">&lt;b …</bdi>'
    assert render.clip("abc", 3) == "abc" and render.clip("abcd", 3) == "abc…"


def test_chart_has_fourteen_days_of_two_series_without_inline_style():
    """One received and one delivered bar per day, titles for each, presentation attributes only."""
    days = [DayCount(date(2026, 1, 1) + timedelta(days=i), i, i // 2) for i in range(14)]
    svg = _flat(render.chart_svg(days))
    assert svg.count("<rect") == 28 and "style" not in svg and "2026-01-14: 13 received" in svg


@pytest.mark.parametrize(("text", "expected"), [
    ("a@x.org, b@y.org", ["a@x.org", "b@y.org"]),
    ("a@x.org\nb@y.org\n\n", ["a@x.org", "b@y.org"]),
    ("  ", []),
])
def test_split_addresses_takes_commas_and_lines(text, expected):
    """Recipient and reviewer fields: comma or line separated, blanks dropped."""
    assert _split_addresses(text) == expected


def test_first_form_value_wins_and_bad_utf8_is_replaced():
    """Repeated fields: the first wins (api.md §0.6); CRLF from textareas becomes LF."""
    assert _first_form(b"a=1&a=2&b=%FF&c=x%0D%0Ay") == {"a": "1", "b": "\ufffd", "c": "x\ny"}


def test_login_link_url_keeps_a_public_url_path_prefix():
    """The printed link is public_url + /console/login?t=…"""
    assert login_link_url("https://mail.example.com/e2a/", "tok") == "https://mail.example.com/e2a/console/login?t=tok"
