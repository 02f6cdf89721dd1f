"""SMTP ingest benchmark: e2a vs. a minimal durable reference receiver, interleaved.

What it measures, and why this way: e2a's promise is "250 only after the verified, signed
message is committed". Absolute messages/s on a shared machine say little, so every round
against e2a is paired with a round against ``bench/reference_smtp.py`` (stock twisted.mail,
one INSERT, 250 after commit, no verification) on the same PostgreSQL, in alternating order,
and e2a is reported as ratios to it.

Everything runs on 127.0.0.1 and in subprocesses started here:

* a DNS server (twisted.names, ``tests/support/dnsserver.py``) publishing SPF
  (``ip4:127.0.0.1``), the DKIM test key and a DMARC record for the sender domain,
* ONE embedded PostgreSQL (e2a's ``EmbeddedPostgres``, default durability:
  ``synchronous_commit=on``, ``fsync=on``) shared by both receivers,
* e2a as ``twistd -n e2a`` with a generated config, plus a user (``e2a-admin bootstrap``)
  and a local-mode agent created through the HTTP API,
* the reference receiver.

Clients are plain (non-pipelining) SMTP sessions driven by Twisted; concurrency = parallel
sessions, each sending messages one after another over its own connection (MAIL, RCPT,
DATA, body, dot — the transaction is reset by the 250). Accept latency = from handing the
final ``.`` to the socket to receiving the final reply (it includes the server reading the
body). Throughput = accepted messages / round wall time (sessions connected and greeted
before the clock starts). Each message is DKIM-signed (rsa-sha256, 2048-bit test key) with
the signature covering From/To/Subject/Date/MIME headers and the body; only the Message-ID
(outside ``h=``) varies, so e2a's duplicate suppression never kicks in.

Run from the repository root::

    .venv/bin/python bench/smtp_ingest.py --runs 3          # the full matrix, ~5-10 min
    .venv/bin/python bench/smtp_ingest.py --quick           # smoke run, well under a minute
    .venv/bin/python bench/smtp_ingest.py --runs 1 --sizes 100k --concurrency 8 \\
        --profile bench/results/profile                          # py-spy on e2a during those rounds

Prints a table of medians (over runs) and writes JSON to ``bench/results/``. Every loop is
bounded by a message count and by wall-clock caps (``--round-timeout``, ``--max-minutes``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LOOPBACK = "127.0.0.1"

SENDER_DOMAIN = "example.org"
SENDER = f"alice@{SENDER_DOMAIN}"
SHARED_DOMAIN = "agents.bench.test"
AGENT_SLUG = "bench"
RECIPIENT = f"{AGENT_SLUG}@{SHARED_DOMAIN}"
SMTP_DOMAIN = "mx.bench.test"
DKIM_SELECTOR = "bench"

SIZES = {"2k": 2 * 1024, "100k": 100 * 1024}
FULL = {"runs": 3, "concurrency": (1, 8, 32), "messages": {"2k": 400, "100k": 200}}
QUICK = {"runs": 1, "concurrency": (1, 4), "messages": {"2k": 20, "100k": 10}}
WARMUP_MESSAGES = 24
REPLY_TIMEOUT = 60.0  # seconds for any single SMTP reply; a safety net, not a tuning knob

TARGETS = (
    # (size, concurrency, metric, comparison, bound, wording)
    ("2k", 8, "throughput", ">=", 0.8, "2 KB @ c8 msgs/s >= 0.8x reference"),
    ("100k", 8, "throughput", ">=", 1.5, "100 KB @ c8 msgs/s >= 1.5x reference"),
    ("2k", 8, "p99", "<=", 2.0, "2 KB @ c8 p99 <= 2x reference"),
    ("100k", 8, "p99", "<=", 2.0, "100 KB @ c8 p99 <= 2x reference"),
)


# ============================================================== DNS server subprocess mode


def serve_dns(records_json: str) -> None:
    """``--serve-dns``: the loopback zone of tests/support/dnsserver.py in its own process."""
    sys.path.insert(0, str(REPO))
    from twisted.internet import defer, task

    from tests.support.dnsserver import start_dns_server

    records = json.loads(records_json)

    async def main(reactor: Any) -> None:
        handle = await start_dns_server(reactor, records, ttl=300)
        sys.stdout.write(f"LISTENING {handle.port}\n")
        sys.stdout.flush()
        await defer.Deferred()  # until SIGTERM

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))


# ============================================================== mail


@dataclass
class BenchMail:
    """One DKIM-signed message per size; per-message bytes differ only in Message-ID."""

    size_name: str
    head: bytes  # DKIM-Signature field (folded), before the Message-ID
    tail: bytes  # the signed message, dot-stuffed, ending CRLF
    length: int

    def wire(self, message_id: str) -> bytes:
        return self.head + f"Message-ID: <{message_id}>\r\n".encode() + self.tail


def build_mail(size_name: str, target: int, private_pem: bytes) -> BenchMail:
    import dkim

    headers = (
        f"From: Alice <{SENDER}>\r\n"
        f"To: {RECIPIENT}\r\n"
        f"Subject: bench {size_name}\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    # 76-character base64 lines: realistic attachment-like content, never starts with '.'.
    rng = __import__("random").Random(size_name)
    lines: list[bytes] = []
    total = len(headers) + 600  # ~ DKIM-Signature + Message-ID
    while total < target:
        line = base64.b64encode(rng.randbytes(57))
        lines.append(line)
        total += len(line) + 2
    body = b"\r\n".join(lines) + b"\r\n"
    message = headers + body
    sig = dkim.sign(
        message,
        DKIM_SELECTOR.encode(),
        SENDER_DOMAIN.encode(),
        private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"mime-version", b"content-type"],
    )
    assert not any(ln.startswith(b".") for ln in message.split(b"\r\n"))
    mail = BenchMail(size_name, sig, message, 0)
    mail.length = len(mail.wire("x" * 40 + "@example.org"))
    return mail


def dkim_key() -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


def dns_records(dkim_txt: str) -> dict[str, Any]:
    return {
        SENDER_DOMAIN: {"TXT": ["v=spf1 ip4:127.0.0.1 -all"], "A": ["127.0.0.1"]},
        f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}": {"TXT": [dkim_txt]},
        f"_dmarc.{SENDER_DOMAIN}": {"TXT": ["v=DMARC1; p=reject"]},
    }


# ============================================================== processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def read_listening(proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> int:
    """Wait (bounded) for the child's ``LISTENING <port>`` line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(b"LISTENING "):
                    return int(line.split()[1])
    raise RuntimeError(f"{what} did not start within {timeout} s")


def wait_smtp(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not answer SMTP on {port} within {timeout} s")


def http_json(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    assert url.startswith(f"http://{LOOPBACK}:")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with opener.open(req, timeout=30) as resp:
        return json.loads(resp.read())


def proc_cpu(pid: int) -> float:
    """utime+stime of a process (all threads) in seconds; 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU of a process and its live children: PostgreSQL's backends, e2a's ``processes``."""
    total = proc_cpu(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def postgres_cpu(postmaster_pid: int) -> float:
    """CPU of the postmaster and its live children (backends, walwriter, checkpointer)."""
    return tree_cpu(postmaster_pid)


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine since boot, all CPUs (``/proc/stat``).

    Busy is user + nice + system + irq + softirq: every process on the machine, this
    benchmark's client and PostgreSQL included. Steal (time the hypervisor gave to other guests)
    is apart: it is capacity this machine did not have.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def e2a_bench_config(tmp: Path, dsn: str, dns_port: int, http_port: int, smtp_port: int,
                     processes: int) -> dict[str, Any]:
    """The e2a config both benches start from (end_to_end.py merges its overrides into it)."""
    return {
        "data_dir": str(tmp / "e2a-data"),
        "shared_domain": SHARED_DOMAIN,
        "processes": processes,
        "database": {"url": dsn},
        "dns": {"nameservers": [f"{LOOPBACK}:{dns_port}"], "timeout": 5},
        "http": {"listen_addr": f"{LOOPBACK}:{http_port}"},
        # One client IP opens up to 32 sessions and sends up to 400 messages on one
        # session: raise the per-IP limits (defaults 20 / 100) so they never interfere.
        "smtp": {
            "listen_addr": f"{LOOPBACK}:{smtp_port}",
            "domain": SMTP_DOMAIN,
            "max_connections_per_ip": 200,
            "max_messages_per_session": 100000,
        },
    }


def twistd_command(floor: bool, logfile: Path, config: Path) -> list[str]:
    """``twistd -n e2a`` (or, with ``floor``, the same through bench/floor_twistd.py)."""
    python = sys.executable
    twistd = [python, str(REPO / "bench" / "floor_twistd.py")] if floor else [str(Path(python).parent / "twistd")]
    return [*twistd, "-n", "--pidfile=", f"--logfile={logfile}", "e2a", "--config", str(config)]


@dataclass
class Stack:
    tmp: Path
    pg: Any = None
    postmaster_pid: int = 0
    dsn: str = ""
    dns: subprocess.Popen[bytes] | None = None
    dns_port: int = 0
    e2a: subprocess.Popen[bytes] | None = None
    e2a_smtp: int = 0
    e2a_http: int = 0
    ref: subprocess.Popen[bytes] | None = None
    ref_smtp: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    floor: bool = False  # diagnostic: e2a through bench/floor_twistd.py (remembered verdicts)
    processes: int = 1  # e2a's ``processes`` setting

    def start(self, dkim_txt: str, log: Any) -> None:
        from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings

        python = sys.executable
        bindir = Path(python).parent
        log("starting embedded PostgreSQL (synchronous_commit=on) …")
        self.pg = EmbeddedPostgres(EmbeddedSettings(self.tmp / "pg", database="e2a"))
        self.pg.thd_start()
        self.dsn = self.pg.dsn
        self.postmaster_pid = int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])

        log("starting DNS server …")
        self.dns = self._spawn(
            [python, str(Path(__file__).resolve()), "--serve-dns", json.dumps(dns_records(dkim_txt))],
            "dns.log",
        )
        self.dns_port = read_listening(self.dns, "DNS server")

        self.e2a_smtp, self.e2a_http = free_port(), free_port()
        config = e2a_bench_config(self.tmp, self.dsn, self.dns_port, self.e2a_http, self.e2a_smtp, self.processes)
        cfg = self.tmp / "e2a.yaml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        log("starting e2a (twistd -n e2a) …" if not self.floor else "starting e2a via floor_twistd.py (DIAGNOSTIC) …")
        self.e2a = self._spawn(twistd_command(self.floor, self.tmp / "e2a.log", cfg), "e2a.stdout")
        wait_smtp(self.e2a_smtp, self.e2a, "e2a")
        out = subprocess.run(
            [str(bindir / "e2a-admin"), "--config", str(cfg), "bootstrap", "--email", "bench@example.com", "--json"],
            check=True, capture_output=True, timeout=120, cwd=str(REPO),
        )
        key = json.loads(out.stdout)["api_key"]["key"]
        agent = http_json(
            f"http://{LOOPBACK}:{self.e2a_http}/api/v1/agents", key,
            {"slug": AGENT_SLUG, "name": "Bench", "agent_mode": "local"},
        )
        log(f"agent {agent.get('agent_address') or agent.get('address') or agent.get('id') or agent}")

        log("starting reference receiver …")
        self.ref = self._spawn(
            [python, str(REPO / "bench" / "reference_smtp.py"), "--dsn", self.dsn, "--port", "0"], "ref.log"
        )
        self.ref_smtp = read_listening(self.ref, "reference receiver")

    def _spawn(self, argv: list[str], logname: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(k, None)
        proc = subprocess.Popen(
            argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=open(self.tmp / logname, "wb"),  # noqa: SIM115 - lives as long as the child
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.pg is not None:
            try:
                self.pg.thd_stop()
            except Exception as e:  # noqa: BLE001 - best effort at teardown
                print(f"warning: stopping PostgreSQL: {e}", file=sys.stderr)


# ============================================================== SMTP client (Twisted)


def make_client_class() -> Any:
    from twisted.internet import defer, protocol

    class Reply:
        __slots__ = ("code", "text")

        def __init__(self, code: int, text: str) -> None:
            self.code, self.text = code, text

        def __repr__(self) -> str:
            return f"{self.code} {self.text}"

    class SmtpClient(protocol.Protocol):
        """Minimal non-pipelining SMTP client: one outstanding reply at a time."""

        def __init__(self, reactor: Any) -> None:
            self._reactor = reactor
            self._buf = b""
            self._lines: list[str] = []
            self._waiter: defer.Deferred[Any] | None = None
            self._ready: collections.deque[Any] = collections.deque()
            self.reply_at = 0.0

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            self._buf += data
            while True:
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                self._lines.append(line[4:].decode("ascii", "replace"))
                if line[3:4] != b"-":
                    reply = Reply(int(line[:3]), "\n".join(self._lines))
                    self._lines = []
                    self.reply_at = time.perf_counter()
                    if self._waiter is not None:
                        w, self._waiter = self._waiter, None
                        w.callback(reply)
                    else:
                        self._ready.append(reply)

        def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
            if self._waiter is not None:
                w, self._waiter = self._waiter, None
                w.errback(ConnectionError(f"connection lost: {reason.value if reason else ''}"))

        def reply(self) -> defer.Deferred[Any]:
            if self._ready:
                return defer.succeed(self._ready.popleft())
            d: defer.Deferred[Any] = defer.Deferred()
            self._waiter = d
            d.addTimeout(REPLY_TIMEOUT, self._reactor)
            return d

        async def command(self, line: str) -> Any:
            self.transport.write(line.encode("ascii") + b"\r\n")
            return await self.reply()

    return SmtpClient


@dataclass
class RoundResult:
    receiver: str
    size: str
    concurrency: int
    run: int
    sent: int
    ok: int
    errors: int
    wall: float
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    capped: bool
    cpu_receiver_s: float
    cpu_postgres_s: float
    cpu_client_s: float
    load_before: float
    load_after: float
    error_samples: list[str]


def round_order(names: list[str], run: int, cell: int) -> list[str]:
    """The order of the receivers in one cell (size, concurrency) of one run: turned by one
    receiver every other run and reversed in between, so that over 2 × len(names) runs each
    receiver goes first, and follows each other receiver, equally often.

    WHY: a receiver measured right after another meets the PostgreSQL work that one left
    behind (checkpoint, autovacuum, WAL). A counter over all rounds did not turn the order:
    with one cell and two receivers (run + rounds so far) is always even, and e2a went first in
    every run.
    """
    k = (run // 2 + cell) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if run % 2 else order


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


async def run_round(
    reactor: Any, client_cls: Any, port: int, mail: BenchMail, count: int, concurrency: int,
    id_prefix: str, round_timeout: float,
) -> tuple[int, int, float, list[float], bool, list[str]]:
    """``count`` messages over ``concurrency`` sessions; returns (sent, ok, wall, latencies, capped, errors)."""
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    sessions = []
    for _ in range(concurrency):
        endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=10)
        client = await connectProtocol(endpoint, client_cls(reactor))
        greeting = await client.reply()
        if greeting.code != 220:
            raise RuntimeError(f"greeting {greeting}")
        ehlo = await client.command("EHLO bench-client.example.org")
        if ehlo.code != 250:
            raise RuntimeError(f"EHLO {ehlo}")
        sessions.append(client)

    next_index = iter(range(count))
    latencies: list[float] = []
    errors: list[str] = []
    state = {"sent": 0, "ok": 0, "capped": False}
    start = time.perf_counter()
    deadline = start + round_timeout

    async def session(client: Any) -> None:
        for i in next_index:
            if time.perf_counter() > deadline:
                state["capped"] = True
                return
            r = await client.command(f"MAIL FROM:<{SENDER}>")
            if r.code != 250:
                errors.append(f"MAIL {r}")
                continue
            r = await client.command(f"RCPT TO:<{RECIPIENT}>")
            if r.code != 250:
                errors.append(f"RCPT {r}")
                await client.command("RSET")
                continue
            r = await client.command("DATA")
            if r.code != 354:
                errors.append(f"DATA {r}")
                await client.command("RSET")
                continue
            client.transport.write(mail.wire(f"{id_prefix}.{i}@{SENDER_DOMAIN}"))
            sent_at = time.perf_counter()
            client.transport.write(b".\r\n")
            state["sent"] += 1
            r = await client.reply()
            if r.code == 250:
                state["ok"] += 1
                latencies.append(client.reply_at - sent_at)
            else:
                errors.append(f"end of data {r}")

    results = await defer.DeferredList(
        [defer.Deferred.fromCoroutine(session(c)) for c in sessions], consumeErrors=True
    )
    wall = time.perf_counter() - start
    for ok, value in results:
        if not ok:
            errors.append(f"session failed: {value.value!r}")
    for client in sessions:
        try:
            client.transport.write(b"QUIT\r\n")
            client.transport.loseConnection()
        except Exception:  # noqa: BLE001 - already gone
            pass
    return state["sent"], state["ok"], wall, latencies, state["capped"], errors[:5]


# ============================================================== profiling


class Profiler:
    """py-spy ``record`` against the twistd pid for selected rounds (raw collapsed stacks)."""

    def __init__(self, out_dir: Path, pid: int, gil_only: bool = False) -> None:
        self.out_dir = out_dir
        self.gil_only = gil_only
        self.pid = pid
        self.exe = self.find()
        self.proc: subprocess.Popen[bytes] | None = None
        self.files: list[Path] = []

    @staticmethod
    def find() -> str:
        """py-spy on PATH, beside this interpreter, or where ``bench/peers/setup.sh`` installs it;
        every bench that profiles stops before its rounds when none is found."""
        candidates = [shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy"),
                      str(RESULTS / "peers" / "pylib" / "bin" / "py-spy")]
        for exe in candidates:
            if exe and Path(exe).exists():
                return exe
        raise SystemExit("--profile needs py-spy: pip install py-spy, or sh bench/peers/setup.sh")

    def start(self, label: str, max_seconds: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{label}.txt"
        self.files.append(out)
        self.proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw", "--threads",
             "--nonblocking", "--duration", str(max_seconds), "--output", str(out),
             *(["--gil"] if self.gil_only else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # let it attach before traffic starts

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: lines merged, paths shortened."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{func} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})"


def _thread_name(frame: str) -> str:
    if "MainThread" in frame:
        return "reactor"
    return frame.split(": ", 1)[-1].rsplit("-", 1)[0] if ": " in frame else "other"


_INTERESTING = ("e2a/", "dkim/", "spf.py", "txpostgres", "psycopg2", "dns/", "hashlib")


def summarize_profile(files: list[Path], top: int = 25) -> dict[str, Any]:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks.

    py-spy counts a thread blocked inside a C call that released the GIL (epoll_wait, a
    psycopg2 send, a lock) as busy in that frame, so "self" shares of such frames measure
    time waiting (for I/O or to get the GIL back), not CPU.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            count = int(n)
            frames = stack.split(";")
            total += count
            thread = _thread_name(frames[0])
            threads[thread] += count
            for name in {_frame_name(f) for f in frames[1:] if any(k in f for k in _INTERESTING)}:
                inclusive[f"{thread}: {name}"] += count
            self_[f"{thread}: {_frame_name(frames[-1])}"] += count

    def share(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {
        "samples": total,
        "files": [str(f) for f in files],
        "threads_pct": {k: share(v) for k, v in threads.most_common()},
        "inclusive_pct": {k: share(v) for k, v in inclusive.most_common(top)},
        "self_pct": {k: share(v) for k, v in self_.most_common(top)},
    }


# ============================================================== driver


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def aggregate(rounds: list[RoundResult]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int], dict[str, list[RoundResult]]] = {}
    for r in rounds:
        cells.setdefault((r.size, r.concurrency), {}).setdefault(r.receiver, []).append(r)
    out = []
    for (size, conc), by in sorted(cells.items(), key=lambda kv: (SIZES[kv[0][0]], kv[0][1])):
        row: dict[str, Any] = {"size": size, "concurrency": conc}
        for name in ("e2a", "reference"):
            rs = by.get(name, [])
            row[name] = {
                "runs": len(rs),
                "throughput": median([r.throughput for r in rs]),
                "p50_ms": median([r.p50_ms for r in rs]),
                "p99_ms": median([r.p99_ms for r in rs]),
                "cpu_ms_per_msg_receiver": median([1000 * r.cpu_receiver_s / r.ok for r in rs if r.ok]),
                "cpu_ms_per_msg_postgres": median([1000 * r.cpu_postgres_s / r.ok for r in rs if r.ok]),
                "errors": sum(r.errors for r in rs),
                "capped": any(r.capped for r in rs),
            }
        e, ref = row["e2a"], row["reference"]
        row["ratio_throughput"] = e["throughput"] / ref["throughput"] if ref["throughput"] else float("nan")
        row["ratio_p50"] = e["p50_ms"] / ref["p50_ms"] if ref["p50_ms"] else float("nan")
        row["ratio_p99"] = e["p99_ms"] / ref["p99_ms"] if ref["p99_ms"] else float("nan")
        out.append(row)
    return out


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    verdicts = []
    for size, conc, metric, op, bound, wording in TARGETS:
        row = next((r for r in rows if r["size"] == size and r["concurrency"] == conc), None)
        if row is None:
            continue
        value = row["ratio_throughput"] if metric == "throughput" else row["ratio_p99"]
        ok = value >= bound if op == ">=" else value <= bound
        verdicts.append({"target": wording, "ratio": round(value, 3), "met": bool(ok)})
    return verdicts


def format_table(rows: list[dict[str, Any]], runs: int) -> str:
    head = (
        f"{'size':>5} {'conc':>4} | {'e2a msg/s':>9} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'ref msg/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'x tput':>6} {'x p50':>6} {'x p99':>6} | "
        f"{'e2a cpu/msg':>11} {'ref cpu/msg':>11} {'pg/msg e2a|ref':>15}"
    )
    lines = [f"medians of {runs} run(s); ratios = e2a / reference; cpu in ms per accepted message", head,
             "-" * len(head)]
    for r in rows:
        e, f = r["e2a"], r["reference"]
        flag = " (capped)" if e["capped"] or f["capped"] else ""
        lines.append(
            f"{r['size']:>5} {r['concurrency']:>4} | {e['throughput']:9.1f} {e['p50_ms']:7.1f} {e['p99_ms']:7.1f} | "
            f"{f['throughput']:9.1f} {f['p50_ms']:7.1f} {f['p99_ms']:7.1f} | "
            f"{r['ratio_throughput']:6.2f} {r['ratio_p50']:6.2f} {r['ratio_p99']:6.2f} | "
            f"{e['cpu_ms_per_msg_receiver']:11.2f} {f['cpu_ms_per_msg_receiver']:11.2f} "
            f"{e['cpu_ms_per_msg_postgres']:7.2f}|{f['cpu_ms_per_msg_postgres']:<7.2f}{flag}"
        )
    return "\n".join(lines)


def verify_sample(dsn: str) -> dict[str, Any]:
    """Prove the bench mail really went through SPF/DKIM/DMARC and passed."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT auth_headers->>'X-E2A-Auth-Domain-Check', auth_headers->>'X-E2A-Auth-Verified', count(*)"
                " FROM messages WHERE direction = 'inbound' GROUP BY 1, 2"
            )
            e2a_rows = cur.fetchall()
            cur.execute("SELECT count(*) FROM bench_reference_messages")
            ref_count = cur.fetchone()[0]
    finally:
        conn.close()
    return {"e2a_domain_checks": [list(r) for r in e2a_rows], "reference_rows": ref_count}


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--serve-dns"]:
        serve_dns(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description="SMTP ingest benchmark: e2a vs. reference receiver (loopback only)")
    parser.add_argument("--runs", type=int, default=None, help="repeat the whole matrix N times (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1 run, few messages)")
    parser.add_argument("--sizes", default=None, help="comma list of 2k,100k (default both)")
    parser.add_argument("--concurrency", default=None, help="comma list (default 1,8,32)")
    parser.add_argument("--messages-2k", type=int, default=None, help="messages per 2 KB round (default 400)")
    parser.add_argument("--messages-100k", type=int, default=None, help="messages per 100 KB round (default 200)")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="wall-clock cap per round, seconds")
    parser.add_argument("--max-minutes", type=float, default=45.0, help="wall-clock cap for all rounds")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="py-spy record e2a (raw collapsed stacks into DIR) during its rounds at the highest"
                        " selected concurrency <= 8; pick the size with --sizes")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (where Python CPU goes)")
    parser.add_argument("--floor", action="store_true",
                        help="DIAGNOSTIC: e2a remembers the first verdict per sender and skips SPF/DKIM/DMARC"
                        " and the thread hop afterwards (bench/floor_twistd.py): e2a's cost without verification")
    parser.add_argument("--processes", type=int, default=1,
                        help="e2a's `processes` setting (CPU figures then cover the parent and its children)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/smtp_ingest-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database) for inspection")
    args = parser.parse_args(argv)

    preset = QUICK if args.quick else FULL
    runs = args.runs or preset["runs"]
    sizes = [s.strip() for s in (args.sizes or ",".join(SIZES)).split(",") if s.strip()]
    concs = [int(c) for c in args.concurrency.split(",")] if args.concurrency else list(preset["concurrency"])
    counts = dict(preset["messages"])
    if args.messages_2k:
        counts["2k"] = args.messages_2k
    if args.messages_100k:
        counts["100k"] = args.messages_100k
    for s in sizes:
        if s not in SIZES:
            parser.error(f"unknown size {s!r}")
    if not (1 <= runs <= 10 and all(1 <= c <= 64 for c in concs) and all(1 <= counts[s] <= 5000 for s in sizes)):
        parser.error("runs 1..10, concurrency 1..64, messages 1..5000 per round")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    sys.path.insert(0, str(REPO))
    tmp = Path(tempfile.mkdtemp(prefix="e2a-bench-"))
    pem, txt = dkim_key()
    mails = {s: build_mail(s, SIZES[s], pem) for s in sizes}
    for s, m in mails.items():
        log(f"{s}: {m.length} bytes on the wire per message (DKIM-signed once, Message-ID varies)")
    stack = Stack(tmp, floor=args.floor, processes=args.processes)
    rounds: list[RoundResult] = []
    profile_summary: dict[str, Any] | None = None
    started_at = datetime.now(UTC)
    exit_code = 0
    try:
        stack.start(txt, log)
        log(f"e2a pid {stack.e2a.pid} smtp {stack.e2a_smtp}; reference pid {stack.ref.pid} smtp {stack.ref_smtp}; "
            f"dns {stack.dns_port}; load {loadavg():.2f}")
        profiler = Profiler(Path(args.profile), stack.e2a.pid, args.profile_gil) if args.profile else None
        profile_conc = max([c for c in concs if c <= 8] or concs)
        id_base = uuid.uuid4().hex[:10]

        from twisted.internet import defer, task

        client_cls = make_client_class()
        receivers = {"e2a": (stack.e2a_smtp, stack.e2a.pid), "reference": (stack.ref_smtp, stack.ref.pid)}

        async def measure(reactor: Any) -> None:
            global_deadline = time.monotonic() + 60 * args.max_minutes
            # Warm-up: imports, DNS caches, connection pools, the agent lookup path.
            for name, (port, _pid) in receivers.items():
                for s in sizes:
                    await run_round(reactor, client_cls, port, mails[s], WARMUP_MESSAGES, 4,
                                    f"warm.{id_base}.{name}.{s}", args.round_timeout)
            log(f"warm-up done; sample: {verify_sample(stack.dsn)}")
            for run in range(runs):
                for i, s in enumerate(sizes):
                    for j, conc in enumerate(concs):
                        order = round_order(["e2a", "reference"], run, i * len(concs) + j)
                        for name in order:
                            if time.monotonic() > global_deadline:
                                log("--max-minutes reached: stopping early")
                                return
                            port, pid = receivers[name]
                            profiling = profiler is not None and name == "e2a" and conc == profile_conc
                            if profiling:
                                profiler.start(f"e2a-{s}-c{conc}-run{run}", int(args.round_timeout) + 30)
                            cpu0, pg0, me0, l0 = tree_cpu(pid), postgres_cpu(stack.postmaster_pid), \
                                sum(os.times()[:2]), loadavg()
                            sent, ok, wall, lat, capped, errs = await run_round(
                                reactor, client_cls, port, mails[s], counts[s], conc,
                                f"{id_base}.{name}.{s}.c{conc}.r{run}", args.round_timeout,
                            )
                            cpu1, pg1, me1 = tree_cpu(pid), postgres_cpu(stack.postmaster_pid), sum(os.times()[:2])
                            if profiling:
                                profiler.stop()
                            lat.sort()
                            r = RoundResult(
                                receiver=name, size=s, concurrency=conc, run=run, sent=sent, ok=ok,
                                errors=sent - ok + len([e for e in errs if not e.startswith("end of data")]),
                                wall=wall, throughput=ok / wall if wall > 0 else 0.0,
                                p50_ms=1000 * percentile(lat, 50), p99_ms=1000 * percentile(lat, 99),
                                mean_ms=1000 * statistics.fmean(lat) if lat else float("nan"), capped=capped,
                                cpu_receiver_s=cpu1 - cpu0, cpu_postgres_s=pg1 - pg0, cpu_client_s=me1 - me0,
                                load_before=l0, load_after=loadavg(), error_samples=errs,
                            )
                            rounds.append(r)
                            log(f"run {run + 1}/{runs} {s:>4} c{conc:<2} {name:>9}: {r.throughput:7.1f} msg/s  "
                                f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  ok {ok}/{counts[s]}  "
                                f"cpu {1000 * r.cpu_receiver_s / max(ok, 1):.1f}+pg "
                                f"{1000 * r.cpu_postgres_s / max(ok, 1):.1f} ms/msg  load {r.load_after:.2f}"
                                + (f"  errors {errs}" if errs else "") + ("  CAPPED" if capped else ""))
                            await task.deferLater(reactor, 0.2, lambda: None)

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(measure(reactor)))
        except SystemExit as e:
            exit_code = int(e.code or 0)
        sample = verify_sample(stack.dsn)
        if profiler is not None:
            profile_summary = summarize_profile(profiler.files)
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")

    rows = aggregate(rounds)
    verdicts = check_targets(rows)
    print(format_table(rows, runs))
    for v in verdicts:
        print(f"  target {v['target']}: ratio {v['ratio']:.2f} -> {'MET' if v['met'] else 'MISSED'}")
    print(f"  verification sample: {sample}")
    report = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]},
        "settings": {"runs": runs, "sizes": {s: mails[s].length for s in sizes}, "concurrency": concs,
                     "messages_per_round": {s: counts[s] for s in sizes}, "quick": args.quick,
                     "postgres": "embedded, defaults (fsync=on, synchronous_commit=on)",
                     "e2a_pool_size": 10, "reference_pool_size": 10,
                     "floor_diagnostic": args.floor, "e2a_processes": args.processes},
        "medians": rows,
        "targets": verdicts,
        "verification_sample": sample,
        "rounds": [asdict(r) for r in rounds],
        "client_cpu_ms_per_msg": {f"{r.receiver}/{r.size}/c{r.concurrency}/run{r.run}": round(1000 * r.cpu_client_s / max(r.ok, 1), 2)
                                  for r in rounds},
        "profile": profile_summary,
    }
    out = Path(args.output) if args.output else RESULTS / f"smtp_ingest-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"  JSON: {out}")
    if profile_summary:
        print(json.dumps(profile_summary, indent=2))
    complete = all(r.errors == 0 and not r.capped for r in rounds) and bool(rounds)
    return exit_code or (0 if complete else 1)


if __name__ == "__main__":
    sys.exit(main())
