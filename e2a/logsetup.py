"""Log observers applying ``logging.format`` and ``logging.level`` (config.md §2.6, §3).

twistd picks its log observer *after* building the application: ``ApplicationRunner.run`` calls
``createOrGetApplication()`` (``makeService`` + ``setServiceParent``) and only then
``AppLogger.start(application)``, which uses the application's ``ILogObserver`` component when
there is one. So e2a builds its observer here and the service (or ``e2a.tac``) sets it as that
component; twistd then begins logging to it exactly as it would to its own text observer,
including the stdout/stderr redirection and the "Server Shut Down" line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import IO, Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.logfile import LogFile
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

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
        inner = FileLogObserver(out, text_event_formatter(time_format))
    else:
        raise ValueError(f"unknown log format {fmt!r}")
    predicate = LogLevelFilterPredicate(defaultLogLevel=log_level(config.logging.level))
    return FilteringLogObserver(inner, [predicate])


# Namespaces whose events are known to use plain ``{name}``/``{name!r}`` fields only (e2a.maillog).
_FAST_TEXT_NAMESPACES = frozenset(("e2a.mail",))


def text_event_formatter(time_format: str | None = timeFormatRFC3339) -> Any:
    """``textFileLogObserver``'s formatter, byte for byte, made cheap for the mail-flow lines.

    Why: one ``mail.accepted`` line per message cost ~70 µs of reactor-thread CPU, half of it in
    Twisted's pure-Python ``string.Formatter`` (needed only for its ``{callable()}`` extension)
    and a quarter in building the same timestamp again. The mail-flow events (``e2a.mail``) use
    plain fields only, so their text is rendered with C ``str.format_map``; the timestamp text is
    reused within one second when the format has no sub-second field. Every other event, and any
    mail-flow event that could differ (a failure, a ``log_system``, a ``()`` call in the format, an
    exception while formatting), goes through Twisted's own ``formatEventAsClassicLogText``.
    """
    cache_time = time_format is not None and "%f" not in time_format
    last: list[Any] = [None, ""]

    def format_time(when: float | None) -> str:
        if time_format is None or when is None:
            return "-"
        if not cache_time:
            return formatTime(when, time_format)
        second = int(when)
        if second != last[0]:
            last[1] = formatTime(second, time_format)
            last[0] = second
        return last[1]

    def format_event(event: dict[str, Any]) -> str | None:
        if event.get("log_namespace") in _FAST_TEXT_NAMESPACES and not (
            "log_failure" in event or "log_system" in event or "log_flattened" in event
        ):
            fmt = event.get("log_format")
            level = event.get("log_level")
            if isinstance(fmt, str) and "()" not in fmt and level is not None:
                try:
                    text = fmt.format_map(event)
                except Exception:
                    text = None  # Twisted's formatter writes its "Unable to format" line
                if text is not None:
                    if not text:
                        return None
                    line = f"{format_time(event.get('log_time'))} [{event['log_namespace']}#{level.name}] {text}"
                    return line.replace("\n", "\n\t") + "\n"
        return formatEventAsClassicLogText(event, formatTime=format_time)

    return format_event


class RotatingLogFile(LogFile):
    """Twisted's ``LogFile``, counting as rotated files only ``NAME.<number>``.

    WHY: Twisted's own count takes whatever follows the last dot of any ``NAME.*``, so a file an
    operator leaves beside the log (``e2a.log.old.3``) counts as rotated file 3; the next rotation
    then fails to rename it, and so does every write after it: logging stops.
    """

    def listLogs(self) -> list[int]:  # noqa: N802 - Twisted's name
        rotated = re.compile(re.escape(os.path.basename(self.path)) + r"\.([1-9][0-9]*)")
        return sorted(
            int(m.group(1)) for name in os.listdir(self.directory) if (m := rotated.fullmatch(name))
        )


def twistd_log_file(
    twistd_options: Any, reactor: Any, rotate_bytes: int = 1_000_000, keep_files: int = 0
) -> IO[Any] | None:
    """Where twistd's own ``UnixAppLogger`` would write, or None to leave twistd's observer alone.

    Mirrors ``twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver`` so replacing the observer
    changes only the format and level, never the destination: ``--logfile=-`` or no ``--logfile``
    with ``--nodaemon`` is stdout, a path is a rotating ``LogFile`` (with twistd's SIGUSR1 reopen),
    a daemon without ``--logfile`` writes ``twistd.log``. None (twistd decides) for ``--syslog``,
    a custom ``--logger`` (twistd ignores the component then anyway), a daemon asked to log to
    stdout (twistd exits with its own message) and when there are no twistd options at all.

    The file rotates at ``rotate_bytes`` and keeps ``keep_files`` rotated files (0: all, as
    twistd does; ``logging.rotate_mb``/``logging.keep_files``). WHY not twistd's 1 MB and every
    file: at one line per message a busy gateway rotated every few seconds, and each rotation
    renames every kept file, in the thread that serves mail, while the disk fills.
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
    log_file = RotatingLogFile.fromFullPath(
        logfile or "twistd.log", rotateLength=rotate_bytes, maxRotatedFiles=keep_files or None
    )
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
    out = twistd_log_file(
        twistd_options, reactor, config.logging.rotate_mb * 1_000_000, config.logging.keep_files
    )
    if out is None:
        return None
    return build_log_observer(config, out)


# ---------------------------------------------------------------- quiet client connections
#
# Twisted factories log "Starting factory <… at 0x…>" / "Stopping factory …" whenever they start
# and stop, and client factories do so for every outgoing connection: one webhook POST or relay
# session would add two lines of noise to the mail-flow lines (docs/logging.md). Server factories
# set ``noisy = False`` where they are defined; client connections go through these helpers.


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_pool(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """``pool`` with a factory that does not log each new connection (Twisted's documented
    extension point is the pool's ``_factory`` attribute)."""
    pool._factory = _QuietHTTP11ClientFactory
    return pool


class _OneShotFactory(Factory):
    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 - Twisted API
        return self._proto


def quiet_connect(endpoint: Any, proto: Protocol) -> Any:
    """``endpoints.connectProtocol`` without the two factory log lines per connection."""
    return endpoint.connect(_OneShotFactory(proto))


# ---------------------------------------------------------------- processes: N, structured relay
#
# With ``processes: N`` a child writes plain text lines that the parent relays into its own log
# (e2a.processes). Text would flatten the mail-flow events (e2a.maillog) and lose their fields in
# a JSON log, so a child writes those events as one marked JSON line instead, and the parent
# re-emits them with every field (plus ``process``), in whatever format the parent logs.

STRUCTURED_MARK = "@e2a-event "
_STRUCTURED_NAMESPACES = ("e2a.mail",)


def _plain_fields(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith("log_") and key not in ("log_format", "log_namespace"):
            continue
        if isinstance(value, str | int | float | bool | type(None)) or (
            isinstance(value, list) and all(isinstance(v, str | int | float) for v in value)
        ):
            out[key] = value
    return out


def child_log_observer(config: Config, out: IO[Any]) -> ILogObserver:
    """A child process's observer: text lines, except mail-flow events as marked JSON lines."""
    text = build_log_observer(config, out, log_format="text", time_format=None)

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") in _STRUCTURED_NAMESPACES:
            level = event.get("log_level")
            if level is not None and level < log_level(config.logging.level):
                return
            out.write(STRUCTURED_MARK + json.dumps(_plain_fields(event), separators=(",", ":")) + "\n")
            out.flush()
            return
        text(event)

    return observe


def relay_structured(line: str, index: int) -> bool:
    """Re-emit a child's marked line (``child_log_observer``) in this process; False if unmarked."""
    if not line.startswith(STRUCTURED_MARK):
        return False
    try:
        fields = json.loads(line[len(STRUCTURED_MARK):])
        fmt = str(fields.pop("log_format"))
        namespace = str(fields.pop("log_namespace", "e2a.mail"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    Logger(namespace=namespace).info("[process {process}] " + fmt, process=index, **fields)
    return True
