"""e2a against the receivers a user would run instead, doing the same mandatory work (issue 16).

What it measures, and why this way: ratios to a receiver that verifies nothing
(``bench/smtp_ingest.py``) say what verification costs, not whether e2a is a good choice. Here
e2a runs beside *peers* that do the same mandatory work per message — SPF for the client,
DKIM, a DMARC alignment check, a durable copy before ``250`` — and beside the earlier
reference receiver, all in one invocation, interleaved round by round:

* ``e2a``: ``twistd -n e2a`` (SPF + DKIM + DMARC, strip + sign, delivery job, commit before 250);
* ``aiosmtpd``: ``bench/peers/aiosmtpd_peer.py`` — aiosmtpd + pyspf + dkimpy + DMARC, DNS
  cached, HMAC, one asyncpg INSERT committed before 250;
* ``haraka-file`` / ``haraka-pg``: Haraka (Node.js) with haraka-plugin-spf (made to check
  127.0.0.1), haraka-plugin-dkim (verify), a small DMARC plugin and a DNS cache written for
  the bench (``bench/peers/haraka/plugins/``), queueing to one fsync'd file per message, or
  with one INSERT into PostgreSQL;
* ``reference``: ``bench/reference_smtp.py`` (one INSERT, no verification), for scale.

Same client (``smtp_ingest.run_round``), same loopback DNS zone, same DKIM-signed messages
(only the Message-ID varies), one embedded PostgreSQL. After every round the stored copies of
that round are read back: each receiver must have stored every accepted message and every
stored copy must say spf=pass, dkim=pass and dmarc=pass (e2a: ``X-E2A-Auth-Domain-Check``;
the peers: the ``Authentication-Results`` header of the stored message). A round that fails
this check makes the run exit non-zero. CPU per message is taken like ``smtp_ingest.py``
does: the receiver's process tree and PostgreSQL's (postmaster + backends), from /proc.

Setup (bench-only dependencies, never part of e2a's install)::

    sh bench/peers/setup.sh .venv/bin/python     # Haraka from npm, aiosmtpd + asyncpg
    .venv/bin/python bench/peers.py --quick      # smoke run, about a minute
    .venv/bin/python bench/peers.py              # medians of 3 runs, 2 KB and 100 KB, c=8
    .venv/bin/python bench/peers.py --pin 0      # e2a kept on CPU 0 (cpu_affinity); --pin-peers: all
    .venv/bin/python bench/peers.py --pool bench/results/peers-*.json   # pool invocations
    .venv/bin/python bench/peers.py --receivers e2a --sizes 2k --compare-tree DIR  # A/B: e2a from DIR as e2a-b

Haraka is skipped (and the reason printed) when Node.js or the npm install is missing.

Loopback only; every loop is bounded by a message count and by wall-clock caps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    LOOPBACK,
    PG_STAT_OPTIONS,
    REPO,
    RESULTS,
    SHARED_DOMAIN,
    SIZES,
    E2AStack,
    Profiler,
    build_mail,
    cpu_list,
    dkim_key,
    loadavg,
    machine_cpu,
    make_client_class,
    percentile,
    pg_stat_reset,
    pg_stat_top,
    postgres_cpu,
    proc_cpu,
    read_listening,
    round_order,
    summarize_profile,
    tree_cpu,
    wait_smtp,
)
from smtp_ingest import run_round  # noqa: E402

PEERS_DIR = REPO / "bench" / "peers"
INSTALL = RESULTS / "peers"  # what bench/peers/setup.sh installed (gitignored)
HARAKA_BIN = INSTALL / "haraka" / "node_modules" / "Haraka" / "bin" / "haraka"
PYLIB = INSTALL / "pylib"
AGENT_SLUG = "bench"

ALL_RECEIVERS = ("e2a", "aiosmtpd", "haraka-file", "haraka-pg", "reference")
# ``--compare-tree``: a second e2a, from another copy of the source, in the same invocation.
COMPARED = "e2a-b"
ORDER = ("e2a", COMPARED, *ALL_RECEIVERS[1:])
PEERS = ("aiosmtpd", "haraka-file", "haraka-pg")
FULL = {"runs": 3, "messages": {"2k": 1000, "100k": 300}}
QUICK = {"runs": 1, "messages": {"2k": 60, "100k": 20}}
WARMUP_MESSAGES = 60  # also lets V8 (Haraka) compile its hot paths before the first measured round

CPUS = os.cpu_count() or 1

# Issue 16's targets 2 and 3, checked on every invocation's medians (c=8).
TARGET_THROUGHPUT = 1.5  # e2a >= 1.5x the best peer's msg/s
TARGET_CPU_E2A_MS = 0.8  # per 2 KB message
TARGET_CPU_PG_MS = 0.4

_AR_RE = re.compile(rb"^Authentication-Results:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def pg_cpu_total(postmaster_pid: int) -> float:
    """PostgreSQL's CPU: the postmaster, its live children, and its exited children.

    ``postgres_cpu`` (smtp_ingest.py) sums live processes only, so a backend or autovacuum
    worker that exits during a round makes the difference negative; the postmaster's
    ``cutime + cstime`` holds what its reaped children used.
    """
    try:
        fields = Path(f"/proc/{postmaster_pid}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        reaped = 0.0
    return postgres_cpu(postmaster_pid) + reaped


def verdict_of_headers(head: bytes) -> str:
    """``pass`` when an Authentication-Results header says spf, dkim and dmarc = pass."""
    head = head.split(b"\r\n\r\n", 1)[0]
    for m in _AR_RE.finditer(head):
        text = b" ".join(m.group(1).split()).lower()
        if all(re.search(rb"\b" + k + rb"=pass\b", text) for k in (b"spf", b"dkim", b"dmarc")):
            return "pass"
    return "not-pass"


# ============================================================== receivers


@dataclass
class Receiver:
    name: str
    port: int
    pid: int
    table: str | None = None  # PostgreSQL table with the stored copies (peers, reference)
    queue_dir: Path | None = None  # haraka-file
    last_id: int = 0
    since: str = ""  # e2a: PostgreSQL clock at the start of the round
    dsn: str | None = None  # e2a: its database (``--compare-tree`` gives the second e2a its own)


def pin_threads(pid: int, cpu: int) -> None:
    """Put every thread of ``pid`` on ``cpu`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


def _spawn_logged(stack: E2AStack, argv: list[str], log_path: Path, env_extra: dict[str, str]) -> Any:
    """Like ``E2AStack.spawn`` but stdout goes to a file too (Haraka logs to stdout)."""
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env.update(env_extra)
    out = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    stack.procs.append(proc)
    return proc


def start_haraka(stack: E2AStack, variant: str, log: Any) -> Receiver:
    """One Haraka instance (single process, ``nodes=0``) with the bench's plugins and config."""
    node = shutil.which("node")
    if node is None or not HARAKA_BIN.exists():
        raise FileNotFoundError("Haraka not installed: run sh bench/peers/setup.sh")
    inst = stack.tmp / f"haraka-{variant}"
    # Haraka's shipped defaults (connection.ini etc.), then the bench's own files over them.
    shutil.copytree(HARAKA_BIN.parents[1] / "config", inst / "config")
    shutil.copytree(PEERS_DIR / "haraka" / "plugins", inst / "plugins")
    port = _free_port()
    queue_dir = inst / "queue"
    pg = dict(part.split("=", 1) for part in stack.dsn.split())
    files = {
        "smtp.ini": f"[main]\nlisten={LOOPBACK}:{port}\nnodes=0\n",
        "me": "haraka.bench.test\n",
        "host_list": f"{SHARED_DOMAIN}\n",
        "log.ini": "[main]\nlevel=warn\ntimestamps=false\n",
        "plugins": "\n".join(["bench_setup", "spf", "rcpt_to.in_host_list", "dkim", "bench_dmarc",
                              f"bench_queue_{variant}"]) + "\n",
        "dkim.ini": "[sign]\nenabled=false\n[verify]\nenabled=true\n",
        "bench.ini": (f"[dns]\nserver={LOOPBACK}:{stack.dns_port}\nttl=300\n[queue]\ndir={queue_dir}\n"
                      f"[pg]\nhost={pg['host']}\nport={pg['port']}\nuser={pg['user']}\n"
                      f"database={pg['dbname']}\npool_size=10\n"),
    }
    for fname, text in files.items():
        (inst / "config" / fname).write_text(text)
    log(f"starting Haraka ({variant}) …")
    proc = _spawn_logged(stack, [node, str(HARAKA_BIN), "-c", str(inst)], stack.tmp / f"haraka-{variant}.log", {})
    wait_smtp(port, proc, f"haraka-{variant}", timeout=60)
    if variant == "pg":
        return Receiver(f"haraka-{variant}", port, proc.pid, table="bench_haraka_messages")
    return Receiver(f"haraka-{variant}", port, proc.pid, queue_dir=queue_dir)


def start_aiosmtpd(stack: E2AStack, log: Any) -> Receiver:
    if not (PYLIB / "aiosmtpd").exists():
        raise FileNotFoundError("aiosmtpd not installed: run sh bench/peers/setup.sh")
    log("starting aiosmtpd peer …")
    proc = stack.spawn(
        [sys.executable, str(PEERS_DIR / "aiosmtpd_peer.py"), "--dsn", stack.dsn, "--dns-port", str(stack.dns_port),
         "--port", "0", "--accept-domain", SHARED_DOMAIN],
        "aiosmtpd.log", {"PYTHONPATH": f"{PYLIB}{os.pathsep}{REPO}"},
    )
    return Receiver("aiosmtpd", read_listening(proc, "aiosmtpd peer"), proc.pid, table="bench_aiosmtpd_messages")


def start_reference(stack: E2AStack, log: Any) -> Receiver:
    log("starting reference receiver …")
    proc = stack.spawn([sys.executable, str(REPO / "bench" / "reference_smtp.py"), "--dsn", stack.dsn, "--port", "0"],
                       "ref.log")
    return Receiver("reference", read_listening(proc, "reference receiver"), proc.pid,
                    table="bench_reference_messages")


def _free_port() -> int:
    from common import free_port

    return free_port()


# ============================================================== per-round verification


class Checker:
    """Reads back what each receiver stored during a round and counts spf/dkim/dmarc = pass."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conns: dict[str, Any] = {}
        self._connect(dsn)  # fails here, not after the first round, if PostgreSQL is not there

    def _connect(self, dsn: str) -> Any:
        import psycopg2

        if dsn not in self.conns:
            self.conns[dsn] = psycopg2.connect(dsn)
            self.conns[dsn].autocommit = True
        return self.conns[dsn]

    def _cursor(self, r: Receiver) -> Any:
        return self._connect(r.dsn or self.dsn).cursor()

    def mark(self, r: Receiver) -> None:
        with self._cursor(r) as cur:
            if r.dsn is not None:
                cur.execute("SELECT clock_timestamp()::text")
                r.since = cur.fetchone()[0]
            elif r.table is not None:
                cur.execute(f"SELECT coalesce(max(id), 0) FROM {r.table}")  # noqa: S608 - bench constant
                r.last_id = cur.fetchone()[0]
            elif r.queue_dir is not None and r.queue_dir.exists():
                for f in r.queue_dir.iterdir():
                    f.unlink()

    def check(self, r: Receiver) -> tuple[int, int | None]:
        """(stored, verified) since :meth:`mark`; verified is None for the reference."""
        with self._cursor(r) as cur:
            if r.dsn is not None:
                cur.execute(
                    "SELECT auth_headers->>'X-E2A-Auth-Domain-Check' FROM messages"
                    " WHERE direction = 'inbound' AND created_at >= %s::timestamptz", (r.since,))
                rows = [v or "" for (v,) in cur.fetchall()]
                ok = sum(all(f"{k}=pass" in v for k in ("spf", "dkim", "dmarc")) for v in rows)
                return len(rows), ok
            if r.name == "reference":
                cur.execute(f"SELECT count(*) FROM {r.table} WHERE id > %s", (r.last_id,))  # noqa: S608
                return cur.fetchone()[0], None
            if r.table is not None:
                cur.execute(f"SELECT substring(raw from 1 for 8192) FROM {r.table} WHERE id > %s",  # noqa: S608
                            (r.last_id,))
                heads = [bytes(h) for (h,) in cur.fetchall()]
            else:
                assert r.queue_dir is not None
                heads = []
                for f in (sorted(r.queue_dir.iterdir()) if r.queue_dir.exists() else []):
                    with f.open("rb") as fh:
                        heads.append(fh.read(8192))
        return len(heads), sum(verdict_of_headers(h) == "pass" for h in heads)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


# ============================================================== results


@dataclass
class Round:
    receiver: str
    size: str
    concurrency: int
    run: int
    sent: int
    ok: int
    stored: int
    verified: int | None
    wall: float
    throughput: float
    p50_ms: float
    p99_ms: float
    capped: bool
    cpu_receiver_s: float
    cpu_postgres_s: float
    cpu_dns_s: float
    cpu_client_s: float
    load_before: float
    load_after: float
    errors: list[str]
    # The whole machine during the round (machine_cpu): every process, this client and
    # PostgreSQL included; NaN in reports written before it was recorded.
    cpu_machine_s: float = float("nan")
    cpu_steal_s: float = float("nan")

    @property
    def verified_ok(self) -> bool:
        return self.stored == self.ok and (self.verified is None or self.verified == self.ok)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def aggregate(
    rounds: list[Round], receivers: list[str], processes: int | None = 1, cpus: int = CPUS
) -> list[dict[str, Any]]:
    """Medians per cell and receiver; ``processes``: e2a's setting in these rounds (None: mixed);
    ``cpus``: the CPUs of the machine that ran them."""
    cells: dict[tuple[str, int], dict[str, list[Round]]] = {}
    for r in rounds:
        cells.setdefault((r.size, r.concurrency), {}).setdefault(r.receiver, []).append(r)
    out = []
    for (size, conc), by in sorted(cells.items(), key=lambda kv: (SIZES[kv[0][0]], kv[0][1])):
        row: dict[str, Any] = {"size": size, "concurrency": conc, "receivers": {}}
        for name in receivers:
            rs = by.get(name, [])
            if not rs:
                continue
            row["receivers"][name] = {
                "runs": len(rs),
                "throughput": median([r.throughput for r in rs]),
                "p50_ms": median([r.p50_ms for r in rs]),
                "p99_ms": median([r.p99_ms for r in rs]),
                "cpu_ms_per_msg_receiver": median([1000 * r.cpu_receiver_s / r.ok for r in rs if r.ok]),
                "cpu_ms_per_msg_postgres": median([1000 * r.cpu_postgres_s / r.ok for r in rs if r.ok]),
                "cpu_ms_per_msg_dns": median([1000 * r.cpu_dns_s / r.ok for r in rs if r.ok]),
                "cpu_ms_per_msg_client": median([1000 * r.cpu_client_s / r.ok for r in rs if r.ok]),
                "cpu_ms_per_msg_machine": median([1000 * r.cpu_machine_s / r.ok for r in rs if r.ok]),
                # CPU-seconds per second of the receiver's processes (one process with one GIL
                # can run Python on about one CPU at a time).
                "receiver_cpus": median([r.cpu_receiver_s / r.wall for r in rs if r.wall > 0]),
                # Share of the machine's CPUs busy during the round (1.0: no idle CPU left).
                "machine_busy": median([r.cpu_machine_s / (r.wall * cpus) for r in rs if r.wall > 0]),
                "steal": median([r.cpu_steal_s / (r.wall * cpus) for r in rs if r.wall > 0]),
                "load": median([(r.load_before + r.load_after) / 2 for r in rs]),
                "all_verified": all(r.verified_ok for r in rs),
                "errors": sum(r.sent - r.ok for r in rs),
                "capped": any(r.capped for r in rs),
            }
        recs = row["receivers"]
        peers = {n: v for n, v in recs.items() if n in PEERS}
        if "e2a" in recs and peers:
            best = max(peers, key=lambda n: peers[n]["throughput"])
            e = recs["e2a"]
            row["best_peer"] = best
            row["ratio_throughput_vs_best_peer"] = e["throughput"] / peers[best]["throughput"]
            row["ratio_p99_vs_best_peer"] = e["p99_ms"] / peers[best]["p99_ms"]
            # Ratios within each run (same minute, same load), then their median.
            per_run = []
            for run in sorted({r.run for r in by.get("e2a", [])}):
                er = [r for r in by["e2a"] if r.run == run]
                pr = [r for n in peers for r in by.get(n, []) if r.run == run]
                if er and pr:
                    per_run.append(er[0].throughput / max(p.throughput for p in pr))
            row["ratio_throughput_vs_best_peer_per_run"] = [round(x, 3) for x in per_run]
            # What TARGET_THROUGHPUT x the best peer's rate would need. Of e2a's processes: each
            # runs Python on at most one CPU at a time (one GIL), so at most this much CPU per
            # message in all. Of the machine: all its CPUs busy, at most this much CPU per message for
            # everything (e2a, PostgreSQL, the client, the rest), of which e2a's process gets
            # what the other costs measured in e2a's rounds leave. Estimates (costs per message
            # assumed not to fall with the rate), but they tell a target out of reach for one
            # process from one out of reach for this machine.
            rate = TARGET_THROUGHPUT * peers[best]["throughput"]
            if processes is not None:
                row["e2a_processes"] = processes
                row["process_budget_ms_per_msg"] = 1000 * min(processes, cpus) / rate
            row["machine_budget_ms_per_msg"] = 1000 * cpus / rate
            row["e2a_machine_budget_ms_per_msg"] = (
                row["machine_budget_ms_per_msg"] - (e["cpu_ms_per_msg_machine"] - e["cpu_ms_per_msg_receiver"]))
        if "e2a" in recs and COMPARED in recs:
            row["compared"] = compare(by["e2a"], by[COMPARED])
        if "e2a" in recs and "reference" in recs:
            row["ratio_throughput_vs_reference"] = recs["e2a"]["throughput"] / recs["reference"]["throughput"]
        out.append(row)
    return out


def compare(a: list[Round], b: list[Round]) -> dict[str, Any]:
    """``--compare-tree``: the second e2a against the first, each ratio b / a taken within one
    run (the same minutes, the same load on the machine), then the median of those ratios.

    WHY per run: invocations run one after another meet different hours of a shared machine,
    and their spread is larger than most changes worth measuring; two copies measured round by
    round in one invocation meet the same minutes, so a ratio per run keeps that drift out.
    What is left, the spread within minutes, is measured in docs/performance.md (A/A).
    """
    metrics = {
        "throughput": lambda r: r.throughput,
        "p99_ms": lambda r: r.p99_ms,
        "cpu_ms_per_msg_receiver": lambda r: r.cpu_receiver_s / r.ok if r.ok else float("nan"),
        "cpu_ms_per_msg_postgres": lambda r: r.cpu_postgres_s / r.ok if r.ok else float("nan"),
        "cpu_ms_per_msg_machine": lambda r: r.cpu_machine_s / r.ok if r.ok else float("nan"),
    }
    by_run = {r.run: r for r in a}
    pairs = [(by_run[r.run], r) for r in b if r.run in by_run]
    out: dict[str, Any] = {"runs": len(pairs)}
    for name, value in metrics.items():
        ratios = [value(rb) / value(ra) for ra, rb in pairs if value(ra) > 0]
        out[name] = median(ratios)
        out[f"{name}_per_run"] = [round(x, 3) for x in ratios]
    return out


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 16 targets 2 and 3 as verdicts on this invocation's medians."""
    out = []
    for row in rows:
        if row["concurrency"] != 8 or "best_peer" not in row:
            continue
        size, e = row["size"], row["receivers"]["e2a"]
        best = row["receivers"][row["best_peer"]]
        x = row["ratio_throughput_vs_best_peer"]
        out.append({"target": f"{size} c8: e2a msg/s >= {TARGET_THROUGHPUT}x best peer ({row['best_peer']})",
                    "value": round(x, 2), "met": x >= TARGET_THROUGHPUT})
        out.append({"target": f"{size} c8: e2a p99 <= best peer's ({best['p99_ms']:.1f} ms)",
                    "value": round(e["p99_ms"], 1), "met": e["p99_ms"] <= best["p99_ms"]})
        if size == "2k":
            out.append({"target": f"2k: e2a CPU per message <= {TARGET_CPU_E2A_MS} ms",
                        "value": round(e["cpu_ms_per_msg_receiver"], 2),
                        "met": e["cpu_ms_per_msg_receiver"] <= TARGET_CPU_E2A_MS})
            out.append({"target": f"2k: PostgreSQL CPU per e2a message <= {TARGET_CPU_PG_MS} ms",
                        "value": round(e["cpu_ms_per_msg_postgres"], 2),
                        "met": e["cpu_ms_per_msg_postgres"] <= TARGET_CPU_PG_MS})
    return out


def format_table(rows: list[dict[str, Any]], runs: int, cpus: int = CPUS) -> str:
    head = (f"{'size':>5} {'conc':>4} {'receiver':<12} | {'msg/s':>7} {'p50 ms':>7} {'p99 ms':>7} | "
            f"{'cpu/msg ms':>10} {'pg/msg ms':>9} {'dns/msg':>7} {'all/msg':>7} {'busy':>5} | {'load':>5} | verified")
    lines = [f"medians of {runs} run(s); cpu = ms of CPU per accepted message (receiver process tree, "
             "PostgreSQL postmaster + backends, the bench DNS server, the whole machine); busy = share of "
             f"the machine's {cpus} CPUs in use during the round", head, "-" * len(head)]
    for row in rows:
        for name, v in row["receivers"].items():
            flag = (" CAPPED" if v["capped"] else "") + (f" {v['errors']} errors" if v["errors"] else "")
            ver = "yes" if v["all_verified"] else "NO"
            if name == "reference":
                ver = "(stores only)" if v["all_verified"] else "NO (lost rows)"
            lines.append(
                f"{row['size']:>5} {row['concurrency']:>4} {name:<12} | {v['throughput']:7.1f} {v['p50_ms']:7.1f} "
                f"{v['p99_ms']:7.1f} | {v['cpu_ms_per_msg_receiver']:10.2f} {v['cpu_ms_per_msg_postgres']:9.2f} "
                f"{v['cpu_ms_per_msg_dns']:7.2f} {v['cpu_ms_per_msg_machine']:7.2f} {v['machine_busy']:5.0%} | "
                f"{v['load']:5.2f} | {ver}{flag}")
        if "compared" in row:
            c = row["compared"]
            lines.append(
                f"{'':>11}{COMPARED} / e2a, medians of {c['runs']} same-run ratios: msg/s x{c['throughput']:.3f}"
                f" (per run {c['throughput_per_run']}), cpu/msg x{c['cpu_ms_per_msg_receiver']:.3f}"
                f" (per run {c['cpu_ms_per_msg_receiver_per_run']}), pg/msg x{c['cpu_ms_per_msg_postgres']:.3f},"
                f" all/msg x{c['cpu_ms_per_msg_machine']:.3f}, p99 x{c['p99_ms']:.3f}")
        if "best_peer" in row:
            lines.append(
                f"{'':>11}e2a / best peer ({row['best_peer']}): msg/s x{row['ratio_throughput_vs_best_peer']:.2f}"
                f" (per run {row['ratio_throughput_vs_best_peer_per_run']}),"
                f" p99 x{row['ratio_p99_vs_best_peer']:.2f}"
                + (f"; e2a / reference msg/s x{row['ratio_throughput_vs_reference']:.2f}"
                   if "ratio_throughput_vs_reference" in row else ""))
            e = row["receivers"]["e2a"]
            lead = f"{'':>11}{TARGET_THROUGHPUT}x the best peer: "
            if "process_budget_ms_per_msg" in row:
                n = row["e2a_processes"]
                lines.append(
                    f"{lead}e2a's {n} process{'es' if n > 1 else ''} <= "
                    f"{row['process_budget_ms_per_msg']:.2f} ms of CPU per message (one GIL each; used "
                    f"{e['cpu_ms_per_msg_receiver']:.2f}, {e['receiver_cpus']:.2f} CPU-s/s)")
                lead = " " * len(lead)
            if e["cpu_ms_per_msg_machine"] == e["cpu_ms_per_msg_machine"]:  # not NaN: recorded
                rest = e["cpu_ms_per_msg_machine"] - e["cpu_ms_per_msg_receiver"] - e["cpu_ms_per_msg_client"]
                lines.append(
                    f"{lead}the machine <= "
                    f"{row['machine_budget_ms_per_msg']:.2f} ms per message for everything (e2a's rounds: "
                    f"{e['cpu_ms_per_msg_machine']:.2f}, e2a {e['cpu_ms_per_msg_receiver']:.2f} + client "
                    f"{e['cpu_ms_per_msg_client']:.2f} + the rest {rest:.2f}; {e['machine_busy']:.0%} busy), "
                    f"leaving e2a <= {row['e2a_machine_budget_ms_per_msg']:.2f}")
        lines.append("")
    return "\n".join(lines)


def pool_reports(paths: list[Path]) -> int:
    """``--pool``: medians over the rounds of several invocations (each interleaved on its own)."""
    from dataclasses import fields

    names = {f.name for f in fields(Round)}
    rounds: list[Round] = []
    reports = [json.loads(path.read_text()) for path in paths]
    for i, (path, report) in enumerate(zip(paths, reports, strict=True)):
        load = report["machine"].get("loadavg_start", ["?"])[0], report["machine"]["loadavg_end"][0]
        print(f"  {path.name}: started {report['started_at'][:16]} UTC, load {load[0]} -> {load[1]}, "
              f"e2a tree: {report['settings'].get('e2a_tree') or 'working tree'}"
              + (f", {COMPARED} tree: {report['settings']['compare_tree']}"
                 if report["settings"].get("compare_tree") else ""))
        for r in report["rounds"]:
            if r["run"] >= 0:
                rounds.append(Round(**{k: v for k, v in r.items() if k in names} | {"run": 100 * i + r["run"]}))
    processes = {report["settings"].get("e2a_processes", 1) for report in reports}
    cpus = {report["machine"]["cpus"] for report in reports}
    if len(cpus) > 1:
        raise SystemExit(f"--pool: the reports come from machines with different CPU counts ({sorted(cpus)})")
    machine_cpus = cpus.pop()
    rows = aggregate(rounds, [n for n in ORDER if n in {r.receiver for r in rounds}],
                     processes.pop() if len(processes) == 1 else None, machine_cpus)
    print(format_table(rows, len({r.run for r in rounds if r.receiver == "e2a"}), machine_cpus).replace(
        "run(s);", "interleaved run(s), pooled over the invocations above;", 1))
    for v in targets(rows):
        print(f"  target {v['target']}: {v['value']} -> {'MET' if v['met'] else 'MISSED'}")
    return 0


# ============================================================== driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="e2a vs. peers doing the same work (loopback only)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, few messages")
    parser.add_argument("--runs", type=int, default=None, help="interleaved runs (default 3)")
    parser.add_argument("--sizes", default="2k,100k", help="comma list of 2k,100k")
    parser.add_argument("--concurrency", default="8", help="comma list of parallel sessions (default 8)")
    parser.add_argument("--receivers", default=",".join(ALL_RECEIVERS),
                        help=f"comma list out of {','.join(ALL_RECEIVERS)} (default all)")
    parser.add_argument("--messages-2k", type=int, default=None, help="messages per 2 KB round (default 1000)")
    parser.add_argument("--messages-100k", type=int, default=None, help="messages per 100 KB round (default 300)")
    parser.add_argument("--processes", type=int, default=1, help="e2a's `processes` setting")
    parser.add_argument("--pin", type=cpu_list, default=None, metavar="CPU[,CPU…]",
                        help="e2a's cpu_affinity setting: each e2a process kept on one of these CPUs")
    parser.add_argument("--pin-peers", action="store_true",
                        help="with --pin: keep the other receivers on its first CPU (every thread, set after start)")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="wall-clock cap per round, seconds")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock cap for all rounds")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="py-spy record e2a during its rounds (raw collapsed stacks into DIR; summarised per size)")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (where Python CPU goes)")
    parser.add_argument("--e2a-tree", metavar="DIR", default=None,
                        help="run e2a (twistd, e2a-admin) from another copy of the source, e.g. an export of the"
                        " last commit (git archive HEAD | tar -x -C DIR) while the working tree is mid-change")
    parser.add_argument("--compare-tree", metavar="DIR", default=None,
                        help=f"also run e2a from DIR as receiver {COMPARED}, interleaved round by round with the"
                        " first e2a and in a database of its own; prints their same-run ratios (A/B of a change)")
    parser.add_argument("--pool", nargs="+", metavar="JSON", default=None,
                        help="run nothing: pool the rounds of earlier invocations' JSON files and print their medians")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/peers-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database, Haraka config)")
    parser.add_argument("--pg-stat", action="store_true",
                        help="DIAGNOSTIC (with --receivers e2a): PostgreSQL with pg_stat_statements; prints the"
                             " statements with the most time per accepted message")
    args = parser.parse_args(argv)

    if args.pool:
        return pool_reports([Path(p) for p in args.pool])
    preset = QUICK if args.quick else FULL
    runs = args.runs or preset["runs"]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    wanted = [r.strip() for r in args.receivers.split(",") if r.strip()]
    counts = dict(preset["messages"])
    if args.messages_2k:
        counts["2k"] = args.messages_2k
    if args.messages_100k:
        counts["100k"] = args.messages_100k
    if any(s not in SIZES for s in sizes) or any(r not in ALL_RECEIVERS for r in wanted):
        parser.error("unknown size or receiver")
    if not (1 <= runs <= 10 and all(1 <= c <= 64 for c in concs) and all(1 <= counts[s] <= 5000 for s in sizes)):
        parser.error("runs 1..10, concurrency 1..64, messages 1..5000 per round")
    if args.pin is not None and not set(args.pin) <= os.sched_getaffinity(0):
        parser.error(f"--pin {args.pin}: this process may only use CPUs {sorted(os.sched_getaffinity(0))}")
    if args.pin_peers and args.pin is None:
        parser.error("--pin-peers needs --pin CPU")
    if args.pg_stat and args.compare_tree:
        parser.error("--pg-stat counts the statements of every database: not with --compare-tree")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.e2a_tree:
        import common

        tree = Path(args.e2a_tree).resolve()
        if not (tree / "e2a" / "service.py").exists():
            parser.error(f"--e2a-tree {tree}: no e2a/service.py there")
        common.REPO = tree  # E2AStack.spawn and start_e2a put it first on PYTHONPATH / use it as cwd
        os.environ["PYTHONPATH"] = str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")
        log(f"e2a runs from {tree}")
    compare_tree = None
    if args.compare_tree:
        compare_tree = Path(args.compare_tree).resolve()
        if not (compare_tree / "e2a" / "service.py").exists():
            parser.error(f"--compare-tree {compare_tree}: no e2a/service.py there")
        if "e2a" not in wanted:
            parser.error("--compare-tree needs the receiver e2a")
        log(f"{COMPARED} runs from {compare_tree}")

    tmp = Path(tempfile.mkdtemp(prefix="e2a-peers-"))
    pem, txt = dkim_key()
    mails = {s: build_mail(s, SIZES[s], pem) for s in sizes}
    stack = E2AStack(tmp, processes=args.processes)
    stack_b = E2AStack(tmp / COMPARED, processes=args.processes, repo=compare_tree) if compare_tree else None
    rounds: list[Round] = []
    skipped: dict[str, str] = {}
    profile_summary = None
    pg_stat: list[dict[str, Any]] | None = None
    started_at = datetime.now(UTC)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    checker: Checker | None = None
    receivers: dict[str, Receiver] = {}
    exit_code = 0
    try:
        stack.start_postgres(log, PG_STAT_OPTIONS if args.pg_stat else ())
        stack.start_dns(txt, log)
        if "e2a" in wanted:
            stack.start_e2a({"cpu_affinity": args.pin} if args.pin is not None else {}, log)
            stack.api("/api/v1/agents", {"slug": AGENT_SLUG, "name": "Bench", "agent_mode": "local"})
            receivers["e2a"] = Receiver("e2a", stack.e2a_smtp, stack.e2a.pid, dsn=stack.dsn)
        if stack_b is not None:
            stack_b.tmp.mkdir()
            stack_b.share(stack, "e2a_b")
            stack_b.start_e2a({"cpu_affinity": args.pin} if args.pin is not None else {}, log)
            stack_b.api("/api/v1/agents", {"slug": AGENT_SLUG, "name": "Bench", "agent_mode": "local"})
            receivers[COMPARED] = Receiver(COMPARED, stack_b.e2a_smtp, stack_b.e2a.pid, dsn=stack_b.dsn)
        starters = {
            "aiosmtpd": lambda: start_aiosmtpd(stack, log),
            "haraka-file": lambda: start_haraka(stack, "file", log),
            "haraka-pg": lambda: start_haraka(stack, "pg", log),
            "reference": lambda: start_reference(stack, log),
        }
        for name in wanted:
            if name in starters:
                try:
                    receivers[name] = starters[name]()
                except (FileNotFoundError, RuntimeError) as e:
                    skipped[name] = str(e)
                    log(f"SKIPPED {name}: {e}")
        if args.pin is not None and args.pin_peers:
            for name, receiver in receivers.items():
                if name not in ("e2a", COMPARED):  # e2a pins itself: its cpu_affinity setting
                    pin_threads(receiver.pid, args.pin[0])
        checker = Checker(stack.dsn)
        log("pids: " + ", ".join(f"{n} {r.pid} :{r.port}" for n, r in receivers.items())
            + f"; load {loadavg():.2f}")
        profiler = Profiler(Path(args.profile), stack.e2a.pid, args.profile_gil) if args.profile and stack.e2a else None
        id_base = uuid.uuid4().hex[:10]
        client_cls = make_client_class()
        names = list(receivers)
        dns_pid = stack.dns.pid if stack.dns else 0

        from twisted.internet import defer, task

        async def one_round(reactor: Any, r: Receiver, size: str, conc: int, run: int, count: int,
                            prefix: str) -> Round:
            checker.mark(r)
            profiling = profiler is not None and r.name == "e2a" and run >= 0
            if profiling:
                profiler.start(f"e2a-{size}-c{conc}-run{run}", int(args.round_timeout) + 30)
            c0, p0, d0, m0, l0 = (tree_cpu(r.pid), pg_cpu_total(stack.postmaster_pid), proc_cpu(dns_pid),
                                  sum(os.times()[:2]), loadavg())
            busy0, steal0 = machine_cpu()
            sent, ok, wall, lat, capped, errs = await run_round(
                reactor, client_cls, r.port, mails[size], count, conc, prefix, args.round_timeout)
            busy1, steal1 = machine_cpu()
            c1, p1, d1, m1 = (tree_cpu(r.pid), pg_cpu_total(stack.postmaster_pid), proc_cpu(dns_pid),
                              sum(os.times()[:2]))
            if profiling:
                profiler.stop()
            l1 = loadavg()
            stored, verified = checker.check(r)
            lat.sort()
            return Round(r.name, size, conc, run, sent, ok, stored, verified, wall,
                         ok / wall if wall > 0 else 0.0, 1000 * percentile(lat, 50), 1000 * percentile(lat, 99),
                         capped, c1 - c0, p1 - p0, d1 - d0, m1 - m0, l0, l1, errs, busy1 - busy0, steal1 - steal0)

        async def measure(reactor: Any) -> None:
            deadline = time.monotonic() + 60 * args.max_minutes
            for name in names:  # warm-up: imports, DNS caches, pools, JIT
                for s in sizes:
                    w = await one_round(reactor, receivers[name], s, 4, -1, WARMUP_MESSAGES, f"warm.{id_base}.{name}.{s}")
                    log(f"warm-up {name:<11} {s:>4}: ok {w.ok}/{WARMUP_MESSAGES} stored {w.stored} "
                        f"verified {w.verified if w.verified is not None else '-'}"
                        + (f" errors {w.errors}" if w.errors else ""))
            if args.pg_stat:
                pg_stat_reset(stack.dsn)
            for run in range(runs):
                for i, s in enumerate(sizes):
                    for j, conc in enumerate(concs):
                        order = round_order(names, run, i * len(concs) + j)
                        for name in order:
                            if time.monotonic() > deadline:
                                log("--max-minutes reached: stopping early")
                                return
                            r = await one_round(reactor, receivers[name], s, conc, run, counts[s],
                                                f"{id_base}.{name}.{s}.c{conc}.r{run}")
                            rounds.append(r)
                            log(f"run {run + 1}/{runs} {s:>4} c{conc:<2} {name:>11}: {r.throughput:7.1f} msg/s  "
                                f"p99 {r.p99_ms:6.1f} ms  ok {r.ok}/{counts[s]}  cpu "
                                f"{1000 * r.cpu_receiver_s / max(r.ok, 1):.2f}+pg "
                                f"{1000 * r.cpu_postgres_s / max(r.ok, 1):.2f} ms/msg  stored {r.stored} verified "
                                f"{r.verified if r.verified is not None else '-'}  load {r.load_after:.2f}"
                                + ("" if r.verified_ok else "  VERIFICATION CHECK FAILED")
                                + (f"  errors {r.errors}" if r.errors else "") + ("  CAPPED" if r.capped else ""))
                            await task.deferLater(reactor, 0.2, lambda: None)

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(measure(reactor)))
        except SystemExit as e:
            exit_code = int(e.code or 0)
        if profiler is not None:
            profile_summary = {size: summarize_profile([f for f in profiler.files if f.name.startswith(f"e2a-{size}-")])
                               for size in sizes}
        if args.pg_stat:
            accepted = sum(r.ok for r in rounds if r.receiver == "e2a")
            pg_stat = pg_stat_top(stack.dsn, accepted or 1)
            for row in pg_stat:
                log(f"pg_stat {row['exec_ms_per_msg'] + row['plan_ms_per_msg']:.3f} ms/msg "
                    f"(exec {row['exec_ms_per_msg']:.3f}, plan {row['plan_ms_per_msg']:.3f}) calls {row['calls']} wal {row['wal_bytes_per_msg']} B/msg  {row['query'][:110]}")
    finally:
        if checker is not None:
            checker.close()
        if stack_b is not None:
            stack_b.stop()
        stack.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")

    rows = aggregate(rounds, [n for n in ORDER if n in {r.receiver for r in rounds}], args.processes or 1)
    verdicts = targets(rows)
    print(f"e2a vs peers, {started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load at start "
          f"{' '.join(load_start)}, at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
          + (f"; e2a kept on CPUs {args.pin}" if args.pin is not None else "")
          + (", the other receivers too" if args.pin is not None and args.pin_peers else ""))
    print(format_table(rows, runs))
    for v in verdicts:
        print(f"  target {v['target']}: {v['value']} -> {'MET' if v['met'] else 'MISSED'}")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    report = {
        "started_at": started_at.isoformat(), "finished_at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]},
        "settings": {"runs": runs, "sizes": {s: mails[s].length for s in sizes}, "concurrency": concs,
                     "messages_per_round": {s: counts[s] for s in sizes}, "quick": args.quick,
                     "e2a_processes": args.processes, "pin": args.pin, "pin_peers": args.pin_peers, "e2a_tree": args.e2a_tree, "compare_tree": args.compare_tree,
                     "receivers": list(receivers) if rounds else wanted,
                     "postgres": "embedded, defaults (fsync=on, synchronous_commit=on)"},
        "medians": rows, "targets": verdicts, "skipped": skipped,
        "rounds": [asdict(r) | {"verified_ok": r.verified_ok} for r in rounds],
        "profile": profile_summary, "pg_stat_top": pg_stat,
    }
    out = Path(args.output) if args.output else RESULTS / f"peers-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"  JSON: {out}")
    if profile_summary:
        print(json.dumps(profile_summary, indent=2))
    complete = bool(rounds) and all(r.verified_ok and not r.capped and r.ok == r.sent for r in rounds)
    return exit_code or (0 if complete else 1)


if __name__ == "__main__":
    sys.exit(main())
