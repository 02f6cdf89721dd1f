"""An e2a HTTP API on a real socket (127.0.0.1, random port) over a per-test database."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any

import treq
from treq.client import HTTPClient

from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from e2a.api.app import ApiApp, ApiDeps
from e2a.config import Config, DnsConfig
from e2a.metrics import E2AMetrics
from e2a.service import Secrets, build_api_services
from e2a.store.database import Database

TEST_MASTER_KEY = bytes(range(32))


def make_test_config(**overrides: Any) -> Config:
    """A development config for tests; keyword overrides replace whole sections or top keys.

    Its data directory is one per test process (:func:`shared_data_dir`): outbound mail
    generates the deployment's DKIM key there once, and the run removes it (tests/conftest.py).
    """
    config = Config(shared_domain="agents.test", data_dir=shared_data_dir())
    return dataclasses.replace(config, **overrides)


@functools.cache
def shared_data_dir() -> str:
    """A data directory shared by every :func:`make_test_config` config of this test process."""
    return tempfile.mkdtemp(prefix="e2a-data-")


@dataclass
class Response:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class ApiServer:
    def __init__(
        self, db: Database, config: Config, dns: Any = None, clock: Any = None, websocket: Any = None
    ) -> None:
        self.db = db
        self.config = config
        clock = clock or reactor
        # The deployment's API services, built as e2a/service.py builds them, minus the blocking
        # pool (DKIM work inline) and reviewer mail; ``websocket``: a started WebSocketService.
        secrets = Secrets(master_key=TEST_MASTER_KEY, hmac_secret=config.signing.hmac_secret)
        services = build_api_services(
            db, config, secrets, clock, pool=None, metrics=E2AMetrics(), websocket=websocket
        )
        self.deps = ApiDeps(
            config=config, db=db, clock=clock, services=services, dns=dns, master_key=TEST_MASTER_KEY
        )
        self.app = ApiApp(self.deps)
        self.port: Any = None
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=self.pool))

    async def start(self) -> ApiServer:
        self.port = reactor.listenTCP(0, self.app.site(), interface="127.0.0.1")
        return self

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        if self.port is not None:
            await self.port.stopListening()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            h.setdefault("Content-Type", "application/json")
        resp = await self.client.request(method, self.url(path), data=data, headers=h)
        body = await treq.content(resp)
        return Response(resp.code, resp.headers, body)


async def insert_user_with_key(db: Database, email: str = "owner@example.com") -> tuple[str, str]:
    """A user and a user-scoped API key straight in SQL (for tests that need a caller).

    Returns (user_id, api_key)."""
    user_id = secrets.token_hex(16)
    key = "e2a_" + secrets.token_hex(32)

    async def _txn(txn: Any) -> None:
        await txn.execute("INSERT INTO users (id, email, name) VALUES (%s, %s, 'test')", (user_id, email))
        await txn.execute(
            "INSERT INTO api_keys (id, user_id, scope, name, key_hash, key_prefix) VALUES (%s, %s, 'user', 'test', %s, %s)",
            ("apk_" + secrets.token_hex(16), user_id, hashlib.sha256(key.encode()).hexdigest(), key[:12]),
        )

    await db.run("test_insert_user", _txn)
    return user_id, key


__all__ = ["ApiServer", "DnsConfig", "Response", "insert_user_with_key", "make_test_config"]
