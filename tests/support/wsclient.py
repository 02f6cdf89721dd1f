"""An Autobahn WebSocket client that records frames, pings and the close, for e2a's tests."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

# Safety net only: a wait that would otherwise hang the run fails after this many seconds.
WAIT = 10


def within(d: Any, seconds: float = WAIT) -> Deferred:
    """``d`` (a Deferred or a coroutine), failing with TimeoutError after ``seconds``."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    return d.addTimeout(seconds, reactor)


class RecordingClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.frames: DeferredQueue = DeferredQueue()
        self.pings: DeferredQueue = DeferredQueue()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()  # fires (code, reason)

    def onOpen(self) -> None:  # noqa: N802
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        self.frames.put(json.loads(payload.decode("utf-8")))

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        if self.factory.answer_pings:
            super().onPing(payload)
        self.pings.put(payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802,N803
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    async def frame(self) -> dict[str, Any]:
        return await within(self.frames.get())

    async def frames_until(self, frame_type: str) -> list[dict[str, Any]]:
        """Every frame up to and including the first of ``frame_type``."""
        out = []
        while True:
            f = await self.frame()
            out.append(f)
            if f.get("type") == frame_type:
                return out

    def send_json(self, value: Any) -> None:
        self.sendMessage(json.dumps(value).encode("utf-8"), isBinary=False)

    async def close_and_wait(self) -> None:
        if not self.closed.called:
            self.sendClose(1000)
        await within(self.closed)


def ws_path(agent: str) -> str:
    return f"/api/v1/agents/{quote(agent, safe='')}/ws"


async def connect(
    port: int,
    agent: str,
    *,
    token: str | None = None,
    bearer: str | None = None,
    v2: bool = True,
    origin: str | None = None,
    answer_pings: bool = True,
) -> RecordingClient:
    url = f"ws://127.0.0.1:{port}{ws_path(agent)}"
    if token is not None:
        url += f"?token={token}"
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    factory = WebSocketClientFactory(
        url, protocols=["e2a.v2"] if v2 else [], headers=headers, origin=origin, reactor=reactor
    )
    factory.protocol = RecordingClient
    factory.answer_pings = answer_pings
    proto = await within(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory))
    await within(proto.opened)
    return proto
