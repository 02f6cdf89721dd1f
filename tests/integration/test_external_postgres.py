"""docs/deployment.md on a separately started PostgreSQL (not the embedded one): e2a refuses to
start on an unmigrated database with ``database.auto_migrate: false``, ``e2a-admin migrate``
upgrades it, e2a serves from it, a ``pg_dump`` of it restores into a new database that e2a then
serves with the same users, keys and mail — and the database password never reaches the log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from e2a.config import load_config
from e2a.service import build_service
from tests.support.externalpg import find_bindir, start_external_postgres

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_bindir() is None, reason="no PostgreSQL server binaries on this machine"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def external_pg():
    server = start_external_postgres()
    yield server
    server.stop()


def _write_config(tmp: Path, url: str, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(tmp / f"{name}-data"),
        "shared_domain": "agents.test",
        "database": {"url": url, "auto_migrate": False, "pool_size": 4},
        "http": {"listen_addr": "127.0.0.1:0"},
        "smtp": {"listen_addr": "127.0.0.1:0", "domain": "mx.e2a.test"},
        "signing": {"hmac_secret": "external-pg-test-hmac-secret-0123456789", "master_key_file": str(tmp / "master.key")},
    }), encoding="utf-8")
    return path


def _admin(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "e2a.admin", "--config", str(config), *args], capture_output=True,
                          text=True, cwd=REPO, check=False)


async def _start(config_path: Path) -> Any:
    service = build_service(load_config(str(config_path), environ={}), reactor, standalone=False)
    service.startService()
    await service.started
    return service


async def _call(service: Any, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    base = f"http://127.0.0.1:{service.http_port.getHost().port}"
    data = None if body is None else json.dumps(body).encode()
    resp = await treq.request(method, base + path, data=data, headers={"Authorization": f"Bearer {key}"},
                              persistent=False)
    return resp.code, json.loads(await treq.content(resp) or b"null")


@pytest_twisted.ensureDeferred
async def test_external_postgres_migrate_serve_dump_restore(external_pg, tmp_path):
    """The deployment guide's database steps, in order, against a real separate server."""
    import base64

    (tmp_path / "master.key").write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    config = _write_config(tmp_path, external_pg.url("e2a"), "e2a")
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    service = restored = None
    try:
        # 1. Unmigrated database + auto_migrate off: the start fails and names the fix.
        unmigrated = build_service(load_config(str(config), environ={}), reactor, standalone=False)
        unmigrated.startService()
        with pytest.raises(Exception, match="e2a-admin migrate"):
            await unmigrated.started
        await unmigrated.stopService()

        # 2. e2a-admin migrate (the upgrade step), then a second run has nothing to do.
        first = _admin(config, "migrate")
        assert first.returncode == 0, first.stderr
        again = _admin(config, "migrate")
        assert again.returncode == 0 and again.stdout == "schema is up to date\n", again.stdout
        assert first.stdout.startswith("applied  0001_init"), first.stdout

        # 3. e2a serves from it; e2a-admin bootstrap works beside the running server.
        service = await _start(config)
        assert service.embedded is None and service.dsn == external_pg.url("e2a")
        boot = _admin(config, "bootstrap", "--email", "ops@example.com", "--json")
        assert boot.returncode == 0, boot.stderr
        key = json.loads(boot.stdout)["api_key"]["key"]
        code, _ = await _call(service, "POST", "/api/v1/agents", key, {"slug": "alpha", "agent_mode": "local"})
        assert code == 201
        code, _ = await _call(service, "POST", "/api/v1/agents", key, {"slug": "beta", "agent_mode": "local"})
        assert code == 201
        code, sent = await _call(service, "POST", "/api/v1/send", key,
                                 {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "backup me",
                                  "body": "hello"})
        assert code == 200, sent

        # 4. pg_dump (custom format) while e2a runs; restore into a new database.
        dump = tmp_path / "e2a.dump"
        external_pg.tool("pg_dump", "-h", "127.0.0.1", "-p", str(external_pg.port), "-U", "e2a", "-Fc",
                         "-f", str(dump), "e2a")
        external_pg.psql("CREATE DATABASE e2a_restored OWNER e2a")
        external_pg.tool("pg_restore", "-h", "127.0.0.1", "-p", str(external_pg.port), "-U", "e2a",
                         "--no-owner", "-d", "e2a_restored", str(dump))
        await service.stopService()
        service = None

        # 5. e2a on the restored database: no migration pending, same key, same mail.
        restored_config = _write_config(tmp_path, external_pg.url("e2a_restored"), "restored")
        restored = await _start(restored_config)
        code, inbox = await _call(restored, "GET", "/api/v1/agents/beta@agents.test/messages", key)
        assert code == 200 and [m["subject"] for m in inbox["messages"]] == ["backup me"], inbox
    finally:
        globalLogPublisher.removeObserver(observe)
        for s in (service, restored):
            if s is not None and s.running:
                await s.stopService()

    text = "\n".join(lines)
    assert "e2a started" in text
    assert external_pg.password not in text
    assert f"e2a:***@127.0.0.1:{external_pg.port}/e2a" in text
