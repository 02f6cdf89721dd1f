"""One line and an exit code per start-up failure, naming the key that controls it (e2a.startup)."""

from __future__ import annotations

import errno

import psycopg2
import pytest

from twisted.internet.error import CannotListenError

from e2a.config import Config, DatabaseConfig, HttpConfig, SmtpConfig
from e2a.errors import ConfigError
from e2a.startup import describe_failure
from e2a.store.database import DatabaseUnavailable
from e2a.store.embedded import EmbeddedPostgresError, EmbeddedUnreachable

CONFIG = Config(
    data_dir="/srv/e2a",
    http=HttpConfig(listen_addr="127.0.0.1:8080"),
    smtp=SmtpConfig(listen_addr=":2525"),
)


def _in_use(port: int) -> CannotListenError:
    return CannotListenError("127.0.0.1", port, OSError(errno.EADDRINUSE, "Address already in use"))


@pytest.mark.parametrize(
    ("exc", "config", "code", "needles"),
    [
        (_in_use(8080), CONFIG, 1, ["HTTP", "127.0.0.1:8080", "address already in use", "http.listen_addr"]),
        (_in_use(2525), CONFIG, 1, ["SMTP", ":2525", "smtp.listen_addr"]),
        (ConfigError(["smtp.max_recipients: must be an integer"]), CONFIG, 2, ["smtp.max_recipients"]),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/e2a"), CONFIG, 1,
         ["/srv/e2a", "permission denied", "data_dir"]),
        (EmbeddedPostgresError("pg_ctl failed (1): could not bind\n--- postgres.log ---\nLOG:  starting\nFATAL:  could not create lock file\nLOG:  done"), CONFIG, 1,
         ["embedded PostgreSQL failed", "could not bind", "FATAL:  could not create lock file", "/srv/e2a/pg/postgres.log", "database.url"]),
        (EmbeddedUnreachable("embedded PostgreSQL: … /root is not searchable …; choose another data_dir"), CONFIG, 1,
         ["/root is not searchable", "data_dir"]),
        (DatabaseUnavailable("cannot connect to the database: Connection refused"),
         Config(database=DatabaseConfig(url="postgresql://e2a@db/e2a")), 1, ["Connection refused", "database.url"]),
        (psycopg2.OperationalError("FATAL: password authentication failed\nDETAIL: x"),
         Config(database=DatabaseConfig(url="postgresql://e2a@db/e2a")), 1, ["password authentication", "database.url"]),
        (RuntimeError("something odd"), CONFIG, 1, ["RuntimeError: something odd", "logging.level: debug"]),
    ],
)
def test_describe_failure_names_what_failed_and_its_key(exc, config, code, needles):
    """Each failure class maps to its exit code and one line with the controlling key."""
    got_code, line = describe_failure(exc, config)
    assert got_code == code
    assert "\n" not in line
    for needle in needles:
        assert needle in line, line


def test_describe_failure_names_the_tls_keys_for_a_bad_certificate():
    """A ValueError raised while loading the STARTTLS files names smtp.tls_cert/smtp.tls_key."""
    config = Config(smtp=SmtpConfig(tls_cert="/etc/e2a/cert.pem", tls_key="/etc/e2a/key.pem"))
    code, line = describe_failure(ValueError("Unable to load PEM file"), config, ["_start", "load_tls_options"])
    assert code == 1
    assert "/etc/e2a/cert.pem" in line and "smtp.tls_cert" in line and "Unable to load PEM" in line
