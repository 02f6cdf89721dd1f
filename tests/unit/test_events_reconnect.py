"""How soon the LISTEN connection is tried again after it was lost (e2a.store.events)."""

from __future__ import annotations

import pytest

from e2a.store.events import next_reconnect_delay


@pytest.mark.parametrize(
    ("delay", "after"),
    [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 5.0), (5.0, 5.0)],
)
def test_the_wait_doubles_up_to_five_seconds(delay: float, after: float) -> None:
    """A database back after a long outage is heard again within MAX_RECONNECT_DELAY (pushes
    and revocations travel by NOTIFY), not after a wait that grew with the outage."""
    assert next_reconnect_delay(delay) == after

