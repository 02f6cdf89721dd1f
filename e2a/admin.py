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

    p = sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    p.add_argument("--status", action="store_true", help="list applied and pending migrations, change nothing")

    p = sub.add_parser("check-config", parents=[common], help="validate the configuration and show DNS records")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--connect", action="store_true", help="also check the database, migrations and nameservers")
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
    err.write("Store the API key now: it is shown only once and cannot be recovered.\n")
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

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
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


def dns_records(config: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """MX for the shared domain and DKIM TXT for the shared domain and ``M`` (config.md §5.3).

    Returns (records, errors); a missing generated key is not an error (it is created at
    first start), an unreadable configured one is.
    """
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    if config.shared_domain:
        records.append(
            {"type": "MX", "name": config.shared_domain, "value": config.smtp.domain, "priority": 10}
        )
    explicit = {k.domain: k for k in config.dkim.keys}
    domains: list[str] = []
    for domain in (config.shared_domain, config.mail_domain):
        if domain and domain.lower() not in domains:
            domains.append(domain.lower())
    for domain in domains:
        if domain in explicit:
            selector, key_file, generated = explicit[domain].selector, Path(explicit[domain].key_file), False
        else:
            selector = config.dkim.selector
            key_file = Path(config.data_dir).absolute() / "dkim" / f"{domain}.pem"
            generated = True
        record: dict[str, Any] = {
            "type": "TXT",
            "name": f"{selector}._domainkey.{domain}",
            "value": None,
            "key_file": str(key_file),
        }
        try:
            record["value"] = dkim_public_value(key_file.read_bytes())
        except FileNotFoundError:
            if generated:
                record["note"] = "the key does not exist yet; it will be generated at first start"
            else:
                errors.append(f"dkim.keys: key_file {key_file} for {domain} does not exist")
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"DKIM key {key_file} for {domain} cannot be read: {e}")
        records.append(record)
    return records, errors


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


def build_check_report(config_path: str | None) -> tuple[CheckReport, Any]:
    """Everything check-config reports without touching the network."""
    from e2a.config import load_config, redacted

    report = CheckReport()
    try:
        config = load_config(config_path)
    except ConfigError as e:
        report.errors.extend(e.problems)
        return report, None
    report.config = redacted(config)
    report.errors.extend(config_errors(config))
    report.warnings.extend(config_warnings(config))
    records, errors = dns_records(config)
    report.dns_records = records
    report.errors.extend(errors)
    return report, config


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
    if report.config is not None:
        lines.append("Effective configuration:")
        for key, value in _flatten(report.config):
            lines.append(f"  {key} = {json.dumps(value)}")
    lines.append(f"Errors ({len(report.errors)}):")
    lines.extend(f"  - {e}" for e in report.errors)
    lines.append(f"Warnings ({len(report.warnings)}):")
    lines.extend(f"  - {w}" for w in report.warnings)
    if report.config is not None:
        lines.append("DNS records to publish:")
        if not report.dns_records:
            lines.append("  (none)")
        for r in report.dns_records:
            if r["type"] == "MX":
                lines.append(f"  {r['name']}.  MX  {r['priority']} {r['value']}.")
            elif r["value"] is not None:
                lines.append(f"  {r['name']}.  TXT  \"{r['value']}\"")
            else:
                lines.append(f"  {r['name']}.  TXT  ({r.get('note', 'key unavailable')}: {r['key_file']})")
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
        err.write("e2a-admin: a command is required (bootstrap, migrate, check-config)\n")
        raise SystemExit(EXIT_USAGE)

    if args.command == "check-config":
        report, config = build_check_report(args.config)
        if not (args.connect and config is not None):
            raise SystemExit(write_check_report(report, args.json, out, err))

        async def check(reactor: Any) -> int:
            await connect_checks(reactor, config, report)
            return write_check_report(report, args.json, out, err)

        _react(check)

    config = _load_config_or_exit(args.config, err)
    if args.command == "bootstrap":
        if not valid_email(args.email.strip()):
            err.write(f"e2a-admin: --email: {args.email!r} is not a valid email address\n")
            raise SystemExit(EXIT_USAGE)
        _react(lambda reactor: cmd_bootstrap(reactor, config, args, out, err))
    _react(lambda reactor: cmd_migrate(reactor, config, args, out, err))


if __name__ == "__main__":
    main()
