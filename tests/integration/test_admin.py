"""``python -m e2a.admin`` as a subprocess against a temporary data dir (embedded PostgreSQL)."""

from __future__ import annotations

import base64
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


@pytest.fixture
def tmp_path():
    """A data dir parent the embedded server's system user can reach when run as root (pytest's
    own temporary base is 0700 and e2a changes nothing outside its data dir)."""
    import shutil

    from tests.support.dirs import reachable_tmpdir

    path = reachable_tmpdir("e2a-admin-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
    # the Standard Webhooks form (stderr: stdout stays the three lines of the contract)
    whsec = "whsec_" + base64.b64encode(m_secret.group(1).encode("ascii")).decode("ascii")
    assert f"Standard Webhooks libraries take the signing secret as: {whsec}\n" in proc.stderr
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
    assert report["sources"] == {
        "config_file": None, "env_keys": ["E2A_DATA_DIR", "E2A_HMAC_SECRET", "E2A_SHARED_DOMAIN", "E2A_SMTP_DOMAIN"]
    }
    records = report["dns_records"]
    mx = records[0]
    assert (mx["type"], mx["name"], mx["value"], mx["priority"]) == ("MX", "agents.example.net", "mx.example.net", 10)
    assert mx["zone_line"] == "agents.example.net.\t3600\tIN\tMX\t10 mx.example.net."
    assert [(r["domain"], r["purpose"]) for r in records] == [
        ("agents.example.net", "mx"), ("agents.example.net", "spf"), ("agents.example.net", "dkim"),
        ("agents.example.net", "dmarc"), ("mx.example.net", "spf"), ("mx.example.net", "dkim"),
        ("mx.example.net", "dmarc"),
    ]
    dkim = [r for r in records if r["purpose"] == "dkim"]
    assert [r["name"] for r in dkim] == ["e2a._domainkey.agents.example.net", "e2a._domainkey.mx.example.net"]
    assert all("when the server starts" in r["note"] for r in dkim)
    assert not (tmp_path / "data" / "master.key").exists()  # checking creates nothing


@pytest_twisted.ensureDeferred
async def test_check_config_text_prints_pasteable_records_and_custom_domain(tmp_path):
    """Text output: zone-file lines per domain; --domain D prints D's records incl. the verification TXT."""
    env = {"E2A_SHARED_DOMAIN": "agents.example.net", "E2A_SMTP_DOMAIN": "mx.example.net"}
    proc = await threads.deferToThread(run_admin, tmp_path, "check-config", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  environment: E2A_DATA_DIR, E2A_SHARED_DOMAIN, E2A_SMTP_DOMAIN" in proc.stdout
    lines = proc.stdout.splitlines()
    assert "agents.example.net.\t3600\tIN\tMX\t10 mx.example.net." in lines
    assert "agents.example.net.\t3600\tIN\tTXT\t\"v=spf1 -all\"" in lines
    assert "_dmarc.agents.example.net.\t3600\tIN\tTXT\t\"v=DMARC1; p=none\"" in lines

    proc = await threads.deferToThread(run_admin, tmp_path, "bootstrap", "--email", "ops@example.com", env=env)
    assert proc.returncode == 0, proc.stderr
    master = resolve_master_key(Config(data_dir=str(tmp_path / "data")))

    async def claim(db):
        from datetime import UTC, datetime

        from e2a.store import domains

        user = await db.fetchone("SELECT id FROM users WHERE email = 'ops@example.com'")
        return await domains.claim_domain(
            db, user["id"], "corp.example", master_key=master, takeover_hours=72, now=datetime.now(UTC)
        )

    stored = await _with_db(tmp_path, claim)
    proc = await threads.deferToThread(run_admin, tmp_path, "check-config", "--domain", "Corp.Example.", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "; ---- corp.example" in lines and "; ---- agents.example.net" not in lines
    assert "corp.example.\t3600\tIN\tMX\t10 mx.example.net." in lines
    assert f"corp.example.\t3600\tIN\tTXT\t\"{stored.verification_token}\"" in lines
    dkim = [line for line in lines if line.startswith(f"{stored.dkim_selector}._domainkey.corp.example.\t")]
    assert len(dkim) == 1 and dkim[0].count('" "') == 1  # two DNS strings
    assert "".join(re.findall(r'"([^"]*)"', dkim[0])) == f"v=DKIM1; k=rsa; p={stored.dkim_public_key}"

    proc = await threads.deferToThread(run_admin, tmp_path, "check-config", "--domain", "unknown.example", env=env)
    assert proc.returncode == 2 and "unknown.example is not registered" in proc.stderr
