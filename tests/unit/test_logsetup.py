"""logging.format / logging.level (config.md §2.6, §3): the observer twistd logs to, and where it writes."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import sys

import pytest

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import FilteringLogObserver, ILogObserver, Logger, LogLevel
from twisted.python.logfile import LogFile

from e2a.config import Config, LoggingConfig
from e2a.logsetup import build_log_observer, log_level, twistd_log_file, twistd_log_observer
from e2a.service import E2AService, FailedStart, build_service

LEVELS = ["debug", "info", "warn", "error"]


def _config(fmt: str = "", level: str = "info", env: str = "development") -> Config:
    return Config(env=env, logging=LoggingConfig(format=fmt, level=level))


def _emit(observer: ILogObserver, level: str, text: str = "hello {who}") -> None:
    Logger(namespace="e2a.test", observer=observer).emit(LogLevel.levelWithName(level), text, who="world")


@pytest.mark.parametrize("configured", LEVELS)
@pytest.mark.parametrize("event", LEVELS)
def test_events_pass_only_at_or_above_the_configured_level(configured, event):
    """An event is written iff its level ≥ logging.level (debug dropped at info, error passes at warn…)."""
    out = io.StringIO()
    _emit(build_log_observer(_config(level=configured), out), event)
    assert bool(out.getvalue()) == (LEVELS.index(event) >= LEVELS.index(configured))


@pytest.mark.parametrize(
    ("name", "level"),
    [("debug", LogLevel.debug), ("info", LogLevel.info), ("warn", LogLevel.warn), ("error", LogLevel.error)],
)
def test_level_names_map_to_twisted_levels(name, level):
    """e2a's level names are Twisted's (`warn` → LogLevel.warn)."""
    assert log_level(name) is level


def test_unknown_level_name_is_rejected():
    """A name config validation would have refused is an error, not a silent default."""
    with pytest.raises(ValueError):
        log_level("warning")


def test_json_format_writes_one_json_object_per_line():
    """json: each event is one plain JSON object on its own line, with level and namespace."""
    out = io.StringIO()
    observer = build_log_observer(_config(fmt="json", level="debug"), out)
    _emit(observer, "info", "e2a started on {who}")
    _emit(observer, "warn")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    events = [json.loads(line) for line in lines]
    assert events[0]["log_level"]["name"] == "info"
    assert events[1]["log_level"]["name"] == "warn"
    assert {e["log_namespace"] for e in events} == {"e2a.test"}
    assert events[0]["log_format"] == "e2a started on {who}" and events[0]["who"] == "world"


def test_text_format_writes_the_formatted_message():
    """text: the classic Twisted line with the message filled in."""
    out = io.StringIO()
    _emit(build_log_observer(_config(fmt="text"), out), "info")
    assert out.getvalue().endswith(" [e2a.test#info] hello world\n")


@pytest.mark.parametrize(
    ("env", "fmt", "json_expected"),
    [("development", "", False), ("production", "", True), ("production", "text", False), ("development", "json", True)],
)
def test_format_defaults_to_text_in_development_and_json_in_production(env, fmt, json_expected):
    """The effective format is config.log_format: explicit value, else by env (config.md §3)."""
    out = io.StringIO()
    _emit(build_log_observer(_config(fmt=fmt, env=env), out), "info")
    assert out.getvalue().startswith("{") == json_expected


def test_format_override_keeps_text_without_timestamps_for_children():
    """log_format/time_format overrides: a JSON-configured child still writes `- [ns#level] msg` lines."""
    out = io.StringIO()
    observer = build_log_observer(_config(fmt="json", level="warn"), out, log_format="text", time_format=None)
    _emit(observer, "info")
    _emit(observer, "warn")
    assert out.getvalue() == "- [e2a.test#warn] hello world\n"


def test_observer_is_a_filtering_log_observer():
    """twistd accepts it as an ILogObserver component."""
    observer = build_log_observer(_config(), io.StringIO())
    assert isinstance(observer, FilteringLogObserver) and ILogObserver.providedBy(observer)


# ---- where twistd would write ----------------------------------------------------------------


class _Reactor:
    def __init__(self) -> None:
        self.calls: list[object] = []

    def callFromThread(self, f, *a):  # noqa: N802 - reactor API
        self.calls.append(f)


@pytest.mark.parametrize(
    "options",
    [
        {"nodaemon": True, "logfile": None},
        {"nodaemon": True, "logfile": "-"},
        {"nodaemon": False, "debug": True, "logfile": ""},
    ],
)
def test_nodaemon_without_logfile_or_with_dash_writes_stdout(options):
    """`-n` with no --logfile, or --logfile=-, is stdout, as twistd's UnixAppLogger."""
    assert twistd_log_file(options, _Reactor()) is sys.stdout


@pytest.mark.parametrize(
    "options",
    [
        None,
        {"nodaemon": True, "syslog": True, "logfile": None},
        {"nodaemon": True, "logger": "some.module.factory", "logfile": None},
        {"nodaemon": False, "logfile": "-"},
    ],
)
def test_twistd_keeps_its_own_observer_for_syslog_logger_or_a_daemon_on_stdout(options):
    """--syslog, --logger, a daemon logging to stdout (twistd exits) or no twistd at all: no observer."""
    assert twistd_log_file(options, _Reactor()) is None
    assert twistd_log_observer(_config(), options, _Reactor()) is None


@pytest.fixture
def restore_sigusr1():
    saved = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, saved)


@pytest.mark.parametrize(("logfile", "name"), [("e2a.log", "e2a.log"), ("", "twistd.log"), (None, "twistd.log")])
def test_logfile_path_or_daemon_default_is_a_rotating_logfile(tmp_path, monkeypatch, restore_sigusr1, logfile, name):
    """--logfile=PATH (or a daemon without one: twistd.log) is a LogFile rotated on SIGUSR1, as twistd does."""
    monkeypatch.chdir(tmp_path)
    reactor = _Reactor()
    out = twistd_log_file({"nodaemon": bool(logfile), "logfile": logfile}, reactor)
    try:
        assert isinstance(out, LogFile) and out.path == str(tmp_path / name)
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        assert reactor.calls == [out.rotate]
    finally:
        out.close()


def test_sigusr1_handler_already_set_is_left_alone(tmp_path, restore_sigusr1):
    """Like twistd, an existing SIGUSR1 handler wins."""

    def mine(_signum, _frame):
        return None

    signal.signal(signal.SIGUSR1, mine)
    out = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "x.log")}, _Reactor())
    try:
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        out.close()


# ---- handing it to twistd ---------------------------------------------------------------------


def _service(tmp_path, observer: ILogObserver | None = None) -> E2AService:
    """A built, never started service (its data dir and secrets in ``tmp_path``)."""
    config = dataclasses.replace(_config(), data_dir=str(tmp_path / "data"))
    built = build_service(config, reactor, standalone=False, log_observer=observer)
    assert isinstance(built, E2AService)
    return built


def test_service_sets_its_observer_on_the_twistd_application(tmp_path):
    """setServiceParent puts log_observer on the application, where AppLogger.start looks for it."""
    observer = build_log_observer(_config(), io.StringIO())
    application = service.Application("e2a")
    _service(tmp_path, observer).setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    assert service.IServiceCollection(application).getServiceNamed("e2a") is not None


def test_service_without_observer_leaves_the_application_alone(tmp_path):
    """No observer (tests, e2a.tac): twistd's default stays."""
    application = service.Application("e2a")
    _service(tmp_path).setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is None


def test_service_under_a_plain_multiservice_is_attached_normally(tmp_path):
    """A parent that is not Componentized (a MultiService) just gets the child."""
    parent = service.MultiService()
    child = _service(tmp_path, build_log_observer(_config(), io.StringIO()))
    child.setServiceParent(parent)
    assert child.parent is parent


def test_failed_build_sets_the_observer_and_reports_at_start(tmp_path):
    """A graph that cannot be built (data_dir under a file) still hands twistd its observer,
    and reports the one line only when started, as a failed start-up step does."""
    (tmp_path / "file").write_text("not a directory")
    config = dataclasses.replace(_config(), data_dir=str(tmp_path / "file" / "data"))
    observer = build_log_observer(_config(), io.StringIO())
    built = build_service(config, reactor, standalone=True, log_observer=observer)
    assert isinstance(built, FailedStart)
    application = service.Application("e2a")
    built.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    with pytest.raises(OSError):
        build_service(config, reactor, standalone=False)


def test_tap_makeservice_builds_the_observer_from_twistd_options(tmp_path, monkeypatch):
    """`twistd -n e2a` with E2A_LOGGING_FORMAT=json: the application's observer writes JSON to stdout."""
    from e2a import tap

    for key in [k for k in os.environ if k.startswith("E2A_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("E2A_LOGGING_FORMAT", "json")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    options = tap.Options()
    options.parseOptions([])
    options.parent = {"nodaemon": True, "logfile": None, "syslog": False}
    application = service.Application("e2a")
    tap.makeService(options).setServiceParent(application)
    _emit(application.getComponent(ILogObserver), "info")
    assert json.loads(out.getvalue())["log_namespace"] == "e2a.test"


# ---- the log file's size and the files it keeps -----------------------------------------------


def _fill(out: LogFile, lines: int, size: int = 100) -> None:
    for n in range(lines):
        out.write(f"{n:09d} " + "x" * (size - 11) + "\n")


@pytest.mark.parametrize(("keep", "expected"), [(2, ["x.log", "x.log.1", "x.log.2"]),
                                                (0, ["x.log"] + [f"x.log.{n}" for n in range(1, 10)])])
def test_log_file_rotates_at_its_size_and_keeps_so_many_files(tmp_path, restore_sigusr1, keep, expected):
    """Rotated at ``rotate_bytes``; only ``keep_files`` rotated files stay, the newest (0: all)."""
    out = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "x.log")}, _Reactor(), 1000, keep)
    try:
        _fill(out, 100)  # 10,000 bytes: nine rotations
    finally:
        out.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    newest = (tmp_path / "x.log.1").read_text()
    assert newest.startswith("000000080 ") and newest.endswith("\n")  # lines 80-89, the last rotated


def test_files_beside_the_log_are_not_taken_for_rotated_ones(tmp_path, restore_sigusr1):
    """``x.log.old.3`` or ``x.log.bak`` beside the log: rotation goes on and leaves them alone
    (Twisted's own count took ``.old.3`` for rotated file 3, failed to rename it, and every
    write after that failed too)."""
    for stray in ("x.log.old.3", "x.log.bak", "x.log.01x", "x.log.0"):
        (tmp_path / stray).write_text("keep me\n")
    out = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "x.log")}, _Reactor(), 1000, 2)
    try:
        _fill(out, 50)  # four rotations
    finally:
        out.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["x.log", "x.log.1", "x.log.2", "x.log.old.3", "x.log.bak", "x.log.01x", "x.log.0"])
    assert (tmp_path / "x.log.old.3").read_text() == "keep me\n"
    assert (tmp_path / "x.log").read_text().endswith("000000049 " + "x" * 89 + "\n")


def test_the_first_rotation_drops_every_file_past_the_limit(tmp_path, restore_sigusr1):
    """An existing log with more rotated files than ``keep_files`` (say, kept by twistd before)
    keeps only the newest ``keep_files`` after its first rotation."""
    for n in range(1, 21):
        (tmp_path / f"x.log.{n}").write_text(f"old {n}\n")
    out = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "x.log")}, _Reactor(), 1000, 3)
    try:
        out.rotate()
    finally:
        out.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.log", "x.log.1", "x.log.2", "x.log.3"]
    assert (tmp_path / "x.log.2").read_text() == "old 1\n"


def test_log_file_settings_come_from_the_configuration(tmp_path, restore_sigusr1):
    """twistd_log_observer rotates at ``logging.rotate_mb`` and keeps ``logging.keep_files``."""
    config = dataclasses.replace(_config(), logging=LoggingConfig(rotate_mb=1, keep_files=1))
    observer = twistd_log_observer(config, {"nodaemon": True, "logfile": str(tmp_path / "e.log")}, _Reactor())
    assert observer is not None
    log = Logger(namespace="e2a.mail", observer=observer)
    for n in range(12_000):  # ~2.5 MB of lines: two rotations at 1,000,000 bytes
        log.info("accepted {n} " + "y" * 150, n=n)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["e.log", "e.log.1"]
    assert 900_000 < (tmp_path / "e.log.1").stat().st_size <= 1_000_300


@pytest.mark.parametrize(("env", "problem"), [
    ({"E2A_LOGGING_ROTATE_MB": "0"}, "logging.rotate_mb: must be a positive integer"),
    ({"E2A_LOGGING_KEEP_FILES": "-1"}, "logging.keep_files: must not be negative"),
])
def test_log_file_settings_are_checked(tmp_path, env, problem):
    from e2a.config import ConfigError, load_config

    with pytest.raises(ConfigError) as raised:
        load_config(None, environ={"E2A_SHARED_DOMAIN": "agents.test", **env}, cwd=tmp_path)
    assert any(p.startswith(problem) for p in raised.value.problems)
