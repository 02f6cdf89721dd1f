"""Configuration: YAML file + ``E2A_*`` environment → frozen per-section dataclasses.

Read once at start (config.md §1). Every problem is collected and raised together in one
:class:`~e2a.errors.ConfigError`, so an operator fixes a broken file in one pass instead of
one restart per typo. Nothing past this module reads ``os.environ``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from e2a.errors import ConfigError

DEFAULT_SMTP_DOMAIN = "e2a.example.com"
WEAK_HMAC_SECRETS = {"change-me-in-production"}


@dataclass(frozen=True)
class SmtpConfig:
    listen_addr: str = ":2525"
    domain: str = DEFAULT_SMTP_DOMAIN
    authserv_id: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_message_size: int = 10485760
    max_recipients: int = 50
    max_line_length: int = 1000
    max_command_length: int = 512
    max_header_size: int = 102400
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    idle_timeout: int = 300
    data_timeout: int = 600
    session_timeout: int = 1800
    max_errors: int = 20
    max_messages_per_session: int = 100
    store_timeout: int = 30

    @property
    def effective_authserv_id(self) -> str:
        return self.authserv_id or self.domain

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True)
class HttpConfig:
    listen_addr: str = ":8080"
    public_url: str = ""
    trusted_proxies: tuple[str, ...] = ()
    # Slow-client limits (docs/configuration.md, "Limits and security"); per process.
    max_connections: int = 1000
    max_connections_per_ip: int = 64
    header_timeout: int = 20
    request_timeout: int = 120


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    token: str = ""


@dataclass(frozen=True)
class WebSocketConfig:
    allowed_origins: tuple[str, ...] = ()
    max_connections_per_agent: int = 10
    ping_interval: int = 30
    ping_timeout: int = 10
    drain_page_size: int = 100


@dataclass(frozen=True)
class RateLimitConfig:
    send_per_minute: int = 60
    register_per_hour: int = 20
    poll_per_minute: int = 60
    feedback_per_hour: int = 10


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    pool_size: int = 10
    auto_migrate: bool = True


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    timeout: int = 5

    def parsed_nameservers(self) -> list[tuple[str, int]]:
        """``host:port`` strings as (host, port); IPv6 as ``[addr]:port``; port defaults to 53."""
        return [parse_host_port(item, default_port=53) for item in self.nameservers]


@dataclass(frozen=True)
class SigningConfig:
    hmac_secret: str = ""
    master_key: str = ""
    master_key_file: str = ""


@dataclass(frozen=True)
class DkimKeyConfig:
    domain: str
    selector: str
    key_file: str


@dataclass(frozen=True)
class DkimConfig:
    selector: str = "e2a"
    keys: tuple[DkimKeyConfig, ...] = ()


@dataclass(frozen=True)
class OutboundSmtpConfig:
    host: str = ""
    port: int = 587
    username: str = ""
    password: str = ""
    from_domain: str = ""
    tls: str = "auto"
    tls_verify: bool = True


@dataclass(frozen=True)
class OutboundConfig:
    direct_mx: bool = False
    mx_port: int = 25
    helo_name: str = ""
    max_recipients: int = 50
    max_queue_age: int = 172800


@dataclass(frozen=True)
class WebhooksConfig:
    timeout: int = 10
    retry_schedule: tuple[int, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400)
    jitter: float = 0.1
    retry_after_cap: int = 3600
    max_concurrency_per_agent: int = 4
    allow_private: bool = False


@dataclass(frozen=True)
class DomainsConfig:
    auto_verify: bool = False
    claim_takeover_hours: int = 72


@dataclass(frozen=True)
class HitlConfig:
    notify: bool = True
    sweep_interval: int = 60
    token_grace: int = 600


@dataclass(frozen=True)
class RetentionConfig:
    days: int = 30
    sweep_interval: int = 3600


@dataclass(frozen=True)
class LoggingConfig:
    format: str = ""
    level: str = "info"
    # A log file (twistd --logfile, or twistd.log when daemonized) rotates at this size and
    # keeps this many rotated files, deleting the oldest (0: keep every one, as twistd does).
    rotate_mb: int = 100
    keep_files: int = 10


@dataclass(frozen=True)
class UsageConfig:
    tracking: bool = False


@dataclass(frozen=True)
class Config:
    env: str = "development"
    data_dir: str = "./e2a-data"
    shared_domain: str = ""
    # Processes serving the same SMTP and HTTP sockets (docs/configuration.md, "processes"):
    # one CPython process is bound to one core by the GIL; 1 = everything in this process.
    processes: int = 1
    # CPUs the processes run on, one CPU per process taken in turn (docs/configuration.md,
    # "cpu_affinity"; e2a.affinity); empty: the kernel decides.
    cpu_affinity: tuple[int, ...] = ()
    # With cpu_affinity empty: the mail-auth threads follow the reactor thread's CPU
    # (docs/configuration.md, "colocate_threads"; e2a.affinity.ThreadFollower).
    colocate_threads: bool = True
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    outbound_smtp: OutboundSmtpConfig = field(default_factory=OutboundSmtpConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    hitl: HitlConfig = field(default_factory=HitlConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def mail_domain(self) -> str:
        """``M`` of the spec: the outbound from-domain, else the SMTP domain."""
        return self.outbound_smtp.from_domain or self.smtp.domain

    @property
    def log_format(self) -> str:
        return self.logging.format or ("json" if self.production else "text")

    @property
    def helo_name(self) -> str:
        return self.outbound.helo_name or self.smtp.domain

    def reserved_domains(self) -> set[str]:
        return {d.lower() for d in (self.shared_domain, self.smtp.domain, self.mail_domain) if d}


#: Upper bound of ``processes``: each process holds ``database.pool_size`` + 2 connections.
MAX_PROCESSES = 64
#: Upper bound (exclusive) of a ``cpu_affinity`` CPU number: Linux's default CPU set size.
MAX_CPU = 1024

SECTIONS: dict[str, type] = {
    "smtp": SmtpConfig,
    "http": HttpConfig,
    "metrics": MetricsConfig,
    "websocket": WebSocketConfig,
    "rate_limits": RateLimitConfig,
    "database": DatabaseConfig,
    "dns": DnsConfig,
    "signing": SigningConfig,
    "dkim": DkimConfig,
    "outbound_smtp": OutboundSmtpConfig,
    "outbound": OutboundConfig,
    "webhooks": WebhooksConfig,
    "domains": DomainsConfig,
    "hitl": HitlConfig,
    "retention": RetentionConfig,
    "logging": LoggingConfig,
    "usage": UsageConfig,
}

# The three aliases of config.md §1 that keep their established names.
ENV_ALIASES = {
    "http.public_url": "E2A_PUBLIC_URL",
    "signing.hmac_secret": "E2A_HMAC_SECRET",
    "signing.master_key": "E2A_MASTER_KEY",
}

ENUMS: dict[str, tuple[str, ...]] = {
    "env": ("development", "production"),
    "outbound_smtp.tls": ("auto", "starttls", "implicit", "none"),
    "logging.format": ("", "text", "json"),
    "logging.level": ("debug", "info", "warn", "error"),
}

SECRET_KEYS = {
    "signing.hmac_secret",
    "signing.master_key",
    "outbound_smtp.password",
    "metrics.token",
    "database.url",
}


def env_name(path: str) -> str:
    return ENV_ALIASES.get(path, "E2A_" + path.upper().replace(".", "_"))


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``:port`` or ``[v6]:port``; raises ValueError when malformed."""
    value = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", value)
    if m:
        host, port = m.group(1), m.group(2)
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" not in value:
        host, port = value, None
    else:
        raise ValueError(f"{value!r} is not host:port")
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r} has no port")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} has an invalid port")
    return host, int(port)


def listen_endpoint(listen_addr: str) -> str:
    """``host:port`` (config form) → a Twisted server endpoint description."""
    host, port = parse_host_port(listen_addr)
    if not host or host == "0.0.0.0":
        return f"tcp:{port}" if not host else f"tcp:{port}:interface=0.0.0.0"
    if ":" in host:
        return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={host}"


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _kind(cls: type, name: str) -> str:
    """The declared type of a dataclass field, as a short tag used by the parsers."""
    annotation = {f.name: f.type for f in fields(cls)}[name]
    return str(annotation)


def _coerce(path: str, kind: str, value: Any, from_env: bool) -> Any:
    """Turn a YAML or environment value into the field's type; raise ValueError when unusable."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError("must be a boolean (true|false|1|0|yes|no)")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
            return int(value.strip())
        raise ValueError("must be an integer")
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise ValueError("must be a number") from None
    if kind.startswith("tuple[int"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError("must be a list of integers")
        out = []
        for item in items:
            out.append(_coerce(path, "int", item.strip() if isinstance(item, str) else item, from_env))
        return tuple(out)
    if kind.startswith("tuple[str"):
        if isinstance(value, str):
            items = [] if value == "" else value.split(",")
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            raise ValueError("must be a list of strings")
        if not all(isinstance(i, str) for i in items):
            raise ValueError("must be a list of strings")
        return tuple(items)
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError("must be a string")
        return str(value)
    raise ValueError(f"unsupported type {kind}")


def _parse_dkim_keys(value: Any) -> tuple[DkimKeyConfig, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of {domain, selector, key_file}")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"domain", "selector", "key_file"}:
            raise ValueError("each entry needs exactly domain, selector and key_file")
        if not all(isinstance(v, str) and v for v in item.values()):
            raise ValueError("domain, selector and key_file must be non-empty strings")
        out.append(DkimKeyConfig(item["domain"].lower().rstrip("."), item["selector"], item["key_file"]))
    return tuple(out)


def _read_section(
    cls: type,
    prefix: str,
    yaml_values: Mapping[str, Any],
    environ: Mapping[str, str],
    problems: list[str],
) -> Any:
    kwargs: dict[str, Any] = {}
    known = {f.name for f in fields(cls)}
    for key in yaml_values:
        if key not in known or (
            cls is Config and key in SECTIONS and not isinstance(yaml_values[key], dict | None)
        ):
            if key in SECTIONS and cls is Config:
                problems.append(f"{key}: must be a mapping")
            else:
                problems.append(f"{prefix}{key}: unknown key")
    for f in fields(cls):
        path = prefix + f.name
        if cls is Config and f.name in SECTIONS:
            continue
        if path == "dkim.keys":
            if f.name in yaml_values:
                try:
                    kwargs[f.name] = _parse_dkim_keys(yaml_values[f.name])
                except ValueError as e:
                    problems.append(f"{path}: {e}")
            continue
        kind = _kind(cls, f.name)
        env_value = environ.get(env_name(path), "")
        try:
            if env_value != "":
                kwargs[f.name] = _coerce(path, kind, env_value, True)
            elif f.name in yaml_values and yaml_values[f.name] is not None:
                kwargs[f.name] = _coerce(path, kind, yaml_values[f.name], False)
        except ValueError as e:
            source = env_name(path) if env_value != "" else path
            problems.append(f"{source}: {e}")
            continue
        if path in ENUMS and f.name in kwargs and kwargs[f.name] not in ENUMS[path]:
            problems.append(f"{path}: must be one of {', '.join(v for v in ENUMS[path] if v)}")
            del kwargs[f.name]
    return cls(**kwargs)


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Load the configuration per config.md §1: defaults < YAML file < environment.

    Raises:
        ConfigError: listing every problem (unknown keys, bad types, production rules).
    """
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    problems: list[str] = []
    raw: dict[str, Any] = {}
    explicit = path or environ.get("E2A_CONFIG") or None
    candidate = Path(explicit) if explicit else cwd / "e2a.yaml"
    if explicit or candidate.exists():
        try:
            text = candidate.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text) if text.strip() else {}
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                problems.append(f"{candidate}: the top level must be a mapping")
            else:
                raw = loaded
        except OSError as e:
            problems.append(f"{candidate}: cannot read config file: {e.strerror or e}")
        except yaml.YAMLError as e:
            problems.append(f"{candidate}: cannot parse YAML: {e}")
    top = _read_section(Config, "", raw, environ, problems)
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            values = {}
        sections[name] = _read_section(cls, name + ".", values, environ, problems)
    shared = top.shared_domain.strip().rstrip(".")
    if shared and not shared.isascii():
        try:
            import idna

            shared = idna.encode(shared, uts46=True).decode("ascii")
        except idna.IDNAError:
            problems.append("shared_domain: not a valid domain name")
    config = Config(
        env=top.env, data_dir=top.data_dir, shared_domain=shared.lower(), processes=top.processes,
        cpu_affinity=top.cpu_affinity, colocate_threads=top.colocate_threads, **sections
    )
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


@dataclass(frozen=True)
class ConfigSources:
    """Where a configuration came from: the YAML file read (None: defaults and environment only)
    and the names of the non-empty ``E2A_*`` variables that set keys. Logged at start and shown by
    ``e2a-admin check-config`` so the two can be compared (values are never listed: some are secrets).
    """

    file: str | None
    env_keys: tuple[str, ...]


def known_env_names() -> set[str]:
    """Every environment variable ``load_config`` reads (keys, the three aliases, ``E2A_CONFIG``)."""
    names = {"E2A_CONFIG"}
    for f in fields(Config):
        if f.name not in SECTIONS:
            names.add(env_name(f.name))
    for section, cls in SECTIONS.items():
        names.update(env_name(f"{section}.{f.name}") for f in fields(cls))
    return names


def config_sources(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ConfigSources:
    """The sources ``load_config`` with the same arguments reads (same precedence rules)."""
    environ = os.environ if environ is None else environ
    explicit = path or environ.get("E2A_CONFIG") or None
    candidate = Path(explicit) if explicit else (cwd or Path.cwd()) / "e2a.yaml"
    file = str(candidate.absolute()) if (explicit or candidate.exists()) else None
    env_keys = tuple(sorted(n for n in known_env_names() if environ.get(n, "") != ""))
    return ConfigSources(file, env_keys)


#: Written by a running server into its data dir (removed at a clean stop): the sources and the
#: values ``e2a-admin check-config`` compares with its own, so the two never silently disagree.
RUN_RECORD = "server.json"
#: The keys of the running-server record that check-config compares.
RUN_RECORD_COMPARED = ("config_file", "env_keys", "shared_domain", "smtp_domain", "mail_domain", "env")


def run_record(config: Config, sources: ConfigSources, pid: int, started_at: str) -> dict[str, Any]:
    """The running-server record (no secrets: names of variables, never their values)."""
    return {
        "pid": pid,
        "started_at": started_at,
        "config_file": sources.file,
        "env_keys": list(sources.env_keys),
        "env": config.env,
        "shared_domain": config.shared_domain,
        "smtp_domain": config.smtp.domain,
        "mail_domain": config.mail_domain,
    }


def run_record_differences(mine: Mapping[str, Any], running: Mapping[str, Any]) -> list[str]:
    """One line per compared key whose value differs between this command and the running server."""
    out = []
    for key in RUN_RECORD_COMPARED:
        a, b = mine.get(key), running.get(key)
        if a != b:
            out.append(f"{key}: the running server (pid {running.get('pid')}) has {b!r}, this command has {a!r}")
    return out


def validate(config: Config) -> list[str]:
    """Value and production-mode rules (config.md §3); returns problems, never raises."""
    problems: list[str] = []
    for key, addr in (("smtp.listen_addr", config.smtp.listen_addr), ("http.listen_addr", config.http.listen_addr)):
        try:
            parse_host_port(addr)
        except ValueError as e:
            problems.append(f"{key}: {e}")
    for ns in config.dns.nameservers:
        try:
            parse_host_port(ns, default_port=53)
        except ValueError as e:
            problems.append(f"dns.nameservers: {e}")
    positive = {
        "smtp.max_message_size": config.smtp.max_message_size,
        "smtp.max_recipients": config.smtp.max_recipients,
        "smtp.max_line_length": config.smtp.max_line_length,
        "smtp.max_command_length": config.smtp.max_command_length,
        "smtp.max_header_size": config.smtp.max_header_size,
        "smtp.max_connections": config.smtp.max_connections,
        "smtp.max_connections_per_ip": config.smtp.max_connections_per_ip,
        "smtp.idle_timeout": config.smtp.idle_timeout,
        "smtp.data_timeout": config.smtp.data_timeout,
        "smtp.session_timeout": config.smtp.session_timeout,
        "smtp.max_errors": config.smtp.max_errors,
        "smtp.max_messages_per_session": config.smtp.max_messages_per_session,
        "smtp.store_timeout": config.smtp.store_timeout,
        "http.max_connections": config.http.max_connections,
        "http.max_connections_per_ip": config.http.max_connections_per_ip,
        "http.header_timeout": config.http.header_timeout,
        "http.request_timeout": config.http.request_timeout,
        "database.pool_size": config.database.pool_size,
        "dns.timeout": config.dns.timeout,
        "webhooks.timeout": config.webhooks.timeout,
        "outbound.max_recipients": config.outbound.max_recipients,
        "websocket.max_connections_per_agent": config.websocket.max_connections_per_agent,
        "websocket.drain_page_size": config.websocket.drain_page_size,
        "retention.days": config.retention.days,
        "logging.rotate_mb": config.logging.rotate_mb,
    }
    for key, value in positive.items():
        if value <= 0:
            problems.append(f"{key}: must be a positive integer")
    if not 1 <= config.processes <= MAX_PROCESSES:
        problems.append(f"processes: must be between 1 and {MAX_PROCESSES}")
    if any(not 0 <= cpu < MAX_CPU for cpu in config.cpu_affinity):
        problems.append(f"cpu_affinity: CPU numbers must be between 0 and {MAX_CPU - 1}")
    elif len(set(config.cpu_affinity)) != len(config.cpu_affinity):
        problems.append("cpu_affinity: a CPU is listed twice")
    for key, value in (("outbound_smtp.port", config.outbound_smtp.port), ("outbound.mx_port", config.outbound.mx_port)):
        if not 0 < value <= 65535:
            problems.append(f"{key}: must be a TCP port (1-65535)")
    if config.http.max_connections_per_ip > config.http.max_connections > 0:
        problems.append("http.max_connections_per_ip: must not exceed http.max_connections")
    if config.http.request_timeout < config.http.header_timeout > 0:
        problems.append("http.request_timeout: must be at least http.header_timeout")
    for cidr in config.http.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"http.trusted_proxies: {cidr!r} is not an IP network")
    if config.outbound_smtp.tls == "none" and config.outbound_smtp.host and not _is_loopback_host(config.outbound_smtp.host):
        problems.append("outbound_smtp.tls: 'none' is only allowed for a loopback host")
    for key, value in (
        ("webhooks.max_concurrency_per_agent", config.webhooks.max_concurrency_per_agent),
        ("webhooks.retry_after_cap", config.webhooks.retry_after_cap),
        ("hitl.sweep_interval", config.hitl.sweep_interval),
        ("retention.sweep_interval", config.retention.sweep_interval),
        ("websocket.ping_interval", config.websocket.ping_interval),
        ("websocket.ping_timeout", config.websocket.ping_timeout),
        ("outbound.max_queue_age", config.outbound.max_queue_age),
    ):
        if value <= 0:
            problems.append(f"{key}: must be a positive integer")
    if config.hitl.token_grace < 0:
        problems.append("hitl.token_grace: must not be negative")
    if config.logging.keep_files < 0:
        problems.append("logging.keep_files: must not be negative (0 keeps every rotated file)")
    if not 0 <= config.webhooks.jitter < 1:
        problems.append("webhooks.jitter: must be in [0, 1)")
    if not config.webhooks.retry_schedule or any(s < 0 for s in config.webhooks.retry_schedule):
        problems.append("webhooks.retry_schedule: must be a non-empty list of non-negative seconds")
    if config.http.public_url:
        parts = urlsplit(config.http.public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("http.public_url: must be an absolute http(s) URL")
    if config.signing.master_key and _decode_master_key(config.signing.master_key) is None:
        problems.append(f"{env_name('signing.master_key')}: must be 64 hex characters or base64 of 32 bytes")
    if config.production:
        if not config.signing.hmac_secret:
            problems.append(f"{env_name('signing.hmac_secret')}: required in production")
        elif len(config.signing.hmac_secret.encode()) < 32 or config.signing.hmac_secret in WEAK_HMAC_SECRETS:
            problems.append(f"{env_name('signing.hmac_secret')}: too weak (need at least 32 bytes, not the example value)")
        if not config.signing.master_key and not config.signing.master_key_file:
            problems.append("signing.master_key: required in production (or signing.master_key_file)")
        if not config.database.url:
            problems.append("database.url: required in production (the embedded database is for development)")
        if not config.http.public_url.startswith("https://"):
            problems.append("http.public_url: required in production and must be https://")
        if config.webhooks.allow_private:
            problems.append("webhooks.allow_private: not allowed in production")
        if config.domains.auto_verify:
            problems.append("domains.auto_verify: not allowed in production")
        if config.smtp.domain == DEFAULT_SMTP_DOMAIN:
            problems.append("smtp.domain: must be set to a real host name in production")
    return problems


def _is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _decode_master_key(text: str) -> bytes | None:
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """Read a generated development secret, creating it 0600 on first start."""
    if path.exists():
        return path.read_text(encoding="ascii").strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    return value


def ensure_data_dir(config: Config) -> Path:
    data_dir = Path(config.data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return data_dir


def resolve_master_key(config: Config) -> bytes:
    """The 32-byte AES-256-GCM key: configured value, key file, or (development) generated file."""
    if config.signing.master_key:
        key = _decode_master_key(config.signing.master_key)
    elif config.signing.master_key_file:
        try:
            key = _decode_master_key(Path(config.signing.master_key_file).read_text(encoding="ascii"))
        except OSError as e:
            raise ConfigError([f"signing.master_key_file: cannot read: {e.strerror or e}"]) from None
    else:
        text = _read_or_create_secret(ensure_data_dir(config) / "master.key", lambda: secrets.token_hex(32))
        key = _decode_master_key(text)
    if key is None:
        raise ConfigError(["signing.master_key: must be 64 hex characters or base64 of 32 bytes"])
    return key


def resolve_hmac_secret(config: Config) -> str:
    if config.signing.hmac_secret:
        return config.signing.hmac_secret
    return _read_or_create_secret(ensure_data_dir(config) / "hmac.secret", lambda: secrets.token_hex(32))


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data with secrets shown as ``***``."""
    out: dict[str, Any] = {"env": config.env, "data_dir": config.data_dir, "shared_domain": config.shared_domain}
    for name in SECTIONS:
        section = getattr(config, name)
        values = {}
        for f in fields(section):
            value = getattr(section, f.name)
            if f"{name}.{f.name}" in SECRET_KEYS and value:
                value = "***"
            elif isinstance(value, tuple):
                value = [v.__dict__ if hasattr(v, "__dict__") else v for v in value]
            values[f.name] = value
        out[name] = values
    return out
