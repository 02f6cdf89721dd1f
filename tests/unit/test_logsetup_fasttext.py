"""The fast text rendering of mail-flow lines (e2a.logsetup.text_event_formatter) is byte for byte
Twisted's ``formatEventAsClassicLogText`` (docs/performance.md, "The per-message log line")."""

from __future__ import annotations

import pytest

from twisted.logger import LogLevel, formatEventAsClassicLogText, formatTime, timeFormatRFC3339
from twisted.python.failure import Failure

from e2a.logsetup import text_event_formatter

T = 1_765_000_000.25


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


def _event(fmt: str, namespace: str = "e2a.mail", **fields: object) -> dict[str, object]:
    return {"log_format": fmt, "log_namespace": namespace, "log_level": LogLevel.info, "log_time": T, **fields}


CASES = [
    ("accepted", _event("accepted {message_id} from {client_ip} agents={agents_text} ms={ms}",
                        message_id="msg_1", client_ip="192.0.2.1", agents_text="a,b", ms=3.5)),
    ("repr field", _event("outbound {m} reply={reply!r}", m="msg_2", reply="250 ok 'q'")),
    ("format spec", _event("ms={ms:.1f} n={n:>4}", ms=1.2345, n=7)),
    ("newline", _event("e2a started\n  config: {c}", c="x")),
    ("empty text", _event("")),
    ("missing field", _event("accepted {nope}")),
    ("bad format", _event("accepted {", x=1)),
    ("call syntax", _event("v={f()}", f=lambda: "called")),
    ("other namespace", _event("hello {who}", namespace="e2a.test", who="world")),
    ("log_system", _event("hello {who}", who="world", log_system="custom")),
    ("failure", _event("hello {who}", who="world", log_failure=_failure())),
    ("no time", {**_event("hello {who}", who="world"), "log_time": None}),
    ("warn level", {**_event("hello {who}", who="world"), "log_level": LogLevel.warn}),
    ("no format", {"log_namespace": "e2a.mail", "log_level": LogLevel.info, "log_time": T}),
]


@pytest.mark.parametrize("time_format", [timeFormatRFC3339, None, "%H:%M:%S.%f"])
@pytest.mark.parametrize(("name", "event"), CASES, ids=[c[0] for c in CASES])
def test_fast_text_equals_twisted_classic_text_for_every_event_shape(name, event, time_format):
    """Each event shape renders exactly as Twisted's own text observer would (fallback included)."""
    expected = formatEventAsClassicLogText(event, formatTime=lambda t: formatTime(t, time_format))
    actual = text_event_formatter(time_format)(event)
    assert actual == expected


@pytest.mark.parametrize("offset", [0.0, 0.5, 0.999, 1.0, 61.0, 3600.0])
def test_cached_timestamp_matches_a_fresh_one_within_and_across_seconds(offset):
    """The per-second timestamp cache never serves the previous second's text."""
    fmt = text_event_formatter(timeFormatRFC3339)
    fmt(_event("x"))  # prime the cache at T
    when = T + offset
    assert fmt({**_event("x"), "log_time": when}) == f"{formatTime(when, timeFormatRFC3339)} [e2a.mail#info] x\n"
