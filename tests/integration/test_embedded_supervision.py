"""The embedded PostgreSQL under supervision: a SIGKILLed postmaster comes back and e2a serves
again (SMTP 250, /api/ready 200, LISTEN/NOTIFY) without restarting e2a (e2a.store.embedded)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
import treq

from twisted.internet import reactor

from e2a.config import Config, DatabaseConfig, DnsConfig, HttpConfig, SmtpConfig
from e2a.service import build_service
from e2a.store import accounts
from e2a.store.embedded import pid_alive
from tests.support.mail import make_message, send_mail
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def _base_dir() -> Path:
    base = Path(tempfile.mkdtemp(prefix="e2a-sup-"))
    base.chmod(0o755)  # as root, the embedded server's system user must reach the data dir
    return base


@pytest_twisted.ensureDeferred
async def test_killed_postmaster_is_restarted_and_mail_is_accepted_again(dns_zone):
    """SIGKILL the embedded postmaster of a running e2a: it is restarted with back-off, SMTP
    answers 250 and /api/ready 200 again, and the LISTEN connection is back, all without
    restarting e2a; a clean stop then stops the restarted server."""
    base = _base_dir()
    config = Config(
        data_dir=str(base / "data"),
        shared_domain="agents.test",
        database=DatabaseConfig(url="", pool_size=4),
        http=HttpConfig(listen_addr="127.0.0.1:0"),
        smtp=SmtpConfig(listen_addr="127.0.0.1:0", domain="mx.e2a.test", store_timeout=5),
        dns=DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=2),
    )
    service = build_service(config, reactor, standalone=False)
    service.startService()
    try:
        await service.started
        boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
        await service.db.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) "
            "VALUES (%s, %s, 'agents.test', 'local', 'none')",
            ("bot@agents.test", boot.user.id),
        )
        smtp_port = service.smtp_port.getHost().port
        http = f"http://127.0.0.1:{service.http_port.getHost().port}"
        counter = iter(range(10_000))

        async def mail_code() -> int:
            msg = make_message(from_addr="a@example.org", to_addr="bot@agents.test",
                               message_id=f"<s{next(counter)}@example.org>")
            try:
                return (await send_mail(smtp_port, "a@example.org", ["bot@agents.test"], msg)).code
            except AssertionError:
                return 0  # a 4xx before DATA while the database is down

        assert await mail_code() == 250
        old_pid = service.embedded.postmaster_pid
        assert old_pid and pid_alive(old_pid)

        killed_at = reactor.seconds()
        os.kill(old_pid, signal.SIGKILL)

        async def postmaster_replaced() -> bool:
            pid = service.embedded.postmaster_pid
            return pid is not None and pid != old_pid and pid_alive(pid)

        await wait_for(postmaster_replaced, timeout=60, step=0.1)

        async def mail_accepted() -> bool:
            return await mail_code() == 250

        await wait_for(mail_accepted, timeout=60, step=0.2)
        print(f"postmaster SIGKILL -> SMTP 250 again in {reactor.seconds() - killed_at:.2f} s")

        async def ready() -> bool:
            resp = await treq.get(f"{http}/api/ready", persistent=False)
            await treq.content(resp)
            return resp.code == 200

        await wait_for(ready, timeout=30, step=0.2)

        # LISTEN is back: a NOTIFY committed now reaches this process's listener.
        heard: list[str] = []
        unsubscribe = service.events.subscribe("e2a_revoke", heard.append)
        try:
            async def notified() -> bool:
                await service.db.execute("SELECT pg_notify('e2a_revoke', 'probe')")
                return "probe" in heard

            await wait_for(notified, timeout=30, step=0.2)
        finally:
            unsubscribe()
        new_pid = service.embedded.postmaster_pid
    finally:
        if service.running:
            await service.stopService()
    assert not pid_alive(new_pid)
    assert not (base / "data" / "pg" / "postmaster.pid").exists()
