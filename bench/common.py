"""Process orchestration shared by the benchmarks (loopback only).

Why a separate module: ``bench/smtp_ingest.py`` already knows how to start the pieces a
benchmark of e2a needs — one embedded PostgreSQL, the loopback DNS server (SPF/DKIM/DMARC for
``example.org``), ``twistd -n e2a`` with a generated config and a bootstrapped user — but its
``Stack`` hard-codes the config and the reference receiver. This module re-exports the
generic helpers of that file unchanged (so both benchmarks send the same DKIM-signed mail and
measure CPU the same way) and adds :class:`E2AStack`, whose e2a config is a deep merge of the
ingest bench's defaults and per-benchmark overrides. ``smtp_ingest.py`` itself is untouched.

Nothing here ever connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import smtp_ingest  # noqa: E402 - the ingest bench, imported for its helpers
from smtp_ingest import (  # noqa: E402,F401 - re-exported
    DKIM_SELECTOR,
    LOOPBACK,
    REPO,
    RESULTS,
    SENDER,
    SENDER_DOMAIN,
    SHARED_DOMAIN,
    SIZES,
    SMTP_DOMAIN,
    BenchMail,
    Profiler,
    build_mail,
    dkim_key,
    dns_records,
    e2a_bench_config,
    free_port,
    http_json,
    loadavg,
    machine_cpu,
    make_client_class,
    percentile,
    postgres_cpu,
    proc_cpu,
    read_listening,
    round_order,
    summarize_profile,
    tree_cpu,
    twistd_command,
    wait_smtp,
)

__all__ = ["E2AStack", "cpu_list", "deep_merge", "rss_kib", "smtp_ingest"]


def cpu_list(value: str) -> list[int]:
    """``--pin 2,3`` → [2, 3]: e2a's ``cpu_affinity`` setting from the command line."""
    return [int(c) for c in value.split(",")]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in (nested dicts merged, everything else replaced)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _raise_nofile() -> None:
    """Children may hold >1000 sockets (WebSocket fan-out): soft fd limit = hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class E2AStack:
    """PostgreSQL + DNS + e2a (+ whatever the benchmark spawns through :meth:`spawn`)."""

    tmp: Path
    pg: Any = None
    postmaster_pid: int = 0
    dsn: str = ""
    dns: subprocess.Popen[bytes] | None = None
    dns_port: int = 0
    e2a: subprocess.Popen[bytes] | None = None
    e2a_smtp: int = 0
    e2a_http: int = 0
    config_path: Path | None = None
    api_key: str = ""
    signing_secret: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    floor: bool = False  # diagnostic: e2a through bench/floor_twistd.py (remembered verdicts)
    processes: int = 1  # e2a's ``processes`` setting
    # The copy of the source e2a runs from (None: REPO, which ``--e2a-tree`` may have replaced);
    # a second stack of peers.py ``--compare-tree`` runs another copy beside the first.
    repo: Path | None = None

    @property
    def source(self) -> Path:
        return self.repo or REPO

    def share(self, other: E2AStack, database: str) -> None:
        """Use ``other``'s PostgreSQL and DNS server, in a database of our own (created here):
        a second e2a beside the first, with its own schema and rows. ``other`` stops them."""
        import psycopg2
        from psycopg2.extensions import make_dsn

        conn = psycopg2.connect(other.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {database}")  # noqa: S608 - a bench constant
        conn.close()
        self.dsn = make_dsn(other.dsn, dbname=database)
        self.postmaster_pid, self.dns_port = other.postmaster_pid, other.dns_port

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of what this stack starts: its copy of the source first on the
        path, no proxies (everything is on 127.0.0.1), then ``extra``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.source) + os.pathsep + env.get("PYTHONPATH", "")
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(k, None)
        env.update(extra or {})
        return env

    def start_postgres(self, log: Any, options: tuple[tuple[str, str], ...] = ()) -> None:
        from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings

        log("starting embedded PostgreSQL (synchronous_commit=on) …")
        self.pg = EmbeddedPostgres(EmbeddedSettings(self.tmp / "pg", database="e2a", options=options))
        self.pg.thd_start()
        self.dsn = self.pg.dsn
        self.postmaster_pid = int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])

    def start_dns(self, dkim_txt: str, log: Any) -> None:
        log("starting DNS server …")
        self.dns = self.spawn(
            [sys.executable, str(BENCH / "smtp_ingest.py"), "--serve-dns", json.dumps(dns_records(dkim_txt))],
            "dns.log",
        )
        self.dns_port = read_listening(self.dns, "DNS server")

    def base_config(self) -> dict[str, Any]:
        """The ingest bench's e2a config (see smtp_ingest.Stack.start) for this stack's ports."""
        return e2a_bench_config(self.tmp, self.dsn, self.dns_port, self.e2a_http, self.e2a_smtp, self.processes)

    def start_e2a(self, overrides: dict[str, Any], log: Any) -> None:
        """``twistd -n e2a`` with base config + ``overrides``; bootstrap a user (key + secret)."""
        bindir = Path(sys.executable).parent
        self.e2a_smtp, self.e2a_http = free_port(), free_port()
        config = deep_merge(self.base_config(), overrides)
        self.config_path = self.tmp / "e2a.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        log("starting e2a (twistd -n e2a) …" if not self.floor else "starting e2a via floor_twistd.py (DIAGNOSTIC) …")
        self.e2a = self.spawn(twistd_command(self.floor, self.tmp / "e2a.log", self.config_path), "e2a.stdout")
        wait_smtp(self.e2a_smtp, self.e2a, "e2a")
        out = subprocess.run(
            [str(bindir / "e2a-admin"), "--config", str(self.config_path), "bootstrap",
             "--email", "bench@example.com", "--json"],
            check=True, capture_output=True, timeout=120, cwd=str(self.source), env=self._env(),
        )
        boot = json.loads(out.stdout)
        self.api_key = boot["api_key"]["key"]
        self.signing_secret = boot["signing_secret"]["secret"]

    def api(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return http_json(f"http://{LOOPBACK}:{self.e2a_http}{path}", self.api_key, body)

    def spawn(
        self, argv: list[str], logname: str, env_extra: dict[str, str] | None = None, stdin_pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, cwd=str(self.source), env=self._env(env_extra), stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / logname, "wb"),  # noqa: SIM115 - lives as long as the child
            preexec_fn=_raise_nofile,  # noqa: PLW1509 - no threads started yet in children
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.pg is not None:
            try:
                self.pg.thd_stop()
            except Exception as e:  # noqa: BLE001 - best effort at teardown
                print(f"warning: stopping PostgreSQL: {e}", file=sys.stderr)


PG_STAT_OPTIONS = (
    ("shared_preload_libraries", "pg_stat_statements"),
    ("pg_stat_statements.track", "all"),
    # Planning too: a prepared statement PostgreSQL re-plans at every EXECUTE (a custom plan)
    # costs its planning each time, and would otherwise not show.
    ("pg_stat_statements.track_planning", "on"),
)


def pg_stat_reset(dsn: str) -> None:
    """--pg-stat: start counting PostgreSQL's time per statement from here (after warm-up)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cur.execute("SELECT pg_stat_statements_reset()")
        cur.execute("SELECT pg_stat_reset()")
    conn.close()


def pg_stat_top(dsn: str, per: int, limit: int = 15) -> list[dict[str, Any]]:
    """--pg-stat: the statements with the most execution and planning time, per delivered message.

    Not counted: parsing, the commit's WAL flush, the protocol; for both receivers, which use
    different statements.
    """
    import psycopg2

    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT calls, total_exec_time, total_plan_time, rows, wal_bytes,"
            " regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements"
            " ORDER BY total_exec_time + total_plan_time DESC LIMIT %s",
            (limit,),
        )
        top = cur.fetchall()
        cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        commits = int(cur.fetchone()[0] or 0)
        out = [{"calls": commits, "exec_ms_per_msg": 0.0, "plan_ms_per_msg": 0.0, "rows": 0, "wal_bytes_per_msg": 0,
                "query": f"(transactions committed in this database: {commits / max(per, 1):.2f} per message)"}]
        out += [
            {"calls": c, "exec_ms_per_msg": round(t / max(per, 1), 4), "plan_ms_per_msg": round(pt / max(per, 1), 4),
             "rows": r, "wal_bytes_per_msg": int(int(w) / max(per, 1)), "query": q[:160]}
            for c, t, pt, r, w, q in top
        ]
    conn.close()
    return out
