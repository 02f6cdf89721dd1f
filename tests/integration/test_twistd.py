"""The real ``twistd`` process: starts with no config, serves, stops cleanly on SIGTERM.

These are the only tests that spawn e2a as a subprocess; they wait on process output and
sockets (never on wall-clock sleeps) through the reactor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater

from tests.support.dirs import reachable_tmpdir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.started_line: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data
        if b"e2a started" in self.output and not self.started_line.called:
            self.started_line.callback(None)

    errReceived = outReceived

    def processEnded(self, reason) -> None:  # noqa: N802
        # twistd re-raises the terminating signal on its way out (the Unix convention), so a
        # clean SIGTERM stop ends by signal 15, not exit code 0: report that as "sigterm".
        code = reason.value.exitCode
        if code is None and reason.value.signal == signal.SIGTERM:
            code = "sigterm"
        if not self.started_line.called:
            self.started_line.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(code)


async def _run_twistd(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Start twistd, wait for it to come up, hit /api/health, SIGTERM it, return (exit, log)."""
    proto = _Collect()
    http_port = free_port()
    env = {**env, "E2A_HTTP_LISTEN_ADDR": f"127.0.0.1:{http_port}", "E2A_SMTP_LISTEN_ADDR": f"127.0.0.1:{free_port()}"}
    transport = reactor.spawnProcess(proto, sys.executable, [sys.executable, *args], env=env, path=str(cwd))
    try:
        await proto.started_line.addTimeout(120, reactor)
        resp = await treq.get(f"http://127.0.0.1:{http_port}/api/health", persistent=False)
        assert resp.code == 200
        assert await resp.json() == {"status": "ok"}
        ready = await treq.get(f"http://127.0.0.1:{http_port}/api/ready", persistent=False)
        assert ready.code == 200
        await treq.content(ready)
    finally:
        if proto.ended.called is False:
            transport.signalProcess(signal.SIGTERM)
    code = await proto.ended.addTimeout(60, reactor)
    # let treq's connection objects settle so the reactor is clean for the next test
    await deferLater(reactor, 0, lambda: None)
    return code, proto.output.decode(errors="replace")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    env.update(extra)
    return env


def _assert_clean_shutdown(code: int | str, output: str, data_dir: Path) -> None:
    assert code in (0, "sigterm"), output
    assert "Unhandled error in Deferred" not in output, output
    assert "Traceback" not in output, output
    assert "e2a stopped" in output, output
    assert "Server Shut Down" in output, output
    # the embedded database was stopped with the service (no postmaster left behind)
    assert not (data_dir / "pg" / "postmaster.pid").exists(), output


@pytest_twisted.ensureDeferred
async def test_twistd_starts_without_config_and_stops_on_sigterm():
    """`twistd -n e2a` on a fresh directory: embedded DB, health 200, clean SIGTERM; a second
    start reuses the data directory."""
    workdir = reachable_tmpdir("e2a-twistd-")
    env = _clean_env(PYTHONPATH=str(REPO))
    code, output = await _run_twistd([*TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    _assert_clean_shutdown(code, output, workdir / "e2a-data")
    assert (workdir / "e2a-data" / "pg" / "PG_VERSION").exists()
    # 0700, except that as root the embedded cluster's system user needs the traverse bit
    assert (workdir / "e2a-data").stat().st_mode & 0o076 == 0
    code, output = await _run_twistd([*TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    _assert_clean_shutdown(code, output, workdir / "e2a-data")
    assert "initialising embedded PostgreSQL" not in output


@pytest_twisted.ensureDeferred
async def test_twistd_tac_file_runs_the_same_service():
    """`twistd -ny e2a.tac` builds the same service from $E2A_CONFIG."""
    workdir = reachable_tmpdir("e2a-tac-")
    config = workdir / "e2a.yaml"
    config.write_text(f"data_dir: {workdir / 'data'}\nshared_domain: agents.test\n")
    env = _clean_env(PYTHONPATH=str(REPO), E2A_CONFIG=str(config))
    code, output = await _run_twistd(
        [*TWISTD, "-n", "--pidfile=", "-y", str(REPO / "e2a.tac")], workdir, env
    )
    _assert_clean_shutdown(code, output, workdir / "data")


@pytest_twisted.ensureDeferred
async def test_twistd_refuses_bad_config_with_exit_2():
    """A broken config names every bad key and exits 2 before anything starts."""
    workdir = reachable_tmpdir("e2a-badcfg-")
    (workdir / "e2a.yaml").write_text("smtp:\n  max_recipients: lots\nbogus_key: 1\n")
    result = await deferToProcess(
        [sys.executable, *TWISTD, "-n", "--pidfile=", "e2a", "--config", str(workdir / "e2a.yaml")],
        workdir,
        _clean_env(PYTHONPATH=str(REPO)),
    )
    code, output = result
    assert code == 2, output
    assert "smtp.max_recipients" in output and "bogus_key" in output


async def deferToProcess(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:  # noqa: N802
    proto = _Collect()
    reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cwd))
    code = await proto.ended.addTimeout(60, reactor)
    return code, proto.output.decode(errors="replace")


@pytest_twisted.ensureDeferred
async def test_installed_wheel_provides_plugin_and_schema():
    """From a built wheel (not the source tree): the twistd plugin is found and the schema
    ships inside the distribution."""
    build = reachable_tmpdir("e2a-wheel-")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(build / "dist"), str(REPO)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    wheels = list((build / "dist").glob("e2a-*.whl"))
    assert len(wheels) == 1
    target = build / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheels[0])],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    assert (target / "twisted" / "plugins" / "e2a_plugin.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    assert (target / "e2a" / "schema" / "0001_init.sql").exists()
    assert (target / "e2a" / "api" / "openapi.json").exists()  # served at GET /api/openapi.json
    workdir = build / "run"
    workdir.mkdir()
    env = _clean_env(PYTHONPATH=str(target))
    code, output = await _run_twistd([*TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    _assert_clean_shutdown(code, output, workdir / "e2a-data")
    assert str(target / "e2a") in output or "e2a started" in output


@pytest_twisted.ensureDeferred
async def test_twistd_logs_json_when_logging_format_is_json():
    """`E2A_LOGGING_FORMAT=json`: twistd logs through e2a's observer, one JSON event per line, from
    twistd's own start-up line to "Server Shut Down"; shutdown stays clean."""
    import json

    workdir = reachable_tmpdir("e2a-json-")
    env = _clean_env(PYTHONPATH=str(REPO), E2A_LOGGING_FORMAT="json", E2A_LOGGING_LEVEL="info")
    code, output = await _run_twistd([*TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    _assert_clean_shutdown(code, output, workdir / "e2a-data")
    events = [json.loads(line) for line in output.splitlines() if line.strip()]
    formats = [e.get("log_format", "") for e in events]
    assert any(f.startswith("twistd {version}") for f in formats), output
    started = [e for e in events if e.get("log_format", "").startswith("e2a started")]
    assert len(started) == 1 and started[0]["log_level"]["name"] == "info", output
    assert started[0]["log_namespace"].startswith("e2a"), output
    assert any(e.get("log_format") == "Server Shut Down." for e in events), output
    assert all(e["log_level"]["name"] != "debug" for e in events), output
