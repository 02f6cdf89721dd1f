"""``e2a-admin``: bootstrap, migrate and check-config (config.md §5).

Each command reads the same configuration as the server and, when it needs the database,
opens it exactly like the server does (the embedded PostgreSQL when ``database.url`` is empty,
stopped again afterwards if this process started it). Reactor work runs under
``twisted.internet.task.react`` so the process is short-lived and exits with the command's code.

Exit codes: 0 success, 1 runtime failure (database, DNS), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from e2a.errors import ConfigError

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

_EMAIL_RE = re.compile(r"^[^\s@\x00-\x1f\x7f]+@[^\s@\x00-\x1f\x7f]+\.[^\s@\x00-\x1f\x7f]+$")


class AdminError(Exception):
    """A failure to report on stderr with an exit code (no traceback for operators)."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2a-admin", description="e2a administration commands")
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: $E2A_CONFIG or ./e2a.yaml)")
    # Also accepted after the command name ("e2a-admin bootstrap --config x"); the value given
    # last wins, and SUPPRESS keeps the sub-parser from overwriting a global --config with None.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("bootstrap", parents=[common], help="create a user (if needed) and a new user-scoped API key")
    p.add_argument("--email", required=True, help="the user's email address")
    p.add_argument("--name", default="bootstrap", help="name for a newly created user (default: bootstrap)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("login-link", parents=[common], help="print a one-time web console sign-in link")
    p.add_argument("--email", required=True, help="the user's email address")

    p = sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    p.add_argument("--status", action="store_true", help="list applied and pending migrations, change nothing")

    p = sub.add_parser("check-config", parents=[common], help="validate the configuration and show DNS records")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--connect", action="store_true", help="also check the database, migrations and nameservers")
    p.add_argument("--domain", metavar="D", help="print the DNS records of the registered custom domain D instead")
    return parser


def valid_email(email: str) -> bool:
    """A plausible mailbox address for bootstrap: one ``@``, a dotted domain, no spaces."""
    return len(email.encode("utf-8")) <= 254 and _EMAIL_RE.match(email) is not None


# ---------------------------------------------------------------- database session


@dataclass
class DatabaseSession:
    """The database as the server opens it; ``close`` undoes exactly what ``open`` did."""

    config: Any
    reactor: Any
    dsn: str = ""
    embedded: Any = None
    pool: Any = None

    async def open(self) -> str:
        from twisted.python.threadpool import ThreadPool

        from e2a.config import ensure_data_dir
        from e2a.store.embedded import EmbeddedPostgres, EmbeddedPostgresError, EmbeddedSettings

        if self.config.database.url:
            self.dsn = self.config.database.url
            return self.dsn
        data_dir = ensure_data_dir(self.config)
        self.pool = ThreadPool(minthreads=0, maxthreads=1, name="e2a-admin")
        self.pool.start()
        self.embedded = EmbeddedPostgres(EmbeddedSettings(Path(data_dir) / "pg"))
        try:
            self.dsn = await self.embedded.start(self.reactor, self.pool)
        except EmbeddedPostgresError as e:
            raise AdminError(f"embedded PostgreSQL failed to start: {e}") from None
        return self.dsn

    async def close(self) -> None:
        try:
            if self.embedded is not None:
                await self.embedded.stop(self.reactor, self.pool)
        finally:
            if self.pool is not None:
                self.pool.stop()
                self.pool = None
            self.embedded = None


async def _ensure_schema(config: Any, dsn: str, reactor: Any) -> None:
    """Migrate (or insist on an up-to-date schema) exactly like server start-up."""
    from e2a.store import migrate

    if config.database.auto_migrate:
        await migrate.migrate(dsn, reactor)
        return
    st = await migrate.status(dsn, reactor)
    if st.pending:
        raise AdminError(
            f"{len(st.pending)} migration(s) pending and database.auto_migrate is off; run e2a-admin migrate"
        )


# ---------------------------------------------------------------- bootstrap


def format_bootstrap(result: Any, as_json: bool) -> str:
    """The exact stdout of config.md §5.1 (three lines, or one JSON object)."""
    if as_json:
        return json.dumps(
            {
                "user": {"id": result.user.id, "email": result.user.email},
                "api_key": {"id": result.api_key.id, "key": result.api_key_plaintext},
                "signing_secret": {"id": result.signing_secret_id, "secret": result.signing_secret},
            },
            separators=(",", ":"),
        ) + "\n"
    return (
        f"User:    {result.user.email} (id={result.user.id})\n"
        f"API key: {result.api_key_plaintext}\n"
        f"Signing secret: {result.signing_secret} (id={result.signing_secret_id})\n"
    )


async def cmd_bootstrap(reactor: Any, config: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from e2a.config import resolve_master_key
    from e2a.store import accounts
    from e2a.store.database import Database

    email = args.email.strip()
    if not valid_email(email):
        raise AdminError(f"--email: {args.email!r} is not a valid email address", EXIT_USAGE)
    try:
        master_key = resolve_master_key(config)
    except ConfigError as e:
        raise AdminError("; ".join(e.problems), EXIT_USAGE) from None
    session = DatabaseSession(config, reactor)
    try:
        dsn = await session.open()
        await _ensure_schema(config, dsn, reactor)
        db = Database(dsn, 1, reactor)
        await db.start()
        try:
            result = await accounts.bootstrap(db, master_key, email, args.name)
        finally:
            db.close()
    finally:
        await session.close()
    out.write(format_bootstrap(result, args.json))
    out.flush()
    err.write(bootstrap_notes(result.signing_secret))
    return EXIT_OK


def standard_webhooks_secret(secret: str) -> str:
    """The form Standard Webhooks libraries are configured with (mail.md §4.2): ``whsec_`` +
    base64 of the signing secret's 64 ASCII characters (the hex text is not decoded)."""
    return "whsec_" + base64.b64encode(secret.encode("ascii")).decode("ascii")


def bootstrap_notes(secret: str) -> str:
    """bootstrap's stderr: stdout is exactly the three lines of config.md §5.1, so the
    Standard Webhooks form of the secret (docs/webhooks.md) is printed here."""
    return (
        "Store the API key now: it is shown only once and cannot be recovered.\n"
        f"Standard Webhooks libraries take the signing secret as: {standard_webhooks_secret(secret)}\n"
        "(X-E2A-Auth-* and the example in docs/webhooks.md use the 64-hex secret itself.)\n"
    )


# ---------------------------------------------------------------- login-link


async def cmd_login_link(reactor: Any, config: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """A one-time web console sign-in link for an existing user (valid 15 minutes, one use)."""
    from datetime import UTC, datetime

    from e2a.console.routes import login_link_url
    from e2a.store import sessions
    from e2a.store.database import Database

    session = DatabaseSession(config, reactor)
    try:
        dsn = await session.open()
        await _ensure_schema(config, dsn, reactor)
        db = Database(dsn, 1, reactor)
        await db.start()
        try:
            token = await sessions.create_login_link(db, args.email.strip(), datetime.fromtimestamp(reactor.seconds(), UTC))
        finally:
            db.close()
    finally:
        await session.close()
    if token is None:
        raise AdminError(f"--email: no user {args.email.strip()!r}; create one with e2a-admin bootstrap", EXIT_USAGE)
    listen = config.http.listen_addr
    base = config.http.public_url or f"http://{'127.0.0.1' + listen if listen.startswith(':') else listen}"
    out.write(login_link_url(base, token) + "\n")
    out.flush()
    err.write("The link works once, within 15 minutes.\n")
    return EXIT_OK


# ---------------------------------------------------------------- migrate


async def cmd_migrate(reactor: Any, config: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from e2a.store import migrate

    session = DatabaseSession(config, reactor)
    try:
        dsn = await session.open()
        if args.status:
            st = await migrate.status(dsn, reactor)
            for version, name in st.applied:
                out.write(f"applied  {version:04d}_{name}\n")
            for m in st.pending:
                out.write(f"pending  {m.version:04d}_{m.name}\n")
            if not st.applied and not st.pending:
                out.write("no migrations\n")
            return EXIT_OK
        done = await migrate.migrate(dsn, reactor)
        for m in done:
            out.write(f"applied  {m.version:04d}_{m.name}\n")
        if not done:
            out.write("schema is up to date\n")
        return EXIT_OK
    finally:
        await session.close()


# ---------------------------------------------------------------- check-config


@dataclass
class CheckReport:
    config: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dns_records: list[dict[str, Any]] = field(default_factory=list)
    #: {"config_file": path or None, "env_keys": [...]}: what this command read.
    sources: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "sources": self.sources,
            "config": self.config,
            "errors": self.errors,
            "warnings": self.warnings,
            "dns_records": self.dns_records,
        }


def config_warnings(config: Any) -> list[str]:
    """Legal but noteworthy settings (pure: decided from the config alone)."""
    warnings: list[str] = []
    data_dir = Path(config.data_dir)
    if bool(config.smtp.tls_cert) != bool(config.smtp.tls_key):
        warnings.append("smtp.tls_cert/smtp.tls_key: both are needed; STARTTLS will not be offered")
    elif not config.smtp.tls_enabled and config.production:
        warnings.append("smtp.tls_cert: no certificate set; STARTTLS will not be offered")
    if not config.http.public_url:
        warnings.append("http.public_url: empty; magic links and the public URL in /api/v1/info are unavailable")
    if not config.shared_domain:
        warnings.append("shared_domain: empty; slug registration is disabled")
    if not config.outbound_smtp.host and not config.outbound.direct_mx:
        warnings.append(
            "outbound_smtp.host: empty and outbound.direct_mx is off; mail to non-agent recipients "
            "is refused (503 outbound_not_configured)"
        )
    if not config.production:
        if not config.database.url:
            warnings.append(f"database.url: empty; the embedded PostgreSQL in {data_dir / 'pg'} is used (development only)")
        if not config.signing.master_key and not config.signing.master_key_file:
            warnings.append(f"signing.master_key: not set; using the generated {data_dir / 'master.key'}")
        if not config.signing.hmac_secret:
            warnings.append(f"signing.hmac_secret: not set; using the generated {data_dir / 'hmac.secret'}")
        if config.webhooks.allow_private:
            warnings.append("webhooks.allow_private: webhooks may reach private addresses (development only)")
        if config.domains.auto_verify:
            warnings.append("domains.auto_verify: domains are verified without DNS (development only)")
        from e2a.config import DEFAULT_SMTP_DOMAIN

        if config.smtp.domain == DEFAULT_SMTP_DOMAIN:
            warnings.append(f"smtp.domain: still the example value {DEFAULT_SMTP_DOMAIN}")
    return warnings


def config_errors(config: Any) -> list[str]:
    """Problems the server only meets at start-up (files it must read), found without side effects."""
    from e2a.config import resolve_master_key

    errors: list[str] = []
    if config.signing.master_key or config.signing.master_key_file:
        try:
            resolve_master_key(config)  # no file is created when a key is configured
        except ConfigError as e:
            errors.extend(e.problems)
    for entry in config.dkim.keys:
        if not Path(entry.key_file).is_file():
            errors.append(f"dkim.keys: key_file {entry.key_file} for {entry.domain} does not exist")
    return errors


def dkim_public_value(pem: bytes) -> str:
    """The DKIM TXT value for a PEM private key: ``v=DKIM1; k=rsa; p=<base64 SPKI>``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode("ascii")


#: TTL written in the zone-file lines check-config prints.
ZONE_TTL = 3600
#: One DNS character-string holds at most 255 octets (RFC 1035 §3.3); longer TXT values are split.
TXT_STRING_MAX = 255


def txt_strings(value: str, size: int = TXT_STRING_MAX) -> list[str]:
    """``value`` cut into DNS character-strings of at most ``size`` octets (a DKIM key of 2048
    bits is ~410 characters: two strings, which resolvers join back without a separator)."""
    data = value.encode("ascii")
    return [data[i : i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def zone_line(record: dict[str, Any]) -> str:
    """One zone-file line (``name. TTL IN TYPE rdata``) ready to paste; TXT values quoted and split."""
    name = record["name"].rstrip(".") + "."
    if record["type"] == "MX":
        rdata = f"{record['priority']} {record['value'].rstrip('.')}."
    else:
        rdata = " ".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"' for part in txt_strings(record["value"]))
    return f"{name}\t{ZONE_TTL}\tIN\t{record['type']}\t{rdata}"


def spf_value(config: Any) -> tuple[str, str]:
    """The SPF TXT value for a domain e2a sends as, and a note for the operator.

    e2a's outbound mail uses the agent address as MAIL FROM (mail.md §7.4), so SPF is evaluated
    for the agent's domain against the address mail leaves from: the relay, or this host."""
    if config.outbound_smtp.host:
        return (
            f"v=spf1 a:{config.outbound_smtp.host} ~all",
            f"outbound mail leaves through the relay {config.outbound_smtp.host}: if the relay "
            "documents its own SPF include (include:...), use that mechanism instead of a:",
        )
    if config.outbound.direct_mx:
        return (
            f"v=spf1 a:{config.helo_name} ~all",
            f"outbound mail leaves from this host by direct MX: {config.helo_name} must resolve to its public address",
        )
    return (
        "v=spf1 -all",
        "no outbound SMTP is configured (outbound_smtp.host empty, outbound.direct_mx off), so no host "
        "sends mail as this domain; change this record when you enable outbound mail",
    )


DMARC_VALUE = "v=DMARC1; p=none"
DMARC_NOTE = "start with p=none; raise to p=quarantine or p=reject once receivers' reports show your mail passing"


def _record(purpose: str, rtype: str, name: str, value: str | None, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"purpose": purpose, "type": rtype, "name": name, "value": value, **extra}
    if value is not None:
        if rtype == "TXT":
            record["strings"] = txt_strings(value)
        record["zone_line"] = zone_line(record)
    return record


def _deployment_dkim(config: Any, domain: str) -> tuple[dict[str, Any], list[str]]:
    """The DKIM TXT record of the shared domain or ``M`` from its key file (mail.md §7.5)."""
    explicit = {k.domain: k for k in config.dkim.keys}
    if domain in explicit:
        selector, key_file, generated = explicit[domain].selector, Path(explicit[domain].key_file), False
    else:
        from e2a.outbound.dkimsign import deployment_key_path

        selector = config.dkim.selector
        key_file = deployment_key_path(Path(config.data_dir).absolute(), domain)
        generated = True
    name = f"{selector}._domainkey.{domain}"
    try:
        value = dkim_public_value(key_file.read_bytes())
    except FileNotFoundError:
        if not generated:
            return _record("dkim", "TXT", name, None, key_file=str(key_file)), [
                f"dkim.keys: key_file {key_file} for {domain} does not exist"
            ]
        note = (
            f"the key does not exist yet: e2a generates {key_file} when the server starts "
            "(twistd -n e2a), before it listens; run check-config again after the first start"
        )
        return _record("dkim", "TXT", name, None, key_file=str(key_file), note=note), []
    except (OSError, ValueError, TypeError) as e:
        return _record("dkim", "TXT", name, None, key_file=str(key_file)), [
            f"DKIM key {key_file} for {domain} cannot be read: {e}"
        ]
    return _record("dkim", "TXT", name, value, key_file=str(key_file)), []


def dns_records(config: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record to publish for the shared domain (MX, SPF, DKIM, DMARC) and for ``M``, the From
    domain of e2a's own mail (SPF, DKIM, DMARC) — config.md §5.3, mail.md §7.5.

    Returns (records, errors). A generated key that does not exist yet is not an error (the
    server creates it at start); an unreadable or missing configured one is. Each record has
    ``domain`` (the zone it belongs to), ``purpose``, ``type``, ``name``, ``value`` (None when
    unknown yet), ``priority`` (MX), ``strings`` (TXT, ≤ 255 octets each) and ``zone_line``.
    """
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    spf, spf_note = spf_value(config)
    domains: list[str] = []
    for domain in (config.shared_domain, config.mail_domain):
        if domain and domain.lower() not in domains:
            domains.append(domain.lower())
    for domain in domains:
        group: list[dict[str, Any]] = []
        if domain == config.shared_domain:
            group.append(_record("mx", "MX", domain, config.smtp.domain, priority=10))
        group.append(_record("spf", "TXT", domain, spf, note=spf_note))
        dkim, problems = _deployment_dkim(config, domain)
        group.append(dkim)
        errors.extend(problems)
        group.append(_record("dmarc", "TXT", f"_dmarc.{domain}", DMARC_VALUE, note=DMARC_NOTE))
        for record in group:
            record["domain"] = domain
        records.extend(group)
    return records, errors


def custom_domain_records(config: Any, domain: Any) -> list[dict[str, Any]]:
    """What a user publishes for a custom domain (api.md §9 ``dns_records``, plus SPF and DMARC):
    ``domain`` is the stored :class:`e2a.store.models.Domain`."""
    spf, spf_note = spf_value(config)
    name = domain.domain
    state = "verified" if domain.verified else "not verified yet: e2a checks it at POST /api/v1/domains/{domain}/verify"
    group = [
        _record("mx", "MX", name, config.smtp.domain, priority=10),
        _record("verification", "TXT", name, domain.verification_token, note=f"ownership proof ({state})"),
        _record("spf", "TXT", name, spf, note=spf_note),
        _record("dkim", "TXT", f"{domain.dkim_selector}._domainkey.{name}", f"v=DKIM1; k=rsa; p={domain.dkim_public_key}"),
        _record("dmarc", "TXT", f"_dmarc.{name}", DMARC_VALUE, note=DMARC_NOTE),
    ]
    for record in group:
        record["domain"] = name
    return group


async def connect_checks(reactor: Any, config: Any, report: CheckReport) -> None:
    """--connect: database reachable, migration status, every configured nameserver answers."""
    from e2a.store import migrate

    session = DatabaseSession(config, reactor)
    try:
        dsn = await session.open()
        st = await migrate.status(dsn, reactor)
        if st.pending:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in st.pending)
            if config.database.auto_migrate:
                report.warnings.append(f"database: pending migrations {names} (applied at next start)")
            else:
                report.errors.append(
                    f"database: pending migrations {names} and database.auto_migrate is off; run e2a-admin migrate"
                )
    except AdminError as e:
        report.errors.append(f"database: {e}")
    except migrate.MigrationError as e:
        report.errors.append(f"database: {e}")
    except Exception as e:  # DatabaseUnavailable, psycopg2 errors
        report.errors.append(f"database: cannot connect: {e}")
    finally:
        await session.close()

    if config.dns.nameservers:
        from e2a.mailauth.dns import DnsClient, DnsTemporaryError

        for host, port in config.dns.parsed_nameservers():
            client = DnsClient([(host, port)], float(config.dns.timeout), reactor=reactor, cache_size=0)
            try:
                await client.lookup_txt(config.smtp.domain)
            except DnsTemporaryError as e:
                report.errors.append(f"dns.nameservers: {host}:{port} did not answer ({e})")


def running_server_warnings(config: Any, sources: Any) -> list[str]:
    """Differences from the server running on this data dir (its ``server.json``), if one runs.

    The server and this command read the same sources by the same rules (config.md §1), but
    not necessarily with the same environment or working directory: ``E2A_SHARED_DOMAIN`` set
    only in the server's shell is the classic case. Saying so beats a silent contradiction."""
    import os

    from e2a.config import RUN_RECORD, run_record, run_record_differences

    path = Path(config.data_dir).absolute() / RUN_RECORD
    try:
        running = json.loads(path.read_text(encoding="utf-8"))
        pid = int(running["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return []  # a stale record of a crashed server
    except PermissionError:
        pass  # alive, another user's
    mine = run_record(config, sources, os.getpid(), "")
    return [
        f"{d} — set the same config file and E2A_* variables here as for the server"
        for d in run_record_differences(mine, running)
    ]


def build_check_report(config_path: str | None) -> tuple[CheckReport, Any]:
    """Everything check-config reports without touching the network."""
    from e2a.config import config_sources, load_config, redacted

    report = CheckReport()
    sources = config_sources(config_path)
    report.sources = {"config_file": sources.file, "env_keys": list(sources.env_keys)}
    try:
        config = load_config(config_path)
    except ConfigError as e:
        report.errors.extend(e.problems)
        return report, None
    report.config = redacted(config)
    report.errors.extend(config_errors(config))
    report.warnings.extend(running_server_warnings(config, sources))
    report.warnings.extend(config_warnings(config))
    records, errors = dns_records(config)
    report.dns_records = records
    report.errors.extend(errors)
    return report, config


async def domain_records(reactor: Any, config: Any, name: str, report: CheckReport) -> None:
    """--domain D: replace the report's records with D's (a custom domain, from the database)."""
    from e2a.store import domains as domain_store
    from e2a.store.database import Database

    name = name.strip().rstrip(".").lower()
    if name in {d.lower() for d in (config.shared_domain, config.mail_domain) if d}:
        report.dns_records = [r for r in report.dns_records if r["domain"] == name]
        return
    report.dns_records = []
    session = DatabaseSession(config, reactor)
    try:
        dsn = await session.open()
        db = Database(dsn, 1, reactor)
        await db.start()
        try:
            found = await domain_store.get_domain(db, name)
        finally:
            db.close()
    except AdminError as e:
        report.errors.append(f"database: {e}")
        return
    except Exception as e:  # DatabaseUnavailable, psycopg2 errors, no schema yet
        report.errors.append(f"database: cannot read domain {name}: {e}")
        return
    finally:
        await session.close()
    if found is None:
        report.errors.append(
            f"--domain: {name} is not registered on this deployment; add it first (POST /api/v1/domains)"
        )
        return
    report.dns_records = custom_domain_records(config, found)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((prefix + key, value))
    return items


def format_check_report(report: CheckReport) -> str:
    lines: list[str] = []
    if report.sources is not None:
        lines.append("Configuration read from:")
        lines.append(f"  file: {report.sources['config_file'] or '(none: defaults and environment only)'}")
        lines.append(f"  environment: {', '.join(report.sources['env_keys']) or '(no E2A_* variables set)'}")
    if report.config is not None:
        lines.append("Effective configuration:")
        for key, value in _flatten(report.config):
            lines.append(f"  {key} = {json.dumps(value)}")
    lines.append(f"Errors ({len(report.errors)}):")
    lines.extend(f"  - {e}" for e in report.errors)
    lines.append(f"Warnings ({len(report.warnings)}):")
    lines.extend(f"  - {w}" for w in report.warnings)
    if report.config is not None:
        lines.append("DNS records to publish (zone-file lines; paste each group into that domain's zone):")
        if not report.dns_records:
            lines.append("; (none)")
        current = None
        for r in report.dns_records:
            if r["domain"] != current:
                current = r["domain"]
                lines.append("")
                lines.append(f"; ---- {current}")
            if r.get("note"):
                lines.append(f"; {r['purpose']}: {r['note']}")
            if r.get("zone_line"):
                lines.append(r["zone_line"])
            else:
                lines.append(f"; {r['name']}. TXT — not available yet ({r.get('key_file', '')})")
        mx_hosts = sorted({r["value"] for r in report.dns_records if r["type"] == "MX"})
        for host in mx_hosts:
            lines.append("")
            lines.append(f"; {host} (the MX target) needs A/AAAA records for this server's public address.")
    return "\n".join(lines) + "\n"


def write_check_report(report: CheckReport, as_json: bool, out: TextIO, err: TextIO) -> int:
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.write(format_check_report(report))
    out.flush()
    for problem in report.errors:
        err.write(f"e2a-admin: config error: {problem}\n")
    return EXIT_USAGE if report.errors else EXIT_OK


# ---------------------------------------------------------------- entry point


def _load_config_or_exit(path: str | None, err: TextIO) -> Any:
    from e2a.config import load_config

    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            err.write(f"e2a-admin: config error: {problem}\n")
        raise SystemExit(EXIT_USAGE) from None


def _react(coro_fn: Any) -> NoReturn:
    """Run ``coro_fn(reactor)`` under ``react`` and exit with the code it returns."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    async def body(reactor: Any) -> None:
        try:
            code = await coro_fn(reactor)
        except AdminError as e:
            sys.stderr.write(f"e2a-admin: {e}\n")
            code = e.code
        except SystemExit:
            raise
        except Exception as e:  # operators get one line, not a traceback
            sys.stderr.write(f"e2a-admin: {type(e).__name__}: {e}\n")
            code = EXIT_RUNTIME
        sys.stdout.flush()
        raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(body(reactor)))
    raise AssertionError("react returned")  # pragma: no cover


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if args.command is None:
        parser.print_usage(err)
        err.write("e2a-admin: a command is required (bootstrap, migrate, check-config, login-link)\n")
        raise SystemExit(EXIT_USAGE)

    if args.command == "check-config":
        report, config = build_check_report(args.config)
        if not ((args.connect or args.domain) and config is not None):
            raise SystemExit(write_check_report(report, args.json, out, err))

        async def check(reactor: Any) -> int:
            if args.connect:
                await connect_checks(reactor, config, report)
            if args.domain:
                await domain_records(reactor, config, args.domain, report)
            return write_check_report(report, args.json, out, err)

        _react(check)

    config = _load_config_or_exit(args.config, err)
    if args.command == "bootstrap":
        if not valid_email(args.email.strip()):
            err.write(f"e2a-admin: --email: {args.email!r} is not a valid email address\n")
            raise SystemExit(EXIT_USAGE)
        _react(lambda reactor: cmd_bootstrap(reactor, config, args, out, err))
    if args.command == "login-link":
        _react(lambda reactor: cmd_login_link(reactor, config, args, out, err))
    _react(lambda reactor: cmd_migrate(reactor, config, args, out, err))


if __name__ == "__main__":
    main()
