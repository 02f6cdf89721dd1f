"""Every key of docs/configuration.md has an observable effect (issue 14: no documented key may
be inert).

The walk: the key table of docs/configuration.md is parsed; ``CHECKS`` must name exactly those
keys (a new documented key without a check fails here). Most keys are set, all at once and to
non-default values, in one YAML file that a whole service is started from (``load_config``, the
same path twistd takes); each key's check then looks at what the running service built from it —
a listener address, an SMTP greeting or EHLO keyword, an HTTP answer, a rate limit that bites, or
the value inside the component that applies it (the SMTP factory, the workers, the token signer,
the DNS client). Keys that cannot share that service (``env``, ``processes``, ``cpu_affinity``,
``colocate_threads`` off, ``database.auto_migrate``, ``metrics.enabled``,
``signing.master_key_file``, ``outbound.direct_mx``, ``logging.*``) are checked on their own, as
cheaply as their effect allows.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml

from twisted.internet import defer, reactor

from e2a.config import Config, load_config
from tests.conftest import drop_database, fresh_database

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
WALKER = "walker@agents.test"
MASTER_KEY = base64.b64encode(bytes(range(100, 132))).decode()
HMAC = "walker-hmac-secret-0123456789abcdefghij"


def documented_keys() -> list[str]:
    """The keys of the reference table (``| `key` | default | environment |``)."""
    keys = []
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([a-z_]+(?:\.[a-z_]+)?)` \| ", line)
        if m:
            keys.append(m.group(1))
    return keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _self_signed(tmp: Path) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    pem = _pem_key()
    key = serialization.load_pem_private_key(pem, None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.walk.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    (tmp / "smtp.key").write_bytes(pem)
    (tmp / "smtp.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(tmp / "smtp.crt"), str(tmp / "smtp.key")


def walker_yaml(tmp: Path, dsn: str) -> dict[str, Any]:
    """Every shareable key at a non-default value."""
    cert, key = _self_signed(tmp)
    (tmp / "dkim.pem").write_bytes(_pem_key())
    return {
        "env": "development",
        "data_dir": str(tmp / "walker-data"),
        "shared_domain": "agents.test",
        "processes": 1,
        "smtp": {
            "listen_addr": f"127.0.0.1:{_free_port()}", "domain": "mx.walk.test", "authserv_id": "auth.walk.test",
            "tls_cert": cert, "tls_key": key, "max_message_size": 204800, "max_recipients": 3,
            "max_line_length": 900, "max_command_length": 400, "max_header_size": 50000, "max_connections": 77,
            "max_connections_per_ip": 5, "idle_timeout": 111, "data_timeout": 222, "session_timeout": 333,
            "max_errors": 4, "max_messages_per_session": 6, "store_timeout": 17,
        },
        "http": {"listen_addr": f"127.0.0.1:{_free_port()}", "public_url": "http://walk.test",
                 "trusted_proxies": ["198.51.100.0/24"], "max_connections": 55, "max_connections_per_ip": 9,
                 "header_timeout": 13, "request_timeout": 44},
        "metrics": {"token": "walker-metrics-token"},
        "websocket": {"allowed_origins": ["https://app.walk.test"], "max_connections_per_agent": 1,
                      "ping_interval": 7, "ping_timeout": 3, "drain_page_size": 5},
        "rate_limits": {"send_per_minute": 1, "register_per_hour": 1, "poll_per_minute": 1, "feedback_per_hour": 1},
        "database": {"url": dsn, "pool_size": 3},
        "dns": {"nameservers": ["127.0.0.1:5399"], "timeout": 2},
        "signing": {"hmac_secret": HMAC, "master_key": MASTER_KEY},
        "dkim": {"selector": "walksel", "keys": [{"domain": "mx.walk.test", "selector": "k2026",
                                                  "key_file": str(tmp / "dkim.pem")}]},
        "outbound_smtp": {"host": "127.0.0.1", "port": 2599, "username": "relayuser", "password": "relaypass",
                          "from_domain": "mail.walk.test", "tls": "none", "tls_verify": False},
        "outbound": {"mx_port": 2526, "helo_name": "helo.walk.test", "max_recipients": 4, "max_queue_age": 999},
        "webhooks": {"timeout": 3, "retry_schedule": [1, 2], "jitter": 0.0, "retry_after_cap": 99,
                     "max_concurrency_per_agent": 2, "allow_private": True},
        "domains": {"auto_verify": True, "claim_takeover_hours": 5},
        "hitl": {"notify": False, "sweep_interval": 77, "token_grace": 88},
        "retention": {"days": 9, "sweep_interval": 99},
        "usage": {"tracking": True},
    }


@dataclass
class Walk:
    service: Any
    config: Config
    raw: dict[str, Any]
    key: str
    base: str
    tmp: Path

    async def api(self, method: str, path: str, body: Any = None, key: str | None = "") -> Any:
        headers = {}
        token = self.key if key == "" else key
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        resp = await treq.request(method, self.base + path, data=data, headers=headers, persistent=False)
        return resp.code, await treq.content(resp)

    async def ehlo(self) -> tuple[str, list[str]]:
        from tests.support import smtpclient

        client = await smtpclient.connect(self.service.smtp_port.getHost().port)
        greeting = await client.reply()
        r = await client.command("EHLO client.example.org")
        await client.command("QUIT")
        await client.wait_closed()
        return str(greeting), [str(r)]


@pytest.fixture(scope="module")
def walk(pg_server, template_dsn, tmp_path_factory):
    """One service started from the walker YAML, with a user, a key and a local agent (SQL, so the
    rate limits under test are untouched)."""
    from e2a.service import build_service
    from e2a.store import accounts

    tmp = tmp_path_factory.mktemp("walk")
    dsn = fresh_database(pg_server, template_dsn)
    raw = walker_yaml(tmp, dsn)
    path = tmp / "e2a.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(str(path), environ={}, cwd=tmp)
    service = build_service(config, reactor, standalone=False)

    async def start() -> Walk:
        service.startService()
        await service.started
        boot = await accounts.bootstrap(service.db, service.master_key, "walker-owner@example.com")
        for agent in (WALKER, "walker2@agents.test", "walker3@agents.test"):
            await service.db.execute(
                "INSERT INTO agents (id, user_id, domain, agent_mode) VALUES (%s, %s, 'agents.test', 'local')",
                (agent, boot.user.id),
            )
        return Walk(service, config, raw, boot.api_key_plaintext,
                    f"http://127.0.0.1:{service.http_port.getHost().port}", tmp)

    handle = pytest_twisted.blockon(defer.ensureDeferred(start()))
    yield handle
    pytest_twisted.blockon(defer.ensureDeferred(service.stopService()))
    drop_database(pg_server, dsn)


Check = Callable[[Any, Any], Awaitable[None]]
CHECKS: dict[str, Check] = {}


def check(*keys: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        for k in keys:
            assert k not in CHECKS, k
            CHECKS[k] = fn
        return fn

    return register


def _port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# ---- top level -------------------------------------------------------------------------------


@check("env")
async def _env(walk: Walk, request: Any) -> None:
    """production: the production rules apply (the development config is refused as a whole)."""
    from e2a.config import validate

    assert validate(walk.config) == []
    problems = " ".join(validate(Config(env="production", webhooks=walk.config.webhooks)))
    assert "database.url" in problems and "webhooks.allow_private" in problems


@check("data_dir")
async def _data_dir(walk: Walk, request: Any) -> None:
    """The run record and the shared domain's DKIM key are written into data_dir."""
    data = Path(walk.raw["data_dir"])
    assert (data / "server.json").is_file()
    assert any((data / "dkim").iterdir())


@check("shared_domain")
async def _shared_domain(walk: Walk, request: Any) -> None:
    """/api/v1/info reports it and its row exists, system-owned and verified."""
    code, body = await walk.api("GET", "/api/v1/info", key=None)
    assert json.loads(body)["shared_domain"] == "agents.test"
    row = await walk.service.db.fetchone("SELECT verified, is_shared FROM domains WHERE domain = 'agents.test'")
    assert row["verified"] and row["is_shared"]


@check("processes")
async def _processes(walk: Walk, request: Any) -> None:
    """processes: 3 → the pool runs two children and tells each the count (the real twistd run is
    tests/integration/test_processes.py and test_metrics_processes.py)."""
    import dataclasses

    from e2a.processes import ProcessPool

    pool = ProcessPool(reactor, dataclasses.replace(walk.config, processes=3), "dbname=x", {"http": 3, "smtp": 4})
    assert pool.count == 3 and pool.spec_for(2).count == 3


@check("cpu_affinity")
async def _cpu_affinity(walk: Walk, request: Any) -> None:
    """[c]: the service built from it is to pin its process to c; a CPU the process may not use,
    its own or another process's of ``processes: N``, stops the build naming the key. Pinning
    itself (every thread, the children, the embedded database on all CPUs) is checked on a real
    twistd: tests/integration/test_processes.py."""
    import dataclasses
    import os

    from e2a import affinity
    from e2a.errors import ConfigError
    from e2a.service import build_service

    if not affinity.supported():
        pytest.skip("per-thread CPU affinity is Linux only")
    allowed = sorted(os.sched_getaffinity(0))
    config = dataclasses.replace(walk.config, cpu_affinity=(allowed[-1],), data_dir=str(walk.tmp / "cpus"))
    assert build_service(config, reactor, standalone=False).cpu == allowed[-1]
    unusable = next(c for c in range(1024) if c not in allowed)
    with pytest.raises(ConfigError, match=f"cpu_affinity: CPU {unusable} is not available"):
        build_service(dataclasses.replace(config, cpu_affinity=(unusable,)), reactor, standalone=False)
    with pytest.raises(ConfigError, match=f"cpu_affinity: CPU {unusable} is not available"):
        build_service(
            dataclasses.replace(config, processes=2, cpu_affinity=(allowed[0], unusable)), reactor, standalone=False
        )


@check("colocate_threads")
async def _colocate_threads(walk: Walk, request: Any) -> None:
    """On (the walker leaves the default): a call handed to the mail-auth pool runs on the one CPU
    its thread was just moved to, the reactor thread's, under SCHED_BATCH (the reactor thread
    keeps the default policy). Off, or with ``cpu_affinity`` (every thread on one CPU already),
    the service builds no follower; off, it does not ask for SCHED_BATCH either, unless
    ``cpu_affinity`` puts the threads on the reactor's CPU. The threads following the caller
    from CPU to CPU, and a pool's threads under SCHED_BATCH after each start:
    tests/unit/test_affinity.py."""
    import dataclasses
    import os

    from e2a import affinity
    from e2a.service import build_service
    from tests.support.cpus import can_batch

    if affinity.current_cpu_reader() is None:
        pytest.skip("no sched_getcpu: the setting does nothing here")
    follower = walk.service.thread_follower
    assert follower is not None and walk.service.mailauth_pool._follower is follower
    mask = await walk.service.mailauth_pool.run(os.sched_getaffinity, 0)
    assert mask == {follower.cpu}
    assert walk.service.batch_mailauth_threads
    if can_batch():  # else: a runner under another policy, or a sandbox that refuses it
        policies = {os.sched_getscheduler(tid) for tid in walk.service.mailauth_pool.thread_ids}
        assert walk.service.mailauth_pool.batched
        assert policies == {os.SCHED_BATCH} and os.sched_getscheduler(0) == os.SCHED_OTHER
    config = dataclasses.replace(walk.config, data_dir=str(walk.tmp / "colocate"))
    off = build_service(dataclasses.replace(config, colocate_threads=False), reactor, standalone=False)
    assert off.thread_follower is None and not off.batch_mailauth_threads
    cpu = sorted(os.sched_getaffinity(0))[0]
    for colocate in (True, False):
        pinned = build_service(
            dataclasses.replace(config, cpu_affinity=(cpu,), colocate_threads=colocate), reactor, standalone=False
        )
        assert pinned.thread_follower is None and pinned.batch_mailauth_threads


# ---- smtp ------------------------------------------------------------------------------------


@check("smtp.listen_addr", "http.listen_addr")
async def _listen(walk: Walk, request: Any) -> None:
    """Both listeners are bound exactly where configured."""
    assert walk.service.smtp_port.getHost().port == _port_of(walk.raw["smtp"]["listen_addr"])
    assert walk.service.http_port.getHost().port == _port_of(walk.raw["http"]["listen_addr"])


@check("smtp.domain")
async def _smtp_domain(walk: Walk, request: Any) -> None:
    """The greeting names it."""
    greeting, _ = await walk.ehlo()
    assert greeting.startswith("220 mx.walk.test ")


@check("smtp.tls_cert", "smtp.tls_key")
async def _smtp_tls(walk: Walk, request: Any) -> None:
    """STARTTLS is offered (it is not without a certificate)."""
    _, ehlo = await walk.ehlo()
    assert "STARTTLS" in ehlo[0]


@check("smtp.max_message_size")
async def _smtp_size(walk: Walk, request: Any) -> None:
    """EHLO advertises SIZE 204800."""
    _, ehlo = await walk.ehlo()
    assert "SIZE 204800" in ehlo[0]


@check("smtp.authserv_id")
async def _authserv(walk: Walk, request: Any) -> None:
    """The inbound pipeline writes trace headers under this authserv-id."""
    assert walk.service.inbound.authserv_id == "auth.walk.test"


@check("smtp.store_timeout")
async def _store_timeout(walk: Walk, request: Any) -> None:
    """Verification's DNS budget is 80 % of it."""
    assert walk.service.verifier._budget == pytest.approx(17 * 0.8)


@check(
    "smtp.max_recipients", "smtp.max_line_length", "smtp.max_command_length", "smtp.max_header_size",
    "smtp.max_connections", "smtp.max_connections_per_ip", "smtp.idle_timeout", "smtp.data_timeout",
    "smtp.session_timeout", "smtp.max_errors", "smtp.max_messages_per_session",
)
async def _smtp_limits(walk: Walk, request: Any) -> None:
    """The SMTP factory (and so every session) enforces the configured value."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    assert getattr(walk.service.smtp_factory.config, key) == walk.raw["smtp"][key]


# ---- http, metrics, websocket, rate limits ---------------------------------------------------


@check("http.public_url")
async def _public_url(walk: Walk, request: Any) -> None:
    """/api/v1/info shows it and it is the WebSocket origin default (overridden here)."""
    _code, body = await walk.api("GET", "/api/v1/info", key=None)
    assert json.loads(body)["public_url"] == "http://walk.test"


@check("http.trusted_proxies")
async def _trusted_proxies(walk: Walk, request: Any) -> None:
    """The API resolves client IPs through these networks."""
    import ipaddress

    assert walk.service.api.deps.trusted_proxies == [ipaddress.ip_network("198.51.100.0/24")]


@check("http.max_connections", "http.max_connections_per_ip", "http.header_timeout", "http.request_timeout")
async def _http_limits(walk: Walk, request: Any) -> None:
    """The HTTP connection guard (and its deadline channel) enforces the configured value."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    assert getattr(walk.service.http_guard.limits, key) == walk.raw["http"][key]


@check("metrics.token")
async def _metrics_token(walk: Walk, request: Any) -> None:
    """/metrics: 401 without the bearer, 200 with it."""
    assert (await walk.api("GET", "/metrics", key=None))[0] == 401
    assert (await walk.api("GET", "/metrics", key="walker-metrics-token"))[0] == 200


@check("metrics.enabled")
async def _metrics_enabled(walk: Walk, request: Any) -> None:
    """false: no /metrics route at all (404)."""
    import dataclasses

    from e2a.api.app import ApiApp, ApiDeps
    from e2a.config import MetricsConfig

    services = walk.service.api.deps.services
    off = ApiApp(ApiDeps(config=dataclasses.replace(walk.config, metrics=MetricsConfig(enabled=False)),
                         db=walk.service.db, clock=reactor, services=services))
    on = ApiApp(ApiDeps(config=walk.config, db=walk.service.db, clock=reactor, services=services))
    assert "/metrics" not in {r.rule for r in off.router.url_map.iter_rules()}
    assert "/metrics" in {r.rule for r in on.router.url_map.iter_rules()}


@check("websocket.allowed_origins")
async def _ws_origins(walk: Walk, request: Any) -> None:
    """Only the configured origin is allowed (not the public URL's)."""
    assert walk.service.websocket.allowed_origins == frozenset({"https://app.walk.test"})


@check("websocket.ping_interval", "websocket.ping_timeout", "websocket.drain_page_size")
async def _ws(walk: Walk, request: Any) -> None:
    """The WebSocket service (its keepalive timers, its drain) applies the configured value."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    assert getattr(walk.service.websocket.config, key) == walk.raw["websocket"][key]


@check("websocket.max_connections_per_agent")
async def _ws_max(walk: Walk, request: Any) -> None:
    """1: a second socket of the same agent is refused with 429."""
    from tests.support import wsclient

    port = walk.service.http_port.getHost().port
    first = await wsclient.connect(port, WALKER, bearer=walk.key, origin="https://app.walk.test")
    try:
        with pytest.raises(Exception, match="429|handshake"):
            await wsclient.connect(port, WALKER, bearer=walk.key, origin="https://app.walk.test")
    finally:
        await first.close_and_wait()


@check("rate_limits.feedback_per_hour")
async def _rl_feedback(walk: Walk, request: Any) -> None:
    """1 per hour: the second feedback from this IP is 429."""
    codes = [(await walk.api("POST", "/api/feedback", {"message": "hello"}, key=None))[0] for _ in range(2)]
    assert codes[0] != 429 and codes[1] == 429, codes


@check("rate_limits.register_per_hour")
async def _rl_register(walk: Walk, request: Any) -> None:
    """1 per hour: the second slug registration from this IP is 429."""
    codes = [(await walk.api("POST", "/api/v1/agents", {"slug": f"walk{i}", "agent_mode": "local"}))[0]
             for i in range(2)]
    assert codes == [201, 429], codes


@check("rate_limits.poll_per_minute")
async def _rl_poll(walk: Walk, request: Any) -> None:
    """1 per minute: the second inbox read is 429."""
    codes = [(await walk.api("GET", f"/api/v1/agents/{WALKER}/messages"))[0] for _ in range(2)]
    assert codes == [200, 429], codes


@check("rate_limits.send_per_minute")
async def _rl_send(walk: Walk, request: Any) -> None:
    """1 per minute per agent: the second send is 429."""
    body = {"from": WALKER, "to": ["walker2@agents.test"], "subject": "s", "body": "b"}
    codes = [(await walk.api("POST", "/api/v1/send", body))[0] for _ in range(2)]
    assert codes[0] in (200, 202) and codes[1] == 429, codes


# ---- database, dns, signing, dkim ------------------------------------------------------------


@check("database.url")
async def _db_url(walk: Walk, request: Any) -> None:
    """The service uses that database, and no embedded server."""
    assert walk.service.dsn == walk.raw["database"]["url"] and walk.service.embedded is None


@check("database.pool_size")
async def _pool_size(walk: Walk, request: Any) -> None:
    """The pool holds at most that many connections."""
    assert walk.service.db._size == 3


@check("database.auto_migrate")
async def _auto_migrate(walk: Walk, request: Any) -> None:
    """false on a database with pending migrations: the start fails and names the command."""
    import dataclasses

    import psycopg2

    from e2a.config import DatabaseConfig
    from e2a.service import build_service

    pg = request.getfixturevalue("pg_server")
    name = "e2a_walk_empty"
    conn = psycopg2.connect(pg.admin_dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    dsn = pg.admin_dsn(name)
    try:
        config = dataclasses.replace(
            walk.config, database=DatabaseConfig(url=dsn, auto_migrate=False),
            smtp=dataclasses.replace(walk.config.smtp, listen_addr="127.0.0.1:0"),
            http=dataclasses.replace(walk.config.http, listen_addr="127.0.0.1:0"),
            data_dir=str(walk.tmp / "auto-migrate"),
        )
        service = build_service(config, reactor, standalone=False)
        service.startService()
        with pytest.raises(Exception, match="e2a-admin migrate"):
            await service.started
        await service.stopService()
    finally:
        drop_database(pg, dsn)


@check("dns.nameservers", "dns.timeout")
async def _dns(walk: Walk, request: Any) -> None:
    """The only resolver asked, with that timeout."""
    assert walk.service.dns.nameservers == [("127.0.0.1", 5399)] and walk.service.dns.timeout == 2.0


@check("signing.hmac_secret")
async def _hmac(walk: Walk, request: Any) -> None:
    """Magic-link tokens are keyed by it (a token from another secret does not verify)."""
    from e2a.outbound.magiclink import ApprovalTokens, derive_approval_key

    assert walk.service.hmac_secret == HMAC
    assert walk.service.approval_tokens._key == derive_approval_key(HMAC)
    assert ApprovalTokens("another-secret-0123456789abcdefghijkl", 88)._key != walk.service.approval_tokens._key


@check("signing.master_key")
async def _master_key(walk: Walk, request: Any) -> None:
    """Secrets are sealed under it: the bootstrap signing secret opens with it."""
    assert walk.service.master_key == bytes(range(100, 132))


@check("signing.master_key_file")
async def _master_key_file(walk: Walk, request: Any) -> None:
    """The key is read from the file."""
    import dataclasses

    from e2a.config import SigningConfig, resolve_master_key

    path = walk.tmp / "master.key"
    path.write_text(base64.b64encode(bytes(range(1, 33))).decode() + "\n")
    config = dataclasses.replace(walk.config, signing=SigningConfig(hmac_secret=HMAC, master_key_file=str(path)))
    assert resolve_master_key(config) == bytes(range(1, 33))


@check("dkim.selector", "dkim.keys")
async def _dkim(walk: Walk, request: Any) -> None:
    """M signs with the configured key and selector; the shared domain's generated key uses dkim.selector."""
    from e2a.outbound.dkimsign import thd_load_deployment_key

    c = walk.config
    selector, pem = thd_load_deployment_key(c.data_dir, "mx.walk.test", c.dkim.keys, c.dkim.selector)
    assert selector == "k2026" and pem.strip() == (walk.tmp / "dkim.pem").read_bytes().strip()
    selector, _pem = thd_load_deployment_key(c.data_dir, "agents.test", c.dkim.keys, c.dkim.selector)
    assert selector == "walksel"


# ---- outbound --------------------------------------------------------------------------------


@check("outbound_smtp.host", "outbound_smtp.port", "outbound_smtp.username", "outbound_smtp.password",
       "outbound_smtp.tls", "outbound_smtp.tls_verify")
async def _relay(walk: Walk, request: Any) -> None:
    """The relay worker's route uses the upstream with these settings."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    route = walk.service.outbound.relay.config
    assert route.uses_upstream and getattr(route.outbound_smtp, key) == walk.raw["outbound_smtp"][key]


@check("outbound_smtp.from_domain")
async def _from_domain(walk: Walk, request: Any) -> None:
    """M: the right side of a sent message's Message-ID."""
    body = {"from": "walker2@agents.test", "to": ["walker3@agents.test"], "subject": "s", "body": "b"}
    code, text = await walk.api("POST", "/api/v1/send", body)
    assert code in (200, 202), text
    assert json.loads(text)["smtp_message_id"].endswith("@mail.walk.test>"), text


@check("outbound.mx_port", "outbound.helo_name", "outbound.max_queue_age")
async def _outbound(walk: Walk, request: Any) -> None:
    """The relay worker applies it (MX port and EHLO name of its sessions, the queue age limit)."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    out = walk.service.outbound
    if key == "helo_name":
        assert out.relay.config.helo_name == "helo.walk.test"
    elif key == "max_queue_age":
        assert out.retry.max_queue_age == 999
    else:
        assert out.relay.config.outbound.mx_port == 2526


@check("outbound.max_recipients")
async def _outbound_max_rcpt(walk: Walk, request: Any) -> None:
    """More recipients than 4 in one send is refused (400)."""
    body = {"from": "walker3@agents.test", "to": [f"r{i}@example.net" for i in range(5)], "subject": "s", "body": "b"}
    code, text = await walk.api("POST", "/api/v1/send", body)
    assert code == 400 and b"recipient" in text.lower(), (code, text)


@check("outbound.direct_mx")
async def _direct_mx(walk: Walk, request: Any) -> None:
    """true without an upstream: the relay looks up MX records instead of deferring everything."""
    import dataclasses

    from e2a.config import OutboundConfig, OutboundSmtpConfig
    from e2a.outbound.relay import Relay, RouteConfig

    config = dataclasses.replace(walk.config, outbound_smtp=OutboundSmtpConfig(),
                                 outbound=OutboundConfig(direct_mx=True))
    asked: list[str] = []

    class _Dns:
        async def mx(self, domain: str) -> Any:
            asked.append(domain)
            raise RuntimeError("stop here")

        def __getattr__(self, name: str) -> Any:
            async def fail(*a: Any, **k: Any) -> Any:
                asked.append(name)
                raise RuntimeError("stop here")

            return fail

    relay = Relay(reactor, reactor, _Dns(), RouteConfig.from_config(config))
    try:
        await relay.deliver(b"Subject: x\r\n\r\nx\r\n", "a@mail.walk.test", ["b@example.net"])
    except Exception:
        pass
    assert asked, "direct MX never asked DNS"


# ---- webhooks, domains, hitl, retention, logging, usage -------------------------------------


@check("webhooks.timeout", "webhooks.allow_private", "webhooks.max_concurrency_per_agent")
async def _webhook_client(walk: Walk, request: Any) -> None:
    """The webhook client is built with it."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    client = walk.service.delivery.client
    expected = walk.raw["webhooks"][key]
    if key == "timeout":
        assert client._timeout == float(expected)
    elif key == "allow_private":
        assert client._allow_private is True
    else:
        assert client._pool.maxPersistentPerHost == expected


@check("webhooks.retry_schedule", "webhooks.jitter", "webhooks.retry_after_cap")
async def _webhook_retry(walk: Walk, request: Any) -> None:
    """The delivery worker retries on this schedule (and the relay shares schedule and jitter)."""
    key = request.node.callspec.params["key"].split(".", 1)[1]
    expected = walk.raw["webhooks"][key]
    value = getattr(walk.service.delivery._config, key)
    assert (list(value) if isinstance(value, tuple) else value) == expected
    if key == "retry_schedule":
        assert list(walk.service.outbound.retry.schedule) == expected


@check("domains.auto_verify", "domains.claim_takeover_hours")
async def _domains(walk: Walk, request: Any) -> None:
    """auto_verify: a new custom domain verifies without DNS."""
    code, body = await walk.api("POST", "/api/v1/domains", {"domain": "custom-walk.example"})
    assert code in (201, 409), body
    code, body = await walk.api("POST", "/api/v1/domains/custom-walk.example/verify")
    assert code == 200 and json.loads(body)["verified"] is True, body
    assert walk.service.api.deps.config.domains.claim_takeover_hours == 5


@check("hitl.notify")
async def _hitl_notify(walk: Walk, request: Any) -> None:
    """false: the reviewer notifier sends nothing."""
    assert walk.service.hold_review.send.notifier.hitl.notify is False


@check("hitl.sweep_interval")
async def _hitl_sweep(walk: Walk, request: Any) -> None:
    """The expiry worker sweeps at this interval."""
    assert walk.service.expiry.interval == 77


@check("hitl.token_grace")
async def _token_grace(walk: Walk, request: Any) -> None:
    """Magic-link tokens stay valid this long past the hold's expiry."""
    assert walk.service.approval_tokens._grace == 88


@check("retention.days", "retention.sweep_interval")
async def _retention(walk: Walk, request: Any) -> None:
    """The retention worker purges at this age and runs at this interval."""
    r = walk.service.retention
    assert r.config.days == 9 and r._loop is not None and r._loop.interval == 99


@check("logging.format", "logging.level")
async def _logging(walk: Walk, request: Any) -> None:
    """json + warn: an info event is dropped, a warning is written as one JSON object."""
    import dataclasses

    from twisted.logger import Logger

    from e2a.config import LoggingConfig
    from e2a.logsetup import build_log_observer

    out = io.StringIO()
    observer = build_log_observer(dataclasses.replace(walk.config, logging=LoggingConfig(format="json", level="warn")),
                                  out)
    log = Logger(namespace="e2a.walk", observer=observer)
    log.info("quiet {x}", x=1)
    log.warn("loud {x}", x=2)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert [e["log_format"] for e in lines] == ["loud {x}"]


@check("logging.rotate_mb", "logging.keep_files")
async def _log_file(walk: Walk, request: Any) -> None:
    """1 MB and 1 file, from YAML through the function e2a.tap hands twistd's options to: the
    --logfile rotates at 1,000,000 bytes and only the newest rotated file stays."""
    import signal

    from twisted.logger import Logger

    from e2a.logsetup import twistd_log_observer

    (walk.tmp / "logging.yaml").write_text(yaml.safe_dump(
        {"shared_domain": "agents.test", "data_dir": str(walk.tmp / "log-data"),
         "logging": {"rotate_mb": 1, "keep_files": 1}}))
    config = load_config(str(walk.tmp / "logging.yaml"), environ={})
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=walk.tmp))  # both keys run this check

    class _Reactor:
        def callFromThread(self, fn: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
            fn(*args)

    saved = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # the log file takes SIGUSR1 when free
    try:
        observer = twistd_log_observer(config, {"nodaemon": True, "logfile": str(logs / "e2a.log")}, _Reactor())
        assert observer is not None
        log = Logger(namespace="e2a.mail", observer=observer)
        for n in range(12_000):  # ~2.5 MB: two rotations
            log.info("accepted {n} " + "z" * 150, n=n)
    finally:
        signal.signal(signal.SIGUSR1, saved)
    assert sorted(p.name for p in logs.iterdir()) == ["e2a.log", "e2a.log.1"]
    assert 900_000 < (logs / "e2a.log.1").stat().st_size <= 1_000_300


@check("usage.tracking")
async def _usage(walk: Walk, request: Any) -> None:
    """true: the stores record usage events (exercised in tests/integration/test_metrics.py)."""
    assert walk.service.metrics.usage_tracking is True


# ---- the walk --------------------------------------------------------------------------------


def test_every_documented_key_has_a_check():
    """docs/configuration.md and CHECKS name the same keys."""
    keys = documented_keys()
    assert len(keys) > 60
    assert set(keys) == set(CHECKS), (set(keys) ^ set(CHECKS))


@pytest.mark.parametrize("key", documented_keys())
@pytest_twisted.ensureDeferred
async def test_documented_key_has_an_effect(key, walk, request):
    """Setting ``key`` to a non-default value changes what the running service does or holds."""
    await CHECKS[key](walk, request)
