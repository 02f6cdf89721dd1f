"""check-config's DNS records (config.md §5.3): every record for the shared domain and ``M``,
as zone-file lines a resolver would read back to the same values; and the running-server check."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shlex

import pytest
from cryptography.hazmat.primitives import serialization

from e2a import admin
from e2a.config import Config, ConfigSources, OutboundConfig, OutboundSmtpConfig, SmtpConfig, run_record
from e2a.outbound.dkimsign import deployment_key_path, thd_load_deployment_key

ZONE_LINE = re.compile(r"^(?P<name>\S+)\.\t(?P<ttl>\d+)\tIN\t(?P<type>MX|TXT)\t(?P<rdata>.+)$")


def parse_zone_line(line: str) -> tuple[str, str, str | tuple[int, str]]:
    """(name, type, value) as a resolver sees it: TXT strings joined, MX as (priority, host)."""
    m = ZONE_LINE.match(line)
    assert m, line
    if m["type"] == "MX":
        priority, host = m["rdata"].split()
        return m["name"], "MX", (int(priority), host.rstrip("."))
    strings = shlex.split(m["rdata"], posix=True)
    assert all(len(s.encode()) <= 255 for s in strings), strings
    return m["name"], "TXT", "".join(strings)


def _config(tmp_path, **overrides) -> Config:
    base = Config(
        data_dir=str(tmp_path / "data"),
        shared_domain="agents.example.com",
        smtp=SmtpConfig(domain="mx.example.com"),
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize(
    ("value", "sizes"),
    [("", [0]), ("a" * 255, [255]), ("a" * 256, [255, 1]), ("b" * 410, [255, 155])],
)
def test_txt_strings_split_at_255_octets(value, sizes):
    """A TXT value is cut into ≤ 255-octet strings that join back to the value."""
    parts = admin.txt_strings(value)
    assert [len(p) for p in parts] == sizes and "".join(parts) == value


def test_dns_records_cover_mx_spf_dkim_dmarc_for_shared_domain_and_m(tmp_path):
    """Shared domain: MX, SPF, DKIM (split, matching the key file), DMARC; M: SPF, DKIM, DMARC."""
    config = _config(tmp_path)
    for domain in ("agents.example.com", "mx.example.com"):
        thd_load_deployment_key(config.data_dir, domain)
    records, errors = admin.dns_records(config)
    assert errors == []
    parsed = {(r["domain"], r["purpose"]): parse_zone_line(r["zone_line"]) for r in records}
    assert set(parsed) == {
        ("agents.example.com", "mx"), ("agents.example.com", "spf"), ("agents.example.com", "dkim"),
        ("agents.example.com", "dmarc"), ("mx.example.com", "spf"), ("mx.example.com", "dkim"),
        ("mx.example.com", "dmarc"),
    }
    assert parsed["agents.example.com", "mx"] == ("agents.example.com", "MX", (10, "mx.example.com"))
    assert parsed["agents.example.com", "spf"] == ("agents.example.com", "TXT", "v=spf1 -all")
    assert parsed["agents.example.com", "dmarc"][:2] == ("_dmarc.agents.example.com", "TXT")
    assert parsed["agents.example.com", "dmarc"][2].startswith("v=DMARC1; p=")
    name, _type, value = parsed["agents.example.com", "dkim"]
    assert name == "e2a._domainkey.agents.example.com"
    dkim = next(r for r in records if r["purpose"] == "dkim" and r["domain"] == "agents.example.com")
    assert len(dkim["strings"]) == 2  # a 2048-bit key does not fit one DNS string
    pem = deployment_key_path(config.data_dir, "agents.example.com").read_bytes()
    public = serialization.load_pem_private_key(pem, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert value == "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


def test_dns_records_say_when_the_dkim_key_appears(tmp_path):
    """Before the first start the DKIM record names the file the server creates at start."""
    records, errors = admin.dns_records(_config(tmp_path))
    assert errors == []
    dkim = [r for r in records if r["purpose"] == "dkim"]
    assert all(r["value"] is None and "when the server starts" in r["note"] for r in dkim)
    assert "zone_line" not in dkim[0]


@pytest.mark.parametrize(
    ("overrides", "spf"),
    [
        ({}, "v=spf1 -all"),
        ({"outbound_smtp": OutboundSmtpConfig(host="smtp.relay.example")}, "v=spf1 a:smtp.relay.example ~all"),
        ({"outbound": OutboundConfig(direct_mx=True)}, "v=spf1 a:mx.example.com ~all"),
    ],
)
def test_spf_value_follows_the_outbound_route(tmp_path, overrides, spf):
    """SPF names the host mail leaves from: the relay, this host (direct MX), or none."""
    assert admin.spf_value(_config(tmp_path, **overrides))[0] == spf


def test_custom_domain_records_include_verification_txt(tmp_path):
    """--domain D: MX, verification TXT, SPF, DKIM from the stored key, DMARC."""
    stored = type("D", (), {
        "domain": "corp.example", "verified": False, "verification_token": "e2a-verify=" + "ab" * 16,
        "dkim_selector": "e2a20260427", "dkim_public_key": "QUJD" * 100,
    })()
    records = admin.custom_domain_records(_config(tmp_path), stored)
    parsed = [parse_zone_line(r["zone_line"]) for r in records]
    assert parsed[0] == ("corp.example", "MX", (10, "mx.example.com"))
    assert ("corp.example", "TXT", "e2a-verify=" + "ab" * 16) in parsed
    assert ("e2a20260427._domainkey.corp.example", "TXT", "v=DKIM1; k=rsa; p=" + "QUJD" * 100) in parsed
    assert [p[0] for p in parsed].count("_dmarc.corp.example") == 1


def test_running_server_with_other_sources_is_reported(tmp_path):
    """A live server.json whose shared_domain came from the server's environment is named."""
    config = _config(tmp_path, shared_domain="")
    (tmp_path / "data").mkdir()
    server = run_record(
        _config(tmp_path), ConfigSources(None, ("E2A_SHARED_DOMAIN",)), os.getpid(), "2026-01-01T00:00:00Z"
    )
    (tmp_path / "data" / "server.json").write_text(json.dumps(server))
    warnings = admin.running_server_warnings(config, ConfigSources(None, ()))
    assert any("shared_domain" in w and "agents.example.com" in w for w in warnings), warnings
    assert any("E2A_SHARED_DOMAIN" in w for w in warnings)
    assert admin.running_server_warnings(_config(tmp_path), ConfigSources(None, ("E2A_SHARED_DOMAIN",))) == []


def test_stale_server_record_is_ignored(tmp_path):
    """A server.json left by a process that no longer runs says nothing."""
    (tmp_path / "data").mkdir()
    record = run_record(_config(tmp_path), ConfigSources(None, ("E2A_SHARED_DOMAIN",)), 2**22 + 12345, "")
    (tmp_path / "data" / "server.json").write_text(json.dumps(record))
    assert admin.running_server_warnings(_config(tmp_path, shared_domain=""), ConfigSources(None, ())) == []
