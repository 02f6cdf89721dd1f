"""Nothing accepted is lost: SIGKILL the real twistd process after the 250 and before the
webhook succeeds, restart it, and the message is delivered."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import defer, reactor
from twisted.web import resource, server

from e2a.store import accounts
from tests.integration.test_twistd import REPO, TWISTD, _clean_env, _Collect, free_port
from tests.support.mail import make_message, send_mail
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow
MASTER_KEY_HEX = "11" * 32


class Sink(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: defer.Deferred[dict] = defer.Deferred()

    def render_POST(self, request):  # noqa: N802
        body = json.loads(request.content.read())
        if not self.received.called:
            self.received.callback(body)
        return b"ok"


async def _start_twistd(env: dict[str, str], workdir: Path) -> tuple[_Collect, object]:
    proto = _Collect()
    transport = reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], env=env, path=str(workdir)
    )
    await proto.started_line.addTimeout(120, reactor)
    return proto, transport


@pytest_twisted.ensureDeferred
async def test_sigkill_after_250_then_restart_delivers(db, db_dsn):
    """The delivery job committed with the message survives a crash and runs after restart."""
    key = bytes.fromhex(MASTER_KEY_HEX)
    boot = await accounts.bootstrap(db, key, "owner@example.com")
    sink_port = free_port()
    await db.execute(
        "INSERT INTO domains (domain, user_id, is_shared, verified) VALUES ('agents.test', NULL, TRUE, TRUE)"
        " ON CONFLICT DO NOTHING"
    )
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
        " VALUES ('hook@agents.test', %s, 'agents.test', 'cloud', %s, 'active')",
        (boot.user.id, f"http://127.0.0.1:{sink_port}/hook"),
    )
    workdir = Path(tempfile.mkdtemp(prefix="e2a-crash-"))
    smtp_port = free_port()
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_DATABASE_URL=db_dsn,
        E2A_MASTER_KEY=MASTER_KEY_HEX,
        E2A_SHARED_DOMAIN="agents.test",
        E2A_HTTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        E2A_SMTP_LISTEN_ADDR=f"127.0.0.1:{smtp_port}",
        E2A_DNS_NAMESERVERS=f"127.0.0.1:{free_port()}",  # nobody answers: SPF/DKIM temperror, fine
        E2A_DNS_TIMEOUT="1",
        E2A_WEBHOOKS_ALLOW_PRIVATE="true",
        E2A_WEBHOOKS_RETRY_SCHEDULE="1,1,1,1,1,1,1,1,1,1,1",
        E2A_WEBHOOKS_JITTER="0",
        E2A_WEBHOOKS_TIMEOUT="2",
    )
    proto, transport = await _start_twistd(env, workdir)
    message = make_message(from_addr="alice@example.org", to_addr="hook@agents.test", message_id="<crash@x>")
    reply = await send_mail(smtp_port, "alice@example.org", ["hook@agents.test"], message)
    assert reply.code == 250, reply
    msg_id = reply.text.rsplit(" ", 1)[1]

    async def attempted() -> bool:
        row = await db.fetchone("SELECT attempts FROM deliveries WHERE message_id = %s", (msg_id,))
        return row is not None and row["attempts"] >= 1

    await wait_for(attempted)  # the sink is not up yet: the first attempt failed
    transport.signalProcess(signal.SIGKILL)
    await proto.ended.addTimeout(30, reactor)

    sink = Sink()
    port = reactor.listenTCP(sink_port, server.Site(sink), interface="127.0.0.1")
    try:
        proto2, transport2 = await _start_twistd(env, workdir)
        body = await sink.received.addTimeout(60, reactor)
        assert body["message_id"] == msg_id and body["recipient"] == "hook@agents.test"

        async def delivered() -> bool:
            row = await db.fetchone("SELECT status FROM deliveries WHERE message_id = %s", (msg_id,))
            return row["status"] == "delivered"

        await wait_for(delivered)
        transport2.signalProcess(signal.SIGTERM)
        await proto2.ended.addTimeout(60, reactor)
        assert "Traceback" not in proto2.output.decode(errors="replace")
    finally:
        await port.stopListening()
