"""The real ``twistd`` at the edges of its life: a failed start exits non-zero with one line,
a crash leaves nothing behind after the next clean stop, ``--version``, and the plugin from an
editable install (issue: the first hour of a new operator)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import reactor

from e2a.store.embedded import pid_alive
from tests.integration.test_twistd import REPO, TWISTD, _clean_env, _Collect, free_port
from tests.storage.test_embedded_root import lasting_creations
from tests.support.dirs import reachable_tmpdir

pytestmark = pytest.mark.slow


async def deferToProcess(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:  # noqa: N802
    """Run ``argv`` to its end; (exit code, stdout+stderr)."""
    proto = _Collect()
    proto.started_line.addErrback(lambda _: None)  # these starts are meant to fail
    reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cwd))
    code = await proto.ended.addTimeout(120, reactor)
    return code, proto.output.decode(errors="replace")


def _critical_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "#critical]" in line]


@pytest_twisted.ensureDeferred
async def test_twistd_exits_1_naming_the_key_when_the_http_port_is_taken():
    """HTTP port in use: exit code 1, one line naming the address and http.listen_addr, no
    traceback, and the embedded database it had started is stopped again."""
    workdir = reachable_tmpdir("e2a-taken-")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _clean_env(
            PYTHONPATH=str(REPO),
            E2A_HTTP_LISTEN_ADDR=f"127.0.0.1:{port}",
            E2A_SMTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        )
        code, output = await deferToProcess([sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    assert code == 1, output
    lines = _critical_lines(output)
    assert len(lines) == 1, output
    assert f"127.0.0.1:{port}" in lines[0] and "http.listen_addr" in lines[0], output
    assert "address already in use" in lines[0], output
    assert "Traceback" not in output and "Unhandled error" not in output, output
    assert not (workdir / "e2a-data" / "pg" / "postmaster.pid").exists(), output


@pytest_twisted.ensureDeferred
async def test_twistd_exits_1_naming_data_dir_when_it_cannot_be_created():
    """A data_dir that cannot be created: exit code 1, one line naming data_dir, no traceback."""
    workdir = reachable_tmpdir("e2a-baddir-")
    (workdir / "file").write_text("not a directory")
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_DATA_DIR=str(workdir / "file" / "data"),
        E2A_HTTP_LISTEN_ADDR="127.0.0.1:0",
        E2A_SMTP_LISTEN_ADDR="127.0.0.1:0",
    )
    code, output = await deferToProcess([sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    assert code == 1, output
    lines = _critical_lines(output)
    assert len(lines) == 1 and "data_dir" in lines[0], output
    assert "Traceback" not in output, output


@pytest_twisted.ensureDeferred
async def test_twistd_exits_1_naming_database_url_when_the_database_is_unreachable():
    """database.url pointing at a closed port: exit code 1, one line naming database.url, and
    the password of the URL nowhere in the output."""
    workdir = reachable_tmpdir("e2a-nodb-")
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_DATABASE_URL=f"postgresql://e2a:s3cret-pw@127.0.0.1:{free_port()}/e2a",
        E2A_HTTP_LISTEN_ADDR="127.0.0.1:0",
        E2A_SMTP_LISTEN_ADDR="127.0.0.1:0",
    )
    code, output = await deferToProcess([sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    assert code == 1, output
    lines = _critical_lines(output)
    assert len(lines) == 1 and "database.url" in lines[0], output
    assert "s3cret-pw" not in output and "Traceback" not in output, output


@pytest_twisted.ensureDeferred
async def test_twistd_exits_2_on_an_unparsable_environment_value():
    """A bad value from the environment: exit code 2 and one line naming the key."""
    workdir = reachable_tmpdir("e2a-badenv-")
    env = _clean_env(PYTHONPATH=str(REPO), E2A_SMTP_MAX_RECIPIENTS="lots")
    code, output = await deferToProcess([sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    assert code == 2, output
    assert [line for line in output.splitlines() if line.strip()] == [
        line for line in output.splitlines() if "E2A_SMTP_MAX_RECIPIENTS" in line
    ], output
    assert "Traceback" not in output, output


@pytest_twisted.ensureDeferred
async def test_twistd_traceback_of_a_failed_start_only_with_debug_logging():
    """logging.level: debug adds the traceback of the failure; the one line is still there."""
    workdir = reachable_tmpdir("e2a-dbg-")
    (workdir / "file").write_text("x")
    env = _clean_env(
        PYTHONPATH=str(REPO), E2A_DATA_DIR=str(workdir / "file" / "d"), E2A_LOGGING_LEVEL="debug",
    )
    code, output = await deferToProcess([sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], workdir, env)
    assert code == 1, output
    assert "Traceback" in output and len(_critical_lines(output)) == 1, output


def _postgres_processes_of(pgdata: Path) -> list[int]:
    """Pids whose command line names ``pgdata`` (the postmaster; its children die with it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(pgdata).encode() in cmdline and b"postgres" in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


async def _start_twistd(workdir: Path, env: dict[str, str]) -> tuple[_Collect, object]:
    proto = _Collect()
    transport = reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], env=env, path=str(workdir)
    )
    await proto.started_line.addTimeout(120, reactor)
    return proto, transport


@pytest_twisted.ensureDeferred
async def test_clean_stop_after_a_sigkill_stops_the_adopted_postgres():
    """SIGKILL twistd (its PostgreSQL survives), start again (adopts it), SIGTERM: no postgres
    process of that data dir remains."""
    workdir = reachable_tmpdir("e2a-adopt-")
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_HTTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        E2A_SMTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
    )
    pgdata = workdir / "e2a-data" / "pg"
    proto, transport = await _start_twistd(workdir, env)
    first = proto.output.decode(errors="replace")
    assert f"created data directory {workdir / 'e2a-data'}" in first, first
    assert f"created {pgdata} (embedded PostgreSQL cluster" in first, first
    transport.signalProcess(signal.SIGKILL)
    await proto.ended.addTimeout(60, reactor)
    orphans = _postgres_processes_of(pgdata)
    assert orphans, "the embedded PostgreSQL should survive a SIGKILL of e2a"

    proto, transport = await _start_twistd(workdir, env)
    assert b"adopting the embedded PostgreSQL" in proto.output, proto.output.decode(errors="replace")
    transport.signalProcess(signal.SIGTERM)
    code = await proto.ended.addTimeout(60, reactor)
    output = proto.output.decode(errors="replace")
    assert code in (0, "sigterm"), output
    assert _postgres_processes_of(pgdata) == [], output
    assert not any(pid_alive(pid) for pid in orphans), output
    assert not (pgdata / "postmaster.pid").exists(), output


@pytest_twisted.ensureDeferred
async def test_twistd_e2a_version_prints_e2a_version():
    """`twistd e2a --version` names e2a's version (not only Twisted's) and exits 0."""
    from e2a import __version__

    code, output = await deferToProcess(
        [sys.executable, *TWISTD, "e2a", "--version"], reachable_tmpdir("e2a-ver-"), _clean_env(PYTHONPATH=str(REPO))
    )
    assert code == 0, output
    assert f"e2a {__version__}" in output, output


def test_editable_install_exposes_the_twistd_plugin():
    """`pip install -e .` into a venv, then `twistd e2a` from that venv finds the plugin (the
    README's two commands share one venv). Dependencies come from this venv through a .pth."""
    import sysconfig

    base = reachable_tmpdir("e2a-editable-")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, stdin=subprocess.DEVNULL)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "e2a-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # offline: no build isolation (setuptools and wheel come from this venv; `wheel` is in the test extra)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-build-isolation", "--no-index", "-e", str(REPO)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )
    env = {k: v for k, v in _clean_env().items() if k != "PYTHONPATH"}
    workdir = base / "run"
    workdir.mkdir()
    result = subprocess.run(
        [str(python), *TWISTD, "e2a", "--version"], cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("e2a "), result.stdout + result.stderr
    # and the module twistd imports is the working tree's (edits take effect without reinstalling)
    where = subprocess.run(
        [str(python), "-c", "import e2a.tap; print(e2a.tap.__file__)"], cwd=workdir, env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert where == str(REPO / "e2a" / "tap.py")


@pytest.mark.skipif(os.geteuid() != 0, reason="the e2a-postgres user is only used when running as root")
def test_root_start_prints_nothing_created_when_everything_exists():
    """Second root start on the same data dir: the user and directories exist, nothing is created.

    Except a socket directory of its own, when the data dir's path is too long for PostgreSQL's
    socket (a long TMPDIR): that one lives only while the server runs."""
    from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings

    base = reachable_tmpdir("e2a-rootagain-")
    first = EmbeddedPostgres(EmbeddedSettings(base / "data" / "pg"))
    first.thd_start()
    first.thd_stop()
    second = EmbeddedPostgres(EmbeddedSettings(base / "data" / "pg"))
    second.thd_start()
    try:
        assert lasting_creations(second) == []
    finally:
        second.thd_stop()
