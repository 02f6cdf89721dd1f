"""Pure relay rules (mail.md §7.7, §7.8): provider ids, reply mapping, retry math, MX order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from e2a.outbound.relay import (
    SmtpReply,
    is_null_mx,
    next_attempt_at,
    order_mx,
    parse_provider_message_id,
    status_for_code,
)
from e2a.store.outbound import delivery_status

SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
AGE = 172800


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.0.0 Ok: queued as 4ZxY1k2abc", "4ZxY1k2abc"),
        ("Ok: queued as ABC123", "ABC123"),
        ("2.0.0 OK <0100018f-abc@email.amazonses.com>", "<0100018f-abc@email.amazonses.com>"),
        ("Ok <0100018f-abc>", "<0100018f-abc>"),
        ("Ok 0100018f-abc", "<0100018f-abc>"),
        ("2.0.0 Ok 0100018f-abc", "<0100018f-abc>"),
        ("OK id=1abc-2def queued as X1 <first@x> <second@x>", "<first@x>"),
        ("Accepted", ""),
        ("2.0.0 Ok", ""),
        ("Ok two tokens", ""),
        ("", ""),
        ("250 queued as Q9.", "Q9"),
    ],
)
def test_provider_message_id_parsed_from_final_reply(text, expected):
    """The first <…> token wins, then 'queued as X', then 'Ok <token>'; else nothing."""
    assert parse_provider_message_id(text) == expected


@pytest.mark.parametrize(
    ("code", "status"),
    [(250, None), (251, None), (221, None), (421, "deferred"), (450, "deferred"), (452, "deferred"),
     (354, "deferred"), (100, "deferred"), (500, "failed"), (550, "failed"), (554, "failed")],
)
def test_status_for_code_maps_classes(code, status):
    """2xx continues, 4xx and unexpected codes defer, 5xx fails."""
    assert status_for_code(code) == status


def test_reply_line_joins_multiline_text():
    """last_reply is one printable line."""
    assert SmtpReply(550, "5.1.1 no such user\nsee docs\x07").line() == "550 5.1.1 no such user see docs "


def test_next_attempt_follows_schedule_without_jitter_bias():
    """With rand = 0.5 the delay equals the schedule step."""
    now = T0 + timedelta(seconds=10)
    assert next_attempt_at(1, T0, now, SCHEDULE, 0.1, 0.5, AGE) == now + timedelta(seconds=5)
    assert next_attempt_at(3, T0, now, SCHEDULE, 0.1, 0.5, AGE) == now + timedelta(seconds=120)


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 0.9), (1.0, 1.1)])
def test_next_attempt_jitter_bounds(rand, factor):
    """The jitter factor stays within ±10 %."""
    got = next_attempt_at(4, T0, T0, SCHEDULE, 0.1, rand, AGE)
    assert got == T0 + timedelta(seconds=600 * factor)


def test_next_attempt_moved_to_deadline_then_failed():
    """The attempt that would fall past queued_at + max_queue_age runs at the deadline and is last."""
    deadline = T0 + timedelta(seconds=AGE)
    now = deadline - timedelta(seconds=60)
    assert next_attempt_at(11, T0, now, SCHEDULE, 0.1, 0.5, AGE) == deadline
    assert next_attempt_at(12, T0, deadline, SCHEDULE, 0.1, 0.5, AGE) is None
    assert next_attempt_at(12, T0, deadline + timedelta(seconds=3), SCHEDULE, 0.1, 0.5, AGE) is None


def test_default_schedule_reaches_deadline_on_attempt_twelve():
    """With the default schedule and 48 h, attempts 1–11 follow the schedule and 12 is at 48 h."""
    now, attempt = T0, 1
    times = [now]
    while True:
        nxt = next_attempt_at(attempt, T0, now, SCHEDULE, 0.1, 0.5, AGE)
        if nxt is None:
            break
        now, attempt = nxt, attempt + 1
        times.append(now)
    assert len(times) == 12
    assert times[-1] == T0 + timedelta(seconds=AGE)
    assert times[-2] == T0 + timedelta(seconds=sum(SCHEDULE[:10]))


def test_next_attempt_repeats_last_step_past_schedule():
    """A queue age longer than the schedule keeps retrying at the last step until the deadline."""
    got = next_attempt_at(30, T0, T0, (5, 60), 0.0, 0.5, 10**6)
    assert got == T0 + timedelta(seconds=60)


def test_mx_ordered_by_preference_random_among_equals():
    """Ascending preference; equal preferences shuffled by the injected random source."""
    records = [(20, "c.example"), (10, "b.example."), (10, "a.example"), (5, "first.example")]
    values = iter([0.1, 0.9, 0.2, 0.5])
    assert order_mx(records, lambda: next(values)) == ["first.example", "a.example", "b.example", "c.example"]
    values = iter([0.1, 0.1, 0.9, 0.5])
    assert order_mx(records, lambda: next(values)) == ["first.example", "b.example", "a.example", "c.example"]


def test_mx_duplicates_kept_once():
    """The same host under two preferences is tried once, at the better one."""
    assert order_mx([(20, "a.example"), (10, "A.example")], lambda: 0.5) == ["a.example"]


@pytest.mark.parametrize(
    ("records", "null"),
    [([(0, "")], True), ([(0, ".")], True), ([(10, "mx.example")], False), ([], False)],
)
def test_null_mx_detected(records, null):
    """RFC 7505 '0 .' means the domain accepts no mail."""
    assert is_null_mx(records) is null


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["queued"], "queued"),
        (["sent", "deferred"], "queued"),
        (["sent", "sent"], "sent"),
        (["failed"], "failed"),
        (["sent", "failed"], "partial"),
        ([], "sent"),
    ],
)
def test_delivery_status_from_recipients(statuses, expected):
    """queued while any is pending; then sent / failed / partial."""
    assert delivery_status(statuses) == expected


# ------------------------------------------------------------------ reply caps (no sockets)


def _client():
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from e2a.outbound.relay import _ClientProtocol

    proto = _ClientProtocol(task.Clock())
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


@pytest.mark.parametrize(
    ("data", "aborted"),
    [
        (b"250-x\r\n" * 99 + b"250 end\r\n", False),
        (b"250-x\r\n" * 100 + b"250 end\r\n", True),
        (b"250-" + b"y" * 8000 + b"\r\n", False),
        ((b"250-" + b"y" * 8000 + b"\r\n") * 9, True),
        (b"250 a\r\n" * 4, False),
        (b"250 a\r\n" * 5, True),
    ],
    ids=["100-lines", "101-lines", "8k", "72k", "4-unsolicited", "5-unsolicited"],
)
def test_client_aborts_when_server_reply_exceeds_caps(data, aborted):
    """One reply over 100 lines or 64 KiB, or more than 4 replies nobody asked for, drops the connection."""
    proto, transport = _client()
    proto.dataReceived(data)
    assert proto._aborted is aborted
    if aborted:
        assert proto.resp == [] and proto._replies == []
    assert len(proto.resp) <= 100


def test_client_counts_each_reply_separately():
    """Many small complete replies (each read) never add up to the per-reply cap."""
    proto, transport = _client()
    for _ in range(50):
        proto.dataReceived(b"250-a\r\n" * 60 + b"250 b\r\n")
        proto._replies.clear()
    assert proto._aborted is False


def test_starttls_discards_plaintext_sent_after_the_go_ahead():
    """RFC 3207 §6: replies queued or buffered before the handshake are thrown away."""
    proto, transport = _client()
    started = []
    transport.startTLS = started.append
    proto._busyReceiving = True  # as inside dataReceived: bytes stay in the line buffer
    proto.dataReceived(b"250 buffered\r\n")
    proto._busyReceiving = False
    proto._replies.append(SmtpReply(250, "injected"))
    proto.start_tls("creator")
    assert started == ["creator"]
    assert proto._replies == [] and proto.clearLineBuffer() == b""
