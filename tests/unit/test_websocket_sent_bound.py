"""The per-connection memory of sent message ids is bounded (mail.md §5 step 3 without a leak).

The no-duplicate behaviour across drain and live push is tested on sockets in
tests/integration/test_websocket.py; this checks the bound itself, with no network.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from autobahn.websocket.protocol import WebSocketProtocol

from e2a.delivery import websocket
from e2a.delivery.websocket import SENT_IDS_KEPT, AgentSocketProtocol, Notification, RecentIds
from e2a.delivery.websocket import protocol as ws_protocol


def _note(n: int) -> Notification:
    return Notification(f"msg_{n:032x}", "", "alice@example.com", "bot@agents.test", "hi", datetime(2026, 1, 1, tzinfo=UTC))


def test_recent_ids_keeps_only_newest_limit():
    """Adding beyond the limit forgets the oldest ids, in insertion order; re-adding is a no-op."""
    ids = RecentIds(3)
    for item in ("a", "b", "c", "a"):
        ids.add(item)
    assert len(ids) == 3 and all(x in ids for x in "abc")
    ids.add("d")
    assert len(ids) == 3 and "a" not in ids and all(x in ids for x in "bcd")
    ids.add("e")
    assert "b" not in ids and all(x in ids for x in "cde")


def test_recent_ids_refuses_empty_limit():
    """A limit under one could never prevent any duplicate: refused."""
    with pytest.raises(ValueError):
        RecentIds(0)


def test_sent_ids_bounded_over_a_long_connection(monkeypatch):
    """Far more notifications than the bound: memory stays at SENT_IDS_KEPT, recent duplicates are still skipped."""
    monkeypatch.setattr(ws_protocol, "SENT_IDS_KEPT", 50)  # read where the protocol lives
    proto = AgentSocketProtocol()
    proto.state = WebSocketProtocol.STATE_OPEN
    frames: list[str] = []
    monkeypatch.setattr(proto, "_send_json", lambda frame: frames.append(frame["message_id"]))
    for n in range(1000):
        assert proto._send_note(_note(n)) is True
    assert len(proto._sent) == 50
    assert len(frames) == 1000
    # The newest 50 (what a drain/live overlap can repeat) are still refused a second time.
    assert all(proto._send_note(_note(n)) is False for n in range(950, 1000))
    assert len(frames) == 1000
    # What was forgotten is only the old tail.
    assert _note(949).message_id not in proto._sent


def test_default_bound_exceeds_the_largest_live_queue_of_a_drain():
    """SENT_IDS_KEPT covers every notification that can queue during a drain before the slow-consumer close."""
    smallest = len(websocket.encode_frame(websocket.notification_frame(
        Notification("msg_" + "0" * 32, "", "", "a@b.c", "", datetime(2026, 1, 1, tzinfo=UTC)))))
    assert SENT_IDS_KEPT > websocket.SLOW_CONSUMER_OCTETS // smallest
