"""Cross-process events: one dedicated LISTEN connection, dispatching payloads to subscribers.

Every e2a process sharing the database listens; writers ``txn.notify(channel, payload)`` inside
their transaction, so a notification exists only if the data it announces was committed. If the
LISTEN connection drops we reconnect with backoff and tell subscribers (``on_reconnect``) so they
can re-read state they may have missed while deaf — NOTIFY is not queued for absent listeners.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import psycopg2
from txpostgres import txpostgres

from twisted.logger import Logger

from e2a.store.database import PgConnection

log = Logger()

CHANNEL_INBOUND = "e2a_inbound"  # payload: "<agent id>\t<message id>" (local-mode pushes)
CHANNEL_DELIVERY = "e2a_delivery"  # payload: "" (webhook jobs are due)
CHANNEL_OUTBOUND = "e2a_outbound"  # payload: "" (relay jobs are due)
CHANNEL_REVOKE = "e2a_revoke"  # payload: "key\t<key id>" | "agent\t<agent id>" | "user\t<user id>"
CHANNELS = (CHANNEL_INBOUND, CHANNEL_DELIVERY, CHANNEL_OUTBOUND, CHANNEL_REVOKE)

Subscriber = Callable[[str], Any]

#: First wait (seconds) before re-LISTENing after the connection was lost, doubled per failed
#: attempt up to MAX_RECONNECT_DELAY. The cap bounds how long after the database is back that
#: WebSocket pushes and revocations (which travel by NOTIFY) are still not heard; a connection
#: attempt every few seconds costs an unreachable server nothing.
FIRST_RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 5.0


def next_reconnect_delay(delay: float) -> float:
    """The wait after the next failed reconnect attempt."""
    return min(delay * 2, MAX_RECONNECT_DELAY)


class EventListener:
    def __init__(self, dsn: str, reactor: Any, clock: Any | None = None) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._clock = clock or reactor
        self._subscribers: dict[str, list[Subscriber]] = defaultdict(list)
        self._reconnect_hooks: list[Callable[[], Any]] = []
        self._conn: txpostgres.Connection | None = None
        self._stopping = False
        self._retry_call: Any = None
        self._delay = FIRST_RECONNECT_DELAY
        self._connecting = False

    def subscribe(self, channel: str, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(payload)`` for each NOTIFY on ``channel``; returns an unsubscribe function."""
        self._subscribers[channel].append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers[channel]:
                self._subscribers[channel].remove(fn)

        return unsubscribe

    def on_reconnect(self, fn: Callable[[], Any]) -> None:
        self._reconnect_hooks.append(fn)

    async def start(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        conn = PgConnection(reactor=self._reactor)
        await conn.connect(self._dsn)
        conn.addNotifyObserver(self._dispatch)
        for channel in CHANNELS:
            await conn.runOperation(f"LISTEN {channel}")
        self._conn = conn
        self._delay = FIRST_RECONNECT_DELAY
        # txpostgres has no connection-lost callback of its own; watch the underlying reader.
        original = conn.connectionLost

        def connection_lost(reason: Any, _orig: Any = original) -> None:
            _orig(reason)
            # only the current connection: a replaced one (reconnect_now) must not reconnect twice
            if not self._stopping and self._conn is conn:
                log.warn("LISTEN connection lost; reconnecting")
                self._schedule_reconnect()

        conn.connectionLost = connection_lost

    def _schedule_reconnect(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            return
        self._retry_call = self._clock.callLater(self._delay, self._reconnect)
        self._delay = next_reconnect_delay(self._delay)

    def reconnect_now(self) -> None:
        """The server is back (e2a.store.embedded restarted it): re-LISTEN now, not after the
        back-off delay. A live connection is kept; a dead one that has not noticed is replaced."""
        if self._stopping:
            return
        if self._conn is not None and not self._conn.closed:
            # The old server's socket may not have reported EOF yet: probe it.
            conn = self._conn

            def probe_failed(_failure: Any) -> None:
                if self._conn is conn and not self._stopping:
                    self._conn = None
                    try:
                        conn.close()
                    except Exception:
                        pass
                    self.reconnect_now()

            conn.runOperation("SELECT 1").addErrback(probe_failed)
            return
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        elif self._connecting:
            return
        self._delay = FIRST_RECONNECT_DELAY
        self._reconnect()

    def _reconnect(self) -> None:
        from twisted.internet.defer import Deferred

        async def attempt() -> None:
            self._connecting = True
            try:
                await self._connect()
            except (psycopg2.Error, OSError):
                self._schedule_reconnect()
                return
            finally:
                self._connecting = False
            log.info("LISTEN connection back")
            for hook in list(self._reconnect_hooks):
                try:
                    hook()
                except Exception:
                    log.failure("reconnect hook failed")

        Deferred.fromCoroutine(attempt())

    def _dispatch(self, notify: Any) -> None:
        for fn in list(self._subscribers.get(notify.channel, ())):
            try:
                fn(notify.payload)
            except Exception:
                log.failure("subscriber of {channel} failed", channel=notify.channel)

    def stop(self) -> None:
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
