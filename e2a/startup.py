"""One line and an exit code for every way a start can fail (config.md §3; exit codes as e2a-admin).

Why a table of rules and not the traceback: the operator needs to know *what* failed and *which
key* controls it ("port 8080 is taken — http.listen_addr"); a traceback says where in e2a the
exception surfaced, which only helps a developer (it is still logged with ``logging.level:
debug``). Exit codes: 2 for configuration problems (as ``e2a-admin`` and the config loader),
1 for everything at run time (a port, the database, the data directory).

twistd itself has no way to turn a failed asynchronous start into an exit status (it returns 0
once the reactor stops), so :func:`exit_after_shutdown` ends the process with the code once
twistd has finished its own clean-up (pid file, log).
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _listener_key(exc: Any, config: Any) -> tuple[str, str]:
    """(label, key) of the listener whose port failed to bind (CannotListenError.port)."""
    from e2a.config import parse_host_port

    port = getattr(exc, "port", None)
    for label, section in (("HTTP", "http"), ("SMTP", "smtp")):
        addr = getattr(getattr(config, section), "listen_addr", "")
        try:
            _host, wanted = parse_host_port(addr)
        except Exception:
            continue
        if port is not None and int(wanted) == int(port):
            return label, f"{section}.listen_addr"
    return "a listener", "http.listen_addr / smtp.listen_addr"


def _oserror_text(exc: BaseException) -> str:
    inner = getattr(exc, "socketError", None) or exc  # CannotListenError wraps the socket error
    strerror = getattr(inner, "strerror", None)
    if strerror:
        return str(strerror).lower()
    return _first_line(str(inner)) or type(inner).__name__


def describe_failure(exc: BaseException, config: Any, where: Sequence[str] = ()) -> tuple[int, str]:
    """``(exit code, one line)`` for a start-up failure; the line names what failed and its key.

    ``where``: names of the functions the exception passed through (a Failure's ``frames``),
    for failures whose type alone does not say what failed (a bad PEM file is a ValueError).
    """
    from twisted.internet.error import CannotListenError

    from e2a.errors import ConfigError
    from e2a.store.embedded import EmbeddedPostgresError, EmbeddedUnreachable

    if "load_tls_options" in where:
        smtp = config.smtp
        reason = _oserror_text(exc) if isinstance(exc, OSError) else _first_line(str(exc)) or type(exc).__name__
        return EXIT_RUNTIME, (
            f"cannot load the SMTP TLS certificate/key ({smtp.tls_cert}, {smtp.tls_key}): {reason}; "
            "check smtp.tls_cert and smtp.tls_key"
        )
    if isinstance(exc, ConfigError):
        problems = getattr(exc, "problems", None) or [str(exc)]
        return EXIT_CONFIG, "config error: " + "; ".join(str(p) for p in problems)
    if isinstance(exc, CannotListenError):
        label, key = _listener_key(exc, config)
        address = f"{exc.interface or '*'}:{exc.port}"
        reason = _oserror_text(exc)
        hint = " (another process uses it)" if getattr(exc.socketError, "errno", None) == errno.EADDRINUSE else ""
        return EXIT_RUNTIME, f"cannot listen for {label} on {address}: {reason}{hint}; change {key}"
    if isinstance(exc, EmbeddedUnreachable):
        return EXIT_RUNTIME, str(exc)
    if isinstance(exc, EmbeddedPostgresError):
        pgdata = os.path.join(os.path.abspath(config.data_dir), "pg")
        line = _first_line(str(exc))
        if line.startswith("embedded PostgreSQL"):
            return EXIT_RUNTIME, line
        # the server's own reason, from the log tail the error carries, says more than pg_ctl's
        fatal = [ln.strip() for ln in str(exc).splitlines() if "FATAL:" in ln or "PANIC:" in ln]
        reason = f"{line}: {fatal[-1]}" if fatal else line
        return EXIT_RUNTIME, (
            f"embedded PostgreSQL failed to start ({reason}); see {pgdata}/postgres.log, "
            f"or set database.url to use another PostgreSQL"
        )
    if _is_database_error(exc):
        key = "database.url" if config.database.url else "database.url (empty: the embedded PostgreSQL)"
        return EXIT_RUNTIME, f"cannot use the database: {_first_line(str(exc)) or type(exc).__name__}; check {key}"
    if type(exc).__name__ == "MigrationError":
        return EXIT_RUNTIME, f"database migrations: {_first_line(str(exc))} (database.auto_migrate)"
    if isinstance(exc, OSError):
        path = exc.filename or config.data_dir
        return EXIT_RUNTIME, f"cannot use {path}: {_oserror_text(exc)}; check data_dir and its permissions"
    text = _first_line(str(exc))
    return EXIT_RUNTIME, (
        f"start-up failed: {type(exc).__name__}{': ' + text if text else ''} "
        "(set logging.level: debug for the traceback)"
    )


def _is_database_error(exc: BaseException) -> bool:
    try:
        import psycopg2
    except ImportError:  # pragma: no cover
        return False
    from e2a.store.database import DatabaseUnavailable

    return isinstance(exc, (psycopg2.Error, DatabaseUnavailable))


_exit_code: list[int] = []


def exit_after_shutdown(code: int) -> None:
    """Make the process exit with ``code`` once the interpreter winds down (after twistd has
    removed its pid file and stopped logging). Registered once; the first code wins."""
    if _exit_code:
        return
    _exit_code.append(code)

    def hard_exit() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(_exit_code[0])

    atexit.register(hard_exit)
