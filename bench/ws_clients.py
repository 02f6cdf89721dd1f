"""Many local agents' WebSocket clients in one process, for the fan-out part of ``bench/end_to_end.py``.

One Autobahn client per agent (``e2a.v2`` subprotocol, ``Authorization: Bearer`` of the user
key), all on 127.0.0.1. Every ``message`` frame is stamped with ``time.monotonic()``
(CLOCK_MONOTONIC, the same clock as the sending client's 250 times) the moment Autobahn hands it
over; the clients never ack (the measurement is the notification, and acks would add database
load during the fan-out).

Protocol with the parent (line based, bounded):

* argv: a JSON file ``{"port": …, "key": …, "agents": [email, …], "parallel": n}``;
* stdout ``READY <open> <failed> <seconds>`` once every connection attempt finished;
* stdin ``WAIT <n> <timeout>`` → stdout one JSON line ``{"frames": [[agent, message_id, t], …],
  "timed_out": bool, "open": k}`` when ``n`` message frames arrived since the previous WAIT, or
  after ``timeout`` seconds;
* stdin ``QUIT`` (or EOF) → close everything and exit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol

from twisted.internet import defer, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint

CONNECT_TIMEOUT = 30.0


class FanoutClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.opened: defer.Deferred[Any] = defer.Deferred()

    def onOpen(self) -> None:  # noqa: N802 - Autobahn API
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803 - Autobahn API
        now = time.monotonic()
        frame = json.loads(payload)
        if frame.get("type") == "message":
            self.factory.sink.append((self.factory.agent, frame["message_id"], now))
            waiter = self.factory.waiter
            if waiter and len(self.factory.sink) >= waiter[0] and not waiter[1].called:
                waiter[1].callback(None)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802,N803 - Autobahn API
        self.factory.state["closed"] += 1
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))


async def main(reactor: Any, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    port, key, agents = int(spec["port"]), spec["key"], spec["agents"]
    frames: list[tuple[str, str, float]] = []
    waiter: list[Any] = []  # [n, Deferred] while a WAIT is pending
    state = {"closed": 0}
    protos: list[FanoutClient] = []
    failed = 0
    t0 = time.monotonic()
    sem = defer.DeferredSemaphore(int(spec.get("parallel", 16)))

    async def connect(agent: str) -> None:
        nonlocal failed
        url = f"ws://127.0.0.1:{port}/api/v1/agents/{quote(agent, safe='')}/ws"
        factory = WebSocketClientFactory(url, protocols=["e2a.v2"], headers={"Authorization": f"Bearer {key}"},
                                         reactor=reactor)
        factory.protocol = FanoutClient
        factory.agent, factory.sink, factory.state = agent, frames, state
        factory.waiter = waiter
        try:
            proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10).connect(factory)
            await proto.opened.addTimeout(CONNECT_TIMEOUT, reactor)
            protos.append(proto)
        except Exception as e:  # noqa: BLE001 - counted and reported
            failed += 1
            if failed <= 3:
                print(f"connect {agent}: {e!r}", file=sys.stderr)

    await defer.DeferredList(
        [sem.run(lambda a=a: defer.Deferred.fromCoroutine(connect(a))) for a in agents], consumeErrors=True
    )
    sys.stdout.write(f"READY {len(protos)} {failed} {time.monotonic() - t0:.2f}\n")
    sys.stdout.flush()

    while True:
        line = await threads.deferToThread(sys.stdin.readline)
        cmd = line.split()
        if not cmd or cmd[0] == "QUIT":
            break
        if cmd[0] == "WAIT":
            n, timeout = int(cmd[1]), float(cmd[2])
            timed_out = False
            if len(frames) < n:
                d: defer.Deferred[None] = defer.Deferred()
                waiter[:] = [n, d]
                try:
                    await d.addTimeout(timeout, reactor)
                except defer.TimeoutError:
                    timed_out = True
                waiter[:] = []
            await task.deferLater(reactor, 0.3, lambda: None)  # late duplicates, if any
            out, frames[:] = list(frames), []
            open_now = len(protos) - state["closed"]
            sys.stdout.write(json.dumps({"frames": out, "timed_out": timed_out, "open": open_now}) + "\n")
            sys.stdout.flush()
    for p in protos:
        try:
            p.sendClose(1000)
        except Exception:  # noqa: BLE001 - already gone
            pass
    await task.deferLater(reactor, 1.0, lambda: None)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1])))
