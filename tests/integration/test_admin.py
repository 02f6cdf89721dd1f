"""``python -m e2a.admin`` as a subprocess against a temporary data dir (embedded PostgreSQL)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import reactor, threads

from e2a.api.auth import authenticate_key
from e2a.config import Config, resolve_master_key
from e2a.store import accounts
from e2a.store.database import Database
from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings

pytestmark = pytest.mark.slow


def run_admin(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    clean["E2A_DATA_DIR"] = str(tmp_path / "data")
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "e2a.admin", *args],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _with_db(tmp_path: Path, fn):
    """Start the data dir's embedded PostgreSQL, run ``await fn(db)``, stop it again."""
    server = EmbeddedPostgres(EmbeddedSettings(tmp_path / "data" / "pg"))
    await threads.deferToThread(server.thd_start)
    try:
        db = Database(server.dsn, 1, reactor)
        await db.start()
        try:
            return await fn(db)
        finally:
            db.close()
    finally:
        await threads.deferToThread(server.thd_stop)


@pytest_twisted.ensureDeferred
async def test_bootstrap_prints_three_lines_and_the_key_authenticates(tmp_path):
    """bootstrap creates the user, prints the exact 3-line format, and the key and secret are real."""
    proc = await threads.deferToThread(run_admin, tmp_path, "bootstrap", "--email", "Ops@Example.COM")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    m_user = re.fullmatch(r"User:    ops@example\.com \(id=([0-9a-f]{32})\)", lines[0])
    m_key = re.fullmatch(r"API key: (e2a_[0-9a-f]{64})", lines[1])
    m_secret = re.fullmatch(r"Signing secret: ([0-9a-f]{64}) \(id=(wsec_[0-9a-f]{32})\)", lines[2])
    assert m_user and m_key and m_secret, proc.stdout
    assert "only once" in proc.stderr
    master = resolve_master_key(Config(data_dir=str(tmp_path / "data")))

    async def check(db):
        principal = await authenticate_key(db, m_key.group(1))
        assert principal.user_id == m_user.group(1) and principal.is_user_scoped
        assert await accounts.active_secrets(db, master, principal.user_id) == [m_secret.group(1)]
        (key,) = await accounts.list_api_keys(db, principal.user_id)
        assert key.name == "bootstrap"

    await _with_db(tmp_path, check)
    assert not (tmp_path / "data" / "pg" / "postmaster.pid").exists()  # stopped again


def test_bootstrap_json_reuses_existing_user(tmp_path):
    """--json prints one object; a second run keeps the user and secret and adds a new key."""
    first = run_admin(tmp_path, "bootstrap", "--email", "ops@example.com", "--json")
    second = run_admin(tmp_path, "bootstrap", "--email", "OPS@example.com", "--json")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert list(a) == ["user", "api_key", "signing_secret"]
    assert set(a["user"]) == {"id", "email"} and set(a["api_key"]) == {"id", "key"}
    assert set(a["signing_secret"]) == {"id", "secret"}
    assert a["user"] == b["user"] and a["signing_secret"] == b["signing_secret"]
    assert a["api_key"]["key"] != b["api_key"]["key"] and b["api_key"]["id"].startswith("apk_")


def test_bootstrap_rejects_bad_email_with_exit_2(tmp_path):
    """A malformed --email is a usage error."""
    proc = run_admin(tmp_path, "bootstrap", "--email", "not an address")
    assert proc.returncode == 2 and "--email" in proc.stderr


def test_migrate_status_lists_applied_files(tmp_path):
    """migrate applies the schema; --status then lists it as applied."""
    assert run_admin(tmp_path, "migrate").returncode == 0
    proc = run_admin(tmp_path, "migrate", "--status")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and "applied  0001_init" in lines
    assert not any(line.startswith("pending") for line in lines)


def test_check_config_exits_2_naming_the_bad_key(tmp_path):
    """An unknown YAML key and a bad env value are errors that name the key; exit 2."""
    (tmp_path / "bad.yaml").write_text("smtp:\n  domian: x.example\n")
    proc = run_admin(tmp_path, "--config", "bad.yaml", "check-config", env={"E2A_SMTP_MAX_RECIPIENTS": "many"})
    assert proc.returncode == 2
    assert "smtp.domian" in proc.stdout and "E2A_SMTP_MAX_RECIPIENTS" in proc.stdout
    assert "smtp.domian" in proc.stderr


def test_check_config_json_shows_redacted_config_and_dns_records(tmp_path):
    """A good config exits 0 with secrets as *** and MX/DKIM records for shared domain and M."""
    proc = run_admin(
        tmp_path,
        "check-config",
        "--json",
        env={"E2A_SHARED_DOMAIN": "agents.example.net", "E2A_HMAC_SECRET": "s" * 40, "E2A_SMTP_DOMAIN": "mx.example.net"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["errors"] == []
    assert report["config"]["signing"]["hmac_secret"] == "***"
    records = report["dns_records"]
    assert records[0] == {"type": "MX", "name": "agents.example.net", "value": "mx.example.net", "priority": 10}
    assert [r["name"] for r in records[1:]] == ["e2a._domainkey.agents.example.net", "e2a._domainkey.mx.example.net"]
    assert all("generated at first start" in r["note"] for r in records[1:])
    assert not (tmp_path / "data" / "master.key").exists()  # checking creates nothing
