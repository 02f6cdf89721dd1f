"""WebSocket delivery end to end: real sockets on 127.0.0.1, Autobahn's client, the test database.

Inbound mail is inserted the way e2a/inbound.py commits a local-mode copy: the row plus
``NOTIFY e2a_inbound 'agent\\tmessage'`` in one transaction.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from e2a import ids
from e2a.config import HttpConfig, WebSocketConfig
from e2a.delivery.websocket import WebSocketService
from e2a.store import accounts
from e2a.store import agents as agent_store
from e2a.store.database import Database
from e2a.store.events import CHANNEL_INBOUND, CHANNEL_REVOKE, EventListener
from tests.support.apiserver import ApiServer, insert_user_with_key, make_test_config
from tests.support.wsclient import RecordingClient, connect, within, ws_path

PUBLIC_URL = "https://e2a.test"
AGENT = "bot@agents.test"
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


class Stack:
    """One e2a process's WebSocket half: its own LISTEN connection, service and HTTP site."""

    def __init__(self, db: Database, ws: WebSocketConfig, clock: Any = None) -> None:
        self.db = db
        self.ws = ws
        self.clock = clock
        self.events: EventListener | None = None
        self.service: WebSocketService | None = None
        self.api: ApiServer | None = None
        self.clients: list[RecordingClient] = []

    async def start(self) -> Stack:
        self.events = EventListener(self.db.dsn, reactor)
        await self.events.start()
        self.service = WebSocketService(self.db, self.events, self.ws, PUBLIC_URL, reactor, clock=self.clock)
        self.service.start()
        config = make_test_config(websocket=self.ws, http=HttpConfig(public_url=PUBLIC_URL))
        self.api = ApiServer(self.db, config, websocket=self.service)
        await self.api.start()
        return self

    @property
    def port(self) -> int:
        assert self.api is not None
        return self.api.port.getHost().port

    async def connect(self, **kwargs: Any) -> RecordingClient:
        agent = kwargs.pop("agent", AGENT)
        client = await connect(self.port, agent, **kwargs)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close_and_wait()
        assert self.service and self.api and self.events
        await self.service.stop()
        await self.api.stop()
        self.events.stop()


@pytest.fixture
def stacks(db):
    started: list[Stack] = []
    extra_dbs: list[Database] = []

    async def make(ws: WebSocketConfig | None = None, clock: Any = None, own_db: bool = False) -> Stack:
        database = db
        if own_db:
            database = Database(db.dsn, pool_size=2, reactor=reactor)
            await database.start()
            extra_dbs.append(database)
        stack = Stack(database, ws or WebSocketConfig(drain_page_size=3), clock)
        await stack.start()
        started.append(stack)
        return stack

    yield make
    for stack in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(stack.stop()))
    for database in extra_dbs:
        database.close()


# ---------------------------------------------------------------------------- data helpers


async def make_agent(db: Database, user_id: str, address: str = AGENT, mode: str = "local") -> str:
    async def _txn(txn: Any) -> None:
        await txn.execute(
            "INSERT INTO domains (domain, is_shared, verified) VALUES ('agents.test', TRUE, TRUE)"
            " ON CONFLICT DO NOTHING"
        )
        await txn.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode) VALUES (%s, %s, 'agents.test', %s)",
            (address, user_id, mode),
        )

    await db.run("test_agent", _txn)
    return address


async def agent_key(db: Database, user_id: str, agent_id: str) -> tuple[str, str]:
    key_id, key = ids.new_key_id(), "e2a_" + secrets.token_hex(32)
    await db.execute(
        "INSERT INTO api_keys (id, user_id, agent_id, scope, key_hash, key_prefix) VALUES (%s, %s, %s, 'agent', %s, %s)",
        (key_id, user_id, agent_id, hashlib.sha256(key.encode()).hexdigest(), key[:12]),
    )
    return key_id, key


async def insert_message(
    db: Database,
    user_id: str,
    agent_id: str = AGENT,
    *,
    subject: str = "Hello bot",
    created_at: datetime | None = None,
    status: str = "unread",
    conversation_id: str = "",
) -> str:
    """An inbound copy committed as e2a/inbound.py does for a local agent (row + NOTIFY)."""
    message_id = ids.new_message_id()

    async def _txn(txn: Any) -> None:
        await txn.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, sender, display_from, recipient,"
            " subject, conversation_id, raw_message, auth_headers, created_at)"
            " VALUES (%s, %s, %s, 'inbound', %s, 'alice@example.com', 'Alice <alice@example.com>', %s,"
            " %s, %s, 'raw', '{}', COALESCE(%s, now()))",
            (message_id, agent_id, user_id, status, agent_id, subject, conversation_id, created_at),
        )
        await txn.notify(CHANNEL_INBOUND, f"{agent_id}\t{message_id}")

    await db.run("test_insert_message", _txn)
    return message_id


async def status_of(db: Database, message_id: str) -> str:
    row = await db.fetchone("SELECT status FROM messages WHERE id = %s", (message_id,))
    assert row is not None
    return row["status"]


async def owner(db: Database) -> tuple[str, str]:
    user_id, key = await insert_user_with_key(db)
    await make_agent(db, user_id)
    return user_id, key


def message_ids(frames: list[dict[str, Any]]) -> list[str]:
    return [f["message_id"] for f in frames if f.get("type") == "message"]


# ---------------------------------------------------------------------------- handshake


async def handshake(stack: Stack, agent: str = AGENT, *, token: str | None = None, headers: dict | None = None):
    path = ws_path(agent) + (f"?token={token}" if token is not None else "")
    assert stack.api is not None
    return await within(stack.api.request("GET", path, headers=headers))


@pytest_twisted.ensureDeferred
async def test_handshake_401_when_key_missing_or_invalid(db, stacks):
    """No key, a malformed key and a bad header (which wins over a good token) are all 401."""
    stack = await stacks()
    _user_id, key = await owner(db)
    for kwargs in (
        {"headers": UPGRADE},
        {"token": "e2a_" + "0" * 64, "headers": UPGRADE},
        {"token": key, "headers": {**UPGRADE, "Authorization": "Bearer e2a_nope"}},
    ):
        resp = await handshake(stack, **kwargs)
        assert resp.code == 401
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.header("WWW-Authenticate") == 'Bearer realm="e2a"'
        assert resp.header("Content-Type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_handshake_403_when_origin_not_allowed(db, stacks):
    """A foreign Origin is refused; the public URL's origin passes on to the next check."""
    stack = await stacks()
    _user_id, key = await owner(db)
    resp = await handshake(stack, token=key, headers={**UPGRADE, "Origin": "https://evil.example"})
    assert (resp.code, resp.json()["error"]["code"]) == (403, "origin_not_allowed")
    resp = await handshake(stack, token=key, headers={"Origin": "https://E2A.test:443"})
    assert (resp.code, resp.json()["error"]["code"]) == (426, "upgrade_required")


@pytest_twisted.ensureDeferred
async def test_handshake_404_when_agent_missing_or_foreign(db, stacks):
    """Unknown agents and other agents of an agent-scoped key are the same 404."""
    stack = await stacks()
    user_id, key = await owner(db)
    other = await make_agent(db, user_id, "other@agents.test")
    _kid, scoped = await agent_key(db, user_id, other)
    resp = await handshake(stack, "nobody@agents.test", token=key, headers=UPGRADE)
    assert (resp.code, resp.json()["error"]["code"]) == (404, "agent_not_found")
    resp = await handshake(stack, AGENT, token=scoped, headers=UPGRADE)
    assert (resp.code, resp.json()["error"]["code"]) == (404, "agent_not_found")


@pytest_twisted.ensureDeferred
async def test_handshake_400_when_agent_in_cloud_mode(db, stacks):
    """A cloud-mode agent has no WebSocket."""
    stack = await stacks()
    user_id, key = await insert_user_with_key(db)
    await make_agent(db, user_id, mode="cloud")
    resp = await handshake(stack, token=key, headers=UPGRADE)
    assert (resp.code, resp.json()["error"]["code"]) == (400, "agent_not_local")


@pytest_twisted.ensureDeferred
async def test_handshake_429_when_connections_exhausted(db, stacks):
    """max_connections_per_agent open sockets make the next handshake 429."""
    stack = await stacks(WebSocketConfig(max_connections_per_agent=1))
    _user_id, key = await owner(db)
    await stack.connect(token=key)
    resp = await handshake(stack, token=key, headers=UPGRADE)
    assert (resp.code, resp.json()["error"]["code"]) == (429, "too_many_connections")


@pytest_twisted.ensureDeferred
async def test_handshake_426_when_not_an_upgrade(db, stacks):
    """A plain GET with a valid key (header form) is 426 upgrade_required, JSON body."""
    stack = await stacks()
    _user_id, key = await owner(db)
    resp = await handshake(stack, headers={"Authorization": f"Bearer {key}"})
    assert (resp.code, resp.json()["error"]["code"]) == (426, "upgrade_required")
    assert resp.header("Sec-WebSocket-Version") == "13"  # (treq hides the hop-by-hop Upgrade header)


@pytest_twisted.ensureDeferred
async def test_handshake_accepts_bearer_header_and_agent_key(db, stacks):
    """The key may come in Authorization: Bearer; an agent-scoped key opens its own agent."""
    stack = await stacks()
    user_id, key = await owner(db)
    _kid, scoped = await agent_key(db, user_id, AGENT)
    a = await stack.connect(bearer=key, token="e2a_ignored_because_header_wins")
    b = await stack.connect(token=scoped, v2=False)
    assert a.websocket_protocol_in_use == "e2a.v2"
    assert b.websocket_protocol_in_use is None
    assert (await a.frame()) == {"type": "drained", "count": 0}


# ---------------------------------------------------------------------------- drain and live


@pytest_twisted.ensureDeferred
async def test_drain_sends_every_unread_oldest_first_then_live(db, stacks):
    """8 unread over pages of 3 arrive oldest first, then `drained`, then a live push."""
    stack = await stacks(WebSocketConfig(drain_page_size=3))
    user_id, key = await owner(db)
    base = datetime.now(UTC) - timedelta(hours=1)
    # Inserted newest first, so order can only come from created_at.
    unread = [
        await insert_message(db, user_id, subject=f"m{i}", created_at=base + timedelta(seconds=i), conversation_id="c1" if i == 0 else "")
        for i in reversed(range(8))
    ][::-1]
    await insert_message(db, user_id, status="read", created_at=base)
    client = await stack.connect(token=key)
    frames = await client.frames_until("drained")
    assert message_ids(frames) == unread
    assert frames[-1] == {"type": "drained", "count": 8}
    first = frames[0]
    assert list(first) == ["type", "message_id", "conversation_id", "from", "recipient", "subject", "received_at"]
    assert first["conversation_id"] == "c1" and first["from"] == "Alice <alice@example.com>"
    assert first["recipient"] == AGENT and first["subject"] == "m0"
    assert first["received_at"].endswith("Z") and len(first["received_at"]) == len("2026-04-27T12:00:00.123456Z")
    assert "conversation_id" not in frames[1]
    live = await insert_message(db, user_id, subject="live")
    frame = await client.frame()
    assert frame["message_id"] == live and frame["subject"] == "live"
    assert await status_of(db, live) == "unread"  # notifications never mark read


@pytest_twisted.ensureDeferred
async def test_drain_and_live_never_duplicate_at_the_boundary(db, stacks):
    """Mail committed during the drain is sent exactly once, whether the drain sees it or not."""
    stack = await stacks(WebSocketConfig(drain_page_size=2))
    user_id, key = await owner(db)
    base = datetime.now(UTC) - timedelta(hours=1)
    backlog = [await insert_message(db, user_id, created_at=base + timedelta(seconds=i)) for i in range(5)]
    service = stack.service
    assert service is not None
    original = service.unread_page
    during: dict[str, str] = {}

    async def first_page_then_commit(agent_id, after, page_size):
        page = await original(agent_id, after, page_size)
        if not during:
            conn = service.registry.connections(AGENT)[0]
            offered: Deferred = Deferred()
            real_offer = conn.offer

            def offer(note):
                real_offer(note)
                if note.message_id == during.get("new") and not offered.called:
                    offered.callback(None)

            conn.offer = offer
            # Older than the drain's cursor (the drain cannot see it) and newer (it will).
            during["old"] = await insert_message(db, user_id, created_at=base - timedelta(minutes=1))
            during["new"] = await insert_message(db, user_id)
            await within(offered)  # both live events reached the connection mid-drain
            assert conn.draining
        return page

    service.unread_page = first_page_then_commit
    client = await stack.connect(token=key)
    frames = await client.frames_until("drained")
    assert message_ids(frames) == [*backlog, during["new"]]
    assert frames[-1]["count"] == 6
    assert (await client.frame())["message_id"] == during["old"]
    later = await insert_message(db, user_id)
    assert (await client.frame())["message_id"] == later  # nothing was queued twice before it


@pytest_twisted.ensureDeferred
async def test_ack_marks_read_and_unknown_ids_get_an_error(db, stacks):
    """`ack` marks the message read; acking it again or a bogus id answers unknown_message."""
    stack = await stacks()
    user_id, key = await owner(db)
    mid = await insert_message(db, user_id)
    client = await stack.connect(token=key)
    await client.frames_until("drained")
    client.send_json({"type": "ack", "message_id": mid})
    client.send_json({"type": "ack", "message_id": mid})  # frames are handled in order
    assert (await client.frame())["code"] == "unknown_message"
    assert await status_of(db, mid) == "read"
    client.send_json({"type": "hello"})
    bad = await client.frame()
    assert bad["type"] == "error" and bad["code"] == "bad_frame" and "message_id" not in bad


@pytest_twisted.ensureDeferred
async def test_every_connection_of_an_agent_receives_each_message(db, stacks):
    """Two open sockets for one agent both get the live push."""
    stack = await stacks()
    user_id, key = await owner(db)
    _kid, scoped = await agent_key(db, user_id, AGENT)
    a = await stack.connect(token=key)
    b = await stack.connect(bearer=scoped)
    await a.frames_until("drained")
    await b.frames_until("drained")
    mid = await insert_message(db, user_id)
    assert (await a.frame())["message_id"] == mid
    assert (await b.frame())["message_id"] == mid


# ---------------------------------------------------------------------------- closing


@pytest_twisted.ensureDeferred
async def test_revoked_key_closes_its_sockets_with_1008(db, stacks):
    """Revoking an agent key closes its socket (1008 key revoked); the user key's stays open."""
    stack = await stacks()
    user_id, key = await owner(db)
    key_id, scoped = await agent_key(db, user_id, AGENT)
    keep = await stack.connect(token=key)
    doomed = await stack.connect(token=scoped)
    await keep.frames_until("drained")
    await doomed.frames_until("drained")
    await accounts.revoke_api_key(db, user_id, key_id)
    assert await within(doomed.closed) == (1008, "key revoked")
    mid = await insert_message(db, user_id)
    assert (await keep.frame())["message_id"] == mid


@pytest_twisted.ensureDeferred
async def test_deleted_agent_and_mode_change_close_with_1008(db, stacks):
    """Switching to cloud closes with `agent mode changed`; deleting with `agent deleted`."""
    stack = await stacks()
    user_id, key = await owner(db)
    other = await make_agent(db, user_id, "other@agents.test")
    switched = await stack.connect(token=key)
    deleted = await stack.connect(token=key, agent=other)
    await switched.frames_until("drained")
    await deleted.frames_until("drained")

    async def to_cloud(txn: Any) -> None:
        await txn.execute("UPDATE agents SET agent_mode = 'cloud' WHERE id = %s", (AGENT,))
        await txn.notify(CHANNEL_REVOKE, f"agentmode\t{AGENT}")

    await db.run("test_to_cloud", to_cloud)
    assert await within(switched.closed) == (1008, "agent mode changed")
    await agent_store.delete_agent(db, user_id, other)
    assert await within(deleted.closed) == (1008, "agent deleted")


@pytest_twisted.ensureDeferred
async def test_binary_and_oversized_frames_close(db, stacks):
    """Binary → 1003; more than 4096 octets → 1009; exactly 4096 is still accepted."""
    stack = await stacks()
    _user_id, key = await owner(db)
    a = await stack.connect(token=key)
    b = await stack.connect(token=key)
    await a.frames_until("drained")
    await b.frames_until("drained")
    prefix = b'{"type":"ack","message_id":"'
    exact = prefix + b"x" * (4096 - len(prefix) - 2) + b'"}'
    a.sendMessage(exact)
    assert (await a.frame())["code"] == "unknown_message"
    a.sendMessage(exact + b" ")
    assert await within(a.closed) == (1009, "message too big")
    b.sendMessage(b"\x00\x01", isBinary=True)
    assert await within(b.closed) == (1003, "binary frames not supported")


@pytest_twisted.ensureDeferred
async def test_missing_pong_closes_with_1001_ping_timeout(db, stacks):
    """A ping every ping_interval on the injected clock; no pong within ping_timeout → 1001."""
    clock = Clock()
    stack = await stacks(WebSocketConfig(ping_interval=30, ping_timeout=10), clock=clock)
    _user_id, key = await owner(db)
    silent = await stack.connect(token=key, answer_pings=False)
    polite = await stack.connect(token=key)
    await silent.frames_until("drained")
    await polite.frames_until("drained")
    clock.advance(30)
    await within(silent.pings.get())
    await within(polite.pings.get())
    # The pong went out before this frame, so its error reply proves the server saw the pong.
    polite.send_json({"type": "x"})
    assert (await polite.frame())["code"] == "bad_frame"
    clock.advance(10)
    assert await within(silent.closed) == (1001, "ping timeout")
    polite.send_json({"type": "x"})
    assert (await polite.frame())["code"] == "bad_frame"  # still open


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_sockets_with_1001(db, stacks):
    """Stopping the service closes every socket with 1001 `server shutting down`."""
    stack = await stacks()
    _user_id, key = await owner(db)
    client = await stack.connect(token=key)
    await client.frames_until("drained")
    assert stack.service is not None
    await stack.service.stop()
    assert await within(client.closed) == (1001, "server shutting down")


@pytest_twisted.ensureDeferred
async def test_slow_consumer_closes_with_1008_and_mail_stays_unread(db, stacks):
    """More than 1 MiB waiting behind a full transport closes 1008 `slow consumer`."""
    stack = await stacks()
    user_id, key = await owner(db)
    client = await stack.connect(token=key)
    await client.frames_until("drained")
    assert stack.service is not None
    conn = stack.service.registry.connections(AGENT)[0]
    assert conn.transport.producer is conn  # registered in place of twisted.web's HTTPChannel
    conn.pauseProducing()  # what the transport does when its write buffer is full
    mid = await insert_message(db, user_id, subject="x" * (1024 * 1024))
    assert await within(client.closed) == (1008, "slow consumer")
    assert await status_of(db, mid) == "unread"


# ---------------------------------------------------------------------------- cross-process


@pytest_twisted.ensureDeferred
async def test_live_push_and_revocation_reach_sockets_on_another_process(db, stacks):
    """Two services (own LISTEN, pool and site) on one database: both deliver and both close."""
    a = await stacks(own_db=True)
    b = await stacks(own_db=True)
    user_id, _user_key = await owner(db)
    key_id, scoped = await agent_key(db, user_id, AGENT)
    on_a = await a.connect(token=scoped)
    on_b = await b.connect(token=scoped)
    await on_a.frames_until("drained")
    await on_b.frames_until("drained")
    mid = await insert_message(a.db, user_id)  # committed through process A's pool
    assert (await on_a.frame())["message_id"] == mid
    assert (await on_b.frame())["message_id"] == mid
    await accounts.revoke_api_key(b.db, user_id, key_id)
    assert await within(on_a.closed) == (1008, "key revoked")
    assert await within(on_b.closed) == (1008, "key revoked")


@pytest_twisted.ensureDeferred
async def test_access_log_redacts_token(db, stacks):
    """The key in ?token= is written to the access log as ***."""
    stack = await stacks()
    _user_id, key = await owner(db)
    assert stack.api is not None
    site = stack.api.port.factory
    site.logFile = io.StringIO()
    resp = await handshake(stack, token=key)
    assert resp.code == 426
    line = site.logFile.getvalue()
    assert "token=***" in line and key not in line


@pytest_twisted.ensureDeferred
async def test_live_push_reaches_agent_with_capital_local_part(db, stacks):
    """Agent ids keep the local part's case; live events are still found and pushed."""
    stack = await stacks()
    user_id, key = await insert_user_with_key(db)
    await make_agent(db, user_id, "Bot@agents.test")
    client = await stack.connect(token=key, agent="bot@agents.test")
    await client.frames_until("drained")
    live = await insert_message(db, user_id, "Bot@agents.test", subject="live")
    frame = await client.frame()
    assert frame["message_id"] == live and frame["recipient"] == "Bot@agents.test"
