"""Log observers applying ``logging.format`` and ``logging.level`` (config.md §2.6, §3).

twistd picks its log observer *after* building the application: ``ApplicationRunner.run`` calls
``createOrGetApplication()`` (``makeService`` + ``setServiceParent``) and only then
``AppLogger.start(application)``, which uses the application's ``ILogObserver`` component when
there is one. So e2a builds its observer here and the service (or ``e2a.tac``) sets it as that
component; twistd then begins logging to it exactly as it would to its own text observer,
including the stdout/stderr redirection and the "Server Shut Down" line.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.logfile import LogFile

from e2a.config import Config

# e2a's level names (config.md §2.6) to Twisted's; "warn" is Twisted's own spelling too.
LOG_LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def log_level(name: str) -> LogLevel:
    """The ``LogLevel`` for an e2a level name; config validation already rejected others."""
    try:
        return LOG_LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}") from None


def build_log_observer(
    config: Config,
    out: IO[Any],
    *,
    log_format: str | None = None,
    time_format: str | None = timeFormatRFC3339,
) -> ILogObserver:
    """An observer writing ``out`` in ``config.log_format``, dropping events below ``logging.level``.

    Why a ``FilteringLogObserver`` and not a level check at each call site: Twisted's own events
    (twistd, web, mail) and the legacy ``log.msg``/stdout bridge all flow through the global
    publisher, so one predicate at the observer filters everything alike. Events without a level
    or namespace are dropped by ``LogLevelFilterPredicate``; every source e2a has sets both.

    JSON is one plain JSON object per line (no RFC 7464 record separator, unlike Twisted's
    default) so line-oriented collectors can parse each line with a stock JSON reader.
    ``log_format`` overrides the configured format (the ``processes: N`` children always write
    text lines for the parent to relay); ``time_format`` is for the text format only.
    """
    fmt = log_format or config.log_format
    if fmt == "json":
        inner = jsonFileLogObserver(out, recordSeparator="")
    elif fmt == "text":
        inner = textFileLogObserver(out, timeFormat=time_format)
    else:
        raise ValueError(f"unknown log format {fmt!r}")
    predicate = LogLevelFilterPredicate(defaultLogLevel=log_level(config.logging.level))
    return FilteringLogObserver(inner, [predicate])


def twistd_log_file(twistd_options: Any, reactor: Any) -> IO[Any] | None:
    """Where twistd's own ``UnixAppLogger`` would write, or None to leave twistd's observer alone.

    Mirrors ``twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver`` so replacing the observer
    changes only the format and level, never the destination: ``--logfile=-`` or no ``--logfile``
    with ``--nodaemon`` is stdout, a path is a rotating ``LogFile`` (with twistd's SIGUSR1 reopen),
    a daemon without ``--logfile`` writes ``twistd.log``. None (twistd decides) for ``--syslog``,
    a custom ``--logger`` (twistd ignores the component then anyway), a daemon asked to log to
    stdout (twistd exits with its own message) and when there are no twistd options at all.
    """
    if twistd_options is None:
        return None
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    logfile = twistd_options.get("logfile") or ""
    # preApplication already folded --debug into nodaemon; keep the rule if called earlier.
    nodaemon = bool(twistd_options.get("nodaemon") or twistd_options.get("debug"))
    if logfile == "-":
        return sys.stdout if nodaemon else None
    if nodaemon and not logfile:
        return sys.stdout
    log_file = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_sigusr1(log_file, reactor)
    return log_file


def _rotate_on_sigusr1(log_file: LogFile, reactor: Any) -> None:
    """twistd's log rotation on SIGUSR1, installed the same way (only when nothing else handles it)."""
    if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1):
        return

    def rotate(_signum: int, _frame: Any) -> None:
        reactor.callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)


def twistd_log_observer(config: Config, twistd_options: Any, reactor: Any) -> ILogObserver | None:
    """The observer for ``twistd … e2a``: ``build_log_observer`` on twistd's own destination.

    ``reactor`` only schedules the SIGUSR1 log rotation, as twistd does.
    """
    out = twistd_log_file(twistd_options, reactor)
    if out is None:
        return None
    return build_log_observer(config, out)
