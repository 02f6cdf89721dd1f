"""End-to-end benchmark: SMTP blast → e2a → signed webhook to a loopback sink, vs. a reference pipeline.

What it measures, and why this way: e2a's job is "mail in → verified, signed, stored → pushed
to the agent". Ingest alone (``bench/smtp_ingest.py``) says nothing about the second half, so
this bench follows every message to the receiver:

* **Webhook matrix** (2 KB mail, concurrency 1/8/32 SMTP sessions): e2a runs as a real
  ``twistd -n e2a`` with ``webhooks.allow_private: true`` and one cloud agent whose
  ``webhook_url`` is the sink (``bench/webhook_sink.py``, its own process: records a
  CLOCK_MONOTONIC arrival time per ``webhook-id``, verifies the Standard Webhooks signature on
  every 10th request, counts duplicates). Every round against e2a is paired with a round against
  ``bench/reference_pipeline.py`` (stock twisted.mail → one INSERT → 250 → treq POST with an
  HMAC header → UPDATE delivered; no verification, no queue) on the same PostgreSQL and the same
  sink, in alternating order; e2a is reported as ratios to it.

  - latency = sink receipt time − the client's time of the 250 (one machine, one clock);
  - delivered msg/s = messages delivered / (last receipt − first send);
  - exactly once = every accepted message id (e2a: the ``msg_…`` of ``250 … queued as``; the
    reference: the Message-ID) arrived exactly once as ``webhook-id``.

* **WebSocket fan-out**: 1,000 local-mode agents (created through the API), one Autobahn client
  per agent in a separate client process (``bench/ws_clients.py``); one message per agent, sent
  as 2 KB messages with ``smtp.max_recipients`` (50) RCPTs each over 4 parallel sessions; latency
  = notification frame arrival − the 250 of the message that carried that agent.

* **Soak** (``--soak N``, run on its own): N × 2 KB at concurrency 8 through e2a to the sink,
  sampling the twistd process's RSS every second; start / middle / end RSS and the exactly-once
  check over the whole run.

SPF/DKIM/DMARC are on: the same loopback DNS server and DKIM-signed mail as smtp_ingest.py
(shared helpers in ``bench/common.py``). Everything runs on 127.0.0.1; every loop is bounded by a
message count and by wall-clock caps.

Run from the repository root::

    .venv/bin/python bench/end_to_end.py --runs 3          # matrix ×3 + fan-out ×3, ~5 min
    .venv/bin/python bench/end_to_end.py --quick           # smoke run, well under a minute
    .venv/bin/python bench/end_to_end.py --soak 20000      # memory soak only, ~3-5 min
    .venv/bin/python bench/end_to_end.py --runs 1 --concurrency 8 --messages 1500 --no-fanout \\
        --profile bench/results/e2e-prof --profile-gil          # py-spy on e2a during its c8 rounds

Prints a table of medians and writes JSON to ``bench/results/end_to_end-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
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
    SENDER,
    SENDER_DOMAIN,
    SHARED_DOMAIN,
    E2AStack,
    Profiler,
    build_mail,
    cpu_list,
    dkim_key,
    loadavg,
    make_client_class,
    percentile,
    pg_stat_reset,
    pg_stat_top,
    postgres_cpu,
    proc_cpu,
    read_listening,
    round_order,
    rss_kib,
    summarize_profile,
    tree_cpu,
)

AGENT_SLUG = "bench"
RECIPIENT = f"{AGENT_SLUG}@{SHARED_DOMAIN}"
FULL = {"runs": 3, "concurrency": (1, 8, 32), "messages": 400, "agents": 1000}
QUICK = {"runs": 1, "concurrency": (1, 8), "messages": 30, "agents": 20}
WARMUP_MESSAGES = 24
MAX_RECIPIENTS = 50  # smtp.max_recipients default
FANOUT_SESSIONS = 4
DRAIN_TIMEOUT = 60.0  # seconds after the last 250 for the last webhook to arrive
TARGETS = {
    "throughput": "2 KB @ c8 delivered msg/s >= 1.0x reference",
    "exactly_once": "every accepted message delivered exactly once to a healthy sink",
    "per_agent_limit": "webhook requests in flight to the agent <= webhooks.max_concurrency_per_agent",
    "fanout_p99": "WebSocket notification to 1,000 agents p99 <= 1 s",
    "memory_flat": "twistd RSS flat over a 20,000-message run",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


# ============================================================== sink access


class SinkCollector:
    """Pulls arrivals from the sink (``POST /_take``) into one dict for the whole invocation."""

    def __init__(self, port: int, reactor: Any) -> None:
        import treq

        from twisted.web.client import HTTPConnectionPool

        self._treq = treq
        self._base = f"http://{LOOPBACK}:{port}"
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._reactor = reactor
        self.arrivals: dict[str, list[float]] = {}

    async def take(self) -> int:
        resp = await self._treq.post(self._base + "/_take", pool=self._pool, reactor=self._reactor, timeout=30)
        got = await resp.json()
        for wid, times in got.items():
            self.arrivals.setdefault(wid, []).extend(times)
        return len(got)

    async def stats(self) -> dict[str, Any]:
        resp = await self._treq.get(self._base + "/_stats", pool=self._pool, reactor=self._reactor, timeout=30)
        return await resp.json()

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


# ============================================================== SMTP sending


@dataclass
class Sent:
    keys: dict[str, float] = field(default_factory=dict)  # webhook-id → time of the 250
    rcpts: dict[str, float] = field(default_factory=dict)  # fan-out: agent → time of the 250
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    capped: bool = False
    first_send: float = 0.0
    last_250: float = 0.0


async def open_sessions(reactor: Any, client_cls: Any, port: int, n: int) -> list[Any]:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    sessions = []
    for _ in range(n):
        client = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=10), client_cls(reactor))
        if (await client.reply()).code != 220:
            raise RuntimeError("no 220 greeting")
        r = await client.command("EHLO bench-client.example.org")
        if r.code != 250:
            raise RuntimeError(f"EHLO {r}")
        sessions.append(client)
    return sessions


def close_sessions(sessions: list[Any]) -> None:
    for client in sessions:
        try:
            client.transport.write(b"QUIT\r\n")
            client.transport.loseConnection()
        except Exception:  # noqa: BLE001 - already gone
            pass


async def send_all(
    sessions: list[Any], mail: Any, jobs: list[tuple[str, list[str]]], out: Sent, by_message_id: bool,
    deadline: float, rate: float = 0.0, reactor: Any = None,
) -> None:
    """Send ``jobs`` = [(Message-ID, [RCPT…])] over ``sessions`` (each sequential, no pipelining).

    ``rate`` > 0 paces the sends (message i starts no earlier than i/rate s after the first).
    """
    from twisted.internet import defer, task

    it = iter(enumerate(jobs))

    async def session(client: Any) -> None:
        for i, (message_id, rcpts) in it:
            if time.monotonic() > deadline:
                out.capped = True
                return
            if rate > 0:
                wait = out.first_send + i / rate - time.monotonic()
                if wait > 0:
                    await task.deferLater(reactor, wait, lambda: None)
            r = await client.command(f"MAIL FROM:<{SENDER}>")
            if r.code != 250:
                out.errors.append(f"MAIL {r}")
                continue
            bad = False
            for rcpt in rcpts:
                r = await client.command(f"RCPT TO:<{rcpt}>")
                if r.code != 250:
                    out.errors.append(f"RCPT {r}")
                    bad = True
                    break
            if bad or (r := await client.command("DATA")).code != 354:
                if not bad:
                    out.errors.append(f"DATA {r}")
                await client.command("RSET")
                continue
            client.transport.write(mail.wire(message_id) + b".\r\n")
            out.sent += 1
            r = await client.reply()
            if r.code != 250:
                out.errors.append(f"end of data {r}")
                continue
            t = client.reply_at  # CLOCK_MONOTONIC, stamped when the reply line was parsed
            out.last_250 = max(out.last_250, t)
            key = message_id if by_message_id else r.text.rsplit(" ", 1)[-1]
            out.keys[key] = t
            for rcpt in rcpts:
                out.rcpts[rcpt] = t

    out.first_send = time.monotonic()
    results = await defer.DeferredList(
        [defer.Deferred.fromCoroutine(session(c)) for c in sessions], consumeErrors=True
    )
    for ok, value in results:
        if not ok:
            out.errors.append(f"session failed: {value.value!r}")


# ============================================================== webhook rounds


@dataclass
class RoundResult:
    receiver: str
    concurrency: int
    run: int
    sent: int
    accepted: int
    delivered: int
    duplicates: int
    missing: int
    wall: float
    throughput: float  # delivered / (last receipt - first send)
    accept_throughput: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    cpu_receiver_s: float
    cpu_postgres_s: float
    cpu_sink_s: float
    capped: bool
    load_before: float
    load_after: float
    error_samples: list[str]
    trace: list[list[float]] = field(default_factory=list)  # [250 ms after first send, latency ms] per message


async def webhook_round(
    reactor: Any, ctx: Any, receiver: str, port: int, pid: int, count: int, conc: int, id_prefix: str,
    round_timeout: float, run: int = 0, rss_samples: list[Any] | None = None, rate: float = 0.0,
) -> RoundResult:
    """``count`` messages over ``conc`` sessions; waits (bounded) until the sink has them all."""
    from twisted.internet import defer, task

    sink: SinkCollector = ctx.sink
    sessions = await open_sessions(reactor, ctx.client_cls, port, conc)
    jobs = [(f"{id_prefix}.{i}@{SENDER_DOMAIN}", [RECIPIENT]) for i in range(count)]
    out = Sent()
    cpu0, pg0, sk0, l0 = tree_cpu(pid), postgres_cpu(ctx.stack.postmaster_pid), proc_cpu(ctx.sink_pid), loadavg()
    done = {"sending": True}
    deadline = time.monotonic() + round_timeout

    async def collect() -> None:
        hard = deadline + DRAIN_TIMEOUT
        while time.monotonic() < hard:
            await sink.take()
            if rss_samples is not None:
                delivered = sum(1 for k in out.keys if k in sink.arrivals)
                rss_samples.append((round(time.monotonic() - out.first_send, 2), out.sent, delivered,
                                    rss_kib(pid)))
            if not done["sending"] and all(k in sink.arrivals for k in out.keys):
                return
            if not done["sending"]:
                hard = min(hard, out.last_250 + DRAIN_TIMEOUT)
            await task.deferLater(reactor, 1.0 if rss_samples is not None else 0.05, lambda: None)

    collector = defer.Deferred.fromCoroutine(collect())
    await send_all(sessions, ctx.mail, jobs, out, by_message_id=(receiver == "reference"), deadline=deadline,
                   rate=rate, reactor=reactor)
    send_wall = time.monotonic() - out.first_send
    done["sending"] = False
    await collector
    cpu1, pg1, sk1 = tree_cpu(pid), postgres_cpu(ctx.stack.postmaster_pid), proc_cpu(ctx.sink_pid)
    close_sessions(sessions)

    lat, last, trace = [], out.first_send, []
    delivered = dups = 0
    for key, t250 in out.keys.items():
        arr = sink.arrivals.get(key)
        if not arr:
            continue
        delivered += 1
        dups += len(arr) - 1
        lat.append(arr[0] - t250)
        last = max(last, arr[0])
        if rss_samples is None:
            trace.append([round(1000 * (t250 - out.first_send), 1), round(1000 * (arr[0] - t250), 1)])
    trace.sort()
    lat.sort()
    wall = last - out.first_send
    return RoundResult(
        receiver=receiver, concurrency=conc, run=run, sent=out.sent, accepted=len(out.keys), delivered=delivered,
        duplicates=dups, missing=len(out.keys) - delivered, wall=wall,
        throughput=delivered / wall if wall > 0 else 0.0,
        accept_throughput=len(out.keys) / send_wall if send_wall > 0 else 0.0,
        p50_ms=1000 * percentile(lat, 50), p99_ms=1000 * percentile(lat, 99),
        mean_ms=1000 * statistics.fmean(lat) if lat else float("nan"),
        max_ms=1000 * lat[-1] if lat else float("nan"),
        cpu_receiver_s=cpu1 - cpu0, cpu_postgres_s=pg1 - pg0, cpu_sink_s=sk1 - sk0, capped=out.capped,
        load_before=l0, load_after=loadavg(), error_samples=out.errors[:5], trace=trace,
    )


# ============================================================== fan-out


async def create_agents(reactor: Any, ctx: Any, n: int, mode: str = "local") -> list[str]:
    """``n`` agents ``fanNNNN@<shared domain>`` through ``POST /api/v1/agents`` (8 in parallel)."""
    import treq

    from twisted.internet import defer

    url = f"http://{LOOPBACK}:{ctx.stack.e2a_http}/api/v1/agents"
    headers = {"Authorization": [f"Bearer {ctx.stack.api_key}"], "Content-Type": ["application/json"]}
    sem = defer.DeferredSemaphore(8)
    emails: list[str] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        body = json.dumps({"slug": f"fan{i:04d}", "agent_mode": mode}).encode()
        resp = await treq.post(url, data=body, headers=headers, reactor=reactor, timeout=30)
        data = await resp.json()
        if resp.code != 201:
            errors.append(f"{resp.code} {data}")
            return
        emails.append(data["id"])

    await defer.DeferredList([sem.run(lambda i=i: defer.Deferred.fromCoroutine(one(i))) for i in range(n)],
                             consumeErrors=True)
    if errors:
        raise RuntimeError(f"{len(errors)} agent creations failed, e.g. {errors[:2]}")
    return sorted(emails)


class WsClients:
    """The ``bench/ws_clients.py`` child: line protocol over its stdin/stdout."""

    def __init__(self, ctx: Any, agents: list[str]) -> None:
        spec = ctx.stack.tmp / "ws_spec.json"
        spec.write_text(json.dumps({"port": ctx.stack.e2a_http, "key": ctx.stack.api_key, "agents": agents,
                                    "parallel": 16}))
        self.proc = ctx.stack.spawn([sys.executable, str(REPO / "bench" / "ws_clients.py"), str(spec)],
                                    "ws_clients.log", stdin_pipe=True)

    async def readline(self, timeout: float, reactor: Any) -> str:
        from twisted.internet import threads

        line = await threads.deferToThread(self.proc.stdout.readline).addTimeout(timeout, reactor)
        if not line:
            raise RuntimeError(f"ws clients exited ({self.proc.poll()})")
        return line.decode()

    async def ready(self, reactor: Any, timeout: float) -> tuple[int, int, float]:
        words = (await self.readline(timeout, reactor)).split()
        assert words[0] == "READY", words
        return int(words[1]), int(words[2]), float(words[3])

    async def wait(self, reactor: Any, n: int, timeout: float) -> dict[str, Any]:
        self.proc.stdin.write(f"WAIT {n} {timeout}\n".encode())
        self.proc.stdin.flush()
        return json.loads(await self.readline(timeout + 30, reactor))

    def quit(self) -> None:
        try:
            self.proc.stdin.write(b"QUIT\n")
            self.proc.stdin.flush()
        except OSError:
            pass


async def fanout_round(reactor: Any, ctx: Any, ws: WsClients, agents: list[str], run: int,
                       id_prefix: str) -> dict[str, Any]:
    sessions = await open_sessions(reactor, ctx.client_cls, ctx.stack.e2a_smtp, FANOUT_SESSIONS)
    batches = [agents[i:i + MAX_RECIPIENTS] for i in range(0, len(agents), MAX_RECIPIENTS)]
    jobs = [(f"{id_prefix}.fan{run}.{j}@{SENDER_DOMAIN}", b) for j, b in enumerate(batches)]
    out = Sent()
    cpu0 = tree_cpu(ctx.stack.e2a.pid)
    await send_all(sessions, ctx.mail, jobs, out, by_message_id=False, deadline=time.monotonic() + 120)
    close_sessions(sessions)
    got = await ws.wait(reactor, len(out.rcpts), 60.0)
    cpu1 = tree_cpu(ctx.stack.e2a.pid)
    first: dict[str, float] = {}
    dup = 0
    for agent, _mid, t in got["frames"]:
        if agent in first:
            dup += 1
        else:
            first[agent] = t
    lat = sorted(first[a] - t250 for a, t250 in out.rcpts.items() if a in first)
    last = max(first.values()) if first else out.first_send
    res = {
        "run": run, "agents": len(agents), "messages": len(jobs), "rcpts_accepted": len(out.rcpts),
        "notified": len(lat), "duplicate_frames": dup, "timed_out": got["timed_out"], "open": got["open"],
        "p50_ms": 1000 * percentile(lat, 50), "p99_ms": 1000 * percentile(lat, 99),
        "max_ms": 1000 * lat[-1] if lat else float("nan"),
        "send_wall_s": out.last_250 - out.first_send, "first_send_to_last_frame_s": last - out.first_send,
        "cpu_e2a_s": cpu1 - cpu0, "errors": out.errors[:5], "load": loadavg(),
    }
    log(f"fan-out run {run + 1}: {res['notified']}/{len(agents)} notified  p50 {res['p50_ms']:.0f} ms  "
        f"p99 {res['p99_ms']:.0f} ms  max {res['max_ms']:.0f} ms  (send {res['send_wall_s']:.2f} s, last frame "
        f"{res['first_send_to_last_frame_s']:.2f} s after first send)  load {res['load']:.2f}"
        + (f"  errors {out.errors[:3]}" if out.errors else ""))
    return res


# ============================================================== reports


def aggregate(rounds: list[RoundResult]) -> list[dict[str, Any]]:
    cells: dict[int, dict[str, list[RoundResult]]] = {}
    for r in rounds:
        cells.setdefault(r.concurrency, {}).setdefault(r.receiver, []).append(r)
    rows = []
    for conc, by in sorted(cells.items()):
        row: dict[str, Any] = {"size": "2k", "concurrency": conc}
        for name in ("e2a", "reference"):
            rs = by.get(name, [])
            ok = [r for r in rs if r.delivered]
            row[name] = {
                "runs": len(rs),
                "throughput": median([r.throughput for r in rs]),
                "accept_throughput": median([r.accept_throughput for r in rs]),
                "p50_ms": median([r.p50_ms for r in rs]),
                "p99_ms": median([r.p99_ms for r in rs]),
                "cpu_ms_per_msg_receiver": median([1000 * r.cpu_receiver_s / r.delivered for r in ok]),
                "cpu_ms_per_msg_postgres": median([1000 * r.cpu_postgres_s / r.delivered for r in ok]),
                "cpu_ms_per_msg_sink": median([1000 * r.cpu_sink_s / r.delivered for r in ok]),
                "accepted": sum(r.accepted for r in rs),
                "delivered": sum(r.delivered for r in rs),
                "duplicates": sum(r.duplicates for r in rs),
                "errors": sum(len(r.error_samples) for r in rs),
                "capped": any(r.capped for r in rs),
            }
        e, f = row["e2a"], row["reference"]

        def ratio(a: float, b: float) -> float:
            return a / b if b and b == b and a == a else float("nan")

        row["ratio_throughput"] = ratio(e["throughput"], f["throughput"])
        row["ratio_p50"] = ratio(e["p50_ms"], f["p50_ms"])
        row["ratio_p99"] = ratio(e["p99_ms"], f["p99_ms"])
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], runs: int) -> str:
    head = (f"{'conc':>4} | {'e2a dlv/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'ref dlv/s':>9} {'p50 ms':>7} "
            f"{'p99 ms':>7} | {'x dlv/s':>7} {'x p50':>6} {'x p99':>6} | {'e2a cpu':>7} {'ref cpu':>7} "
            f"{'pg e2a|ref':>11} {'sink e2a|ref':>12}")
    lines = [f"2 KB, medians of {runs} run(s); latency = 250 -> webhook receipt; ratios = e2a / reference; "
             "cpu = ms per delivered message", head, "-" * len(head)]
    for r in rows:
        e, f = r["e2a"], r["reference"]
        lines.append(
            f"{r['concurrency']:>4} | {e['throughput']:9.1f} {e['p50_ms']:7.1f} {e['p99_ms']:7.1f} | "
            f"{f['throughput']:9.1f} {f['p50_ms']:7.1f} {f['p99_ms']:7.1f} | {r['ratio_throughput']:7.2f} "
            f"{r['ratio_p50']:6.2f} {r['ratio_p99']:6.2f} | {e['cpu_ms_per_msg_receiver']:7.2f} "
            f"{f['cpu_ms_per_msg_receiver']:7.2f} {e['cpu_ms_per_msg_postgres']:5.2f}|{f['cpu_ms_per_msg_postgres']:<5.2f} "
            f"{e['cpu_ms_per_msg_sink']:6.2f}|{f['cpu_ms_per_msg_sink']:<5.2f}"
            + (" (capped)" if e["capped"] or f["capped"] else "")
        )
    return "\n".join(lines)


def add_leased_index(dsn: str, log: Any) -> None:
    """Diagnostics (--leased-index): the partial index the claim's in-flight count could use.

    Not part of e2a's schema; this measures what a migration adding it would change (the
    claim counts each agent's leased pending rows, and without it that count reads every
    pending row, i.e. the whole backlog, on every claim).
    """
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE INDEX IF NOT EXISTS bench_deliveries_leased_idx ON deliveries (agent_id)"
                    " WHERE status = 'pending' AND leased_until IS NOT NULL")
    conn.close()
    log("bench-only index bench_deliveries_leased_idx created (--leased-index)")


def db_checks(dsn: str) -> dict[str, Any]:
    """What the database says: delivery states, auth verdicts, reference rows delivered."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, count(*), max(attempts) FROM deliveries GROUP BY 1 ORDER BY 1")
            deliveries = [list(r) for r in cur.fetchall()]
            cur.execute(
                "SELECT auth_headers->>'X-E2A-Auth-Domain-Check', auth_headers->>'X-E2A-Auth-Verified', count(*)"
                " FROM messages WHERE direction = 'inbound' GROUP BY 1, 2"
            )
            verdicts = [list(r) for r in cur.fetchall()]
            cur.execute("SELECT to_regclass('bench_pipeline_messages') IS NOT NULL")
            ref = None
            if cur.fetchone()[0]:
                cur.execute("SELECT count(*), count(delivered_at) FROM bench_pipeline_messages")
                ref = list(cur.fetchone())
    finally:
        conn.close()
    return {"e2a_deliveries_by_status": deliveries, "e2a_inbound_verdicts": verdicts,
            "reference_rows_total_delivered": ref}


# ============================================================== driver


@dataclass
class Ctx:
    stack: E2AStack
    mail: Any
    client_cls: Any
    sink: Any = None
    sink_pid: int = 0
    ref_pid: int = 0
    ref_smtp: int = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="End-to-end benchmark: SMTP → webhook / WebSocket (loopback only)")
    parser.add_argument("--runs", type=int, default=None, help="repeat the matrix and the fan-out N times (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--concurrency", default=None, help="comma list of SMTP sessions (default 1,8,32)")
    parser.add_argument("--messages", type=int, default=None, help="messages per matrix round (default 400)")
    parser.add_argument("--agents", type=int, default=None, help="local agents / WebSocket clients (default 1000)")
    parser.add_argument("--no-fanout", action="store_true", help="skip the WebSocket fan-out")
    parser.add_argument("--no-matrix", action="store_true", help="skip the webhook matrix")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="memory soak only: N x 2 KB through e2a at concurrency 8 (max 50000)")
    parser.add_argument("--soak-minutes", type=float, default=20.0, help="wall-clock cap of the soak sending")
    parser.add_argument("--soak-rate", type=float, default=100.0,
                        help="soak offered load, messages/s (0 = as fast as 8 sessions go); default 100")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="wall-clock cap of one round's sending")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock cap for the matrix")
    parser.add_argument("--profile", metavar="DIR", default=None, help="py-spy e2a during its c8 (or lowest) rounds")
    parser.add_argument("--profile-gil", action="store_true", help="with --profile: GIL holder only")
    parser.add_argument("--floor", action="store_true",
                        help="DIAGNOSTIC: e2a remembers the first verdict per sender and skips SPF/DKIM/DMARC"
                        " afterwards (bench/floor_twistd.py): the pipeline's cost without verification")
    parser.add_argument("--processes", type=int, default=1,
                        help="e2a's `processes` setting (CPU figures then cover the parent and its children)")
    parser.add_argument("--pin", type=cpu_list, default=None, metavar="CPU[,CPU…]",
                        help="e2a's cpu_affinity setting: each e2a process kept on one of these CPUs")
    parser.add_argument("--pg-stat", action="store_true",
                        help="DIAGNOSTIC: PostgreSQL with pg_stat_statements; prints the statements with the most"
                        " time per delivered message (both receivers, counted after warm-up)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/end_to_end-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    parser.add_argument("--leased-index", action="store_true",
                        help="diagnostics: add a partial index on leased pending deliveries before measuring")
    parser.add_argument("--per-agent", type=int, default=4,
                        help="webhooks.max_concurrency_per_agent for e2a (default 4 = e2a's default; diagnostics)")
    parser.add_argument("--sink-hold-ms", type=float, default=0.0,
                        help="the sink answers each webhook this many ms after it arrived, so e2a's requests"
                        " overlap and the per-agent limit is checked across all processes (throughput then"
                        " reflects the hold, not e2a)")
    args = parser.parse_args(argv)

    preset = QUICK if args.quick else FULL
    runs = args.runs or preset["runs"]
    concs = [int(c) for c in args.concurrency.split(",")] if args.concurrency else list(preset["concurrency"])
    count = args.messages or preset["messages"]
    n_agents = args.agents if args.agents is not None else preset["agents"]
    if not (1 <= runs <= 10 and all(1 <= c <= 64 for c in concs) and 1 <= count <= 5000
            and 0 <= n_agents <= 2000 and 0 <= args.soak <= 50000):
        parser.error("runs 1..10, concurrency 1..64, messages 1..5000, agents 0..2000, soak 0..50000")
    soak_only = args.soak > 0
    do_matrix = not soak_only and not args.no_matrix
    do_fanout = not soak_only and not args.no_fanout and n_agents > 0

    tmp = Path(tempfile.mkdtemp(prefix="e2a-e2e-"))
    pem, txt = dkim_key()
    mail = build_mail("2k", 2 * 1024, pem)
    log(f"2k: {mail.length} bytes on the wire per message (DKIM-signed once, Message-ID varies)")
    stack = E2AStack(tmp, floor=args.floor, processes=args.processes)
    ctx = Ctx(stack=stack, mail=mail, client_cls=make_client_class())
    rounds: list[RoundResult] = []
    fanouts: list[dict[str, Any]] = []
    soak: dict[str, Any] | None = None
    profile_summary = None
    setup: dict[str, Any] = {}
    started_at = datetime.now(UTC)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    exit_code = 0
    checks: dict[str, Any] = {}
    sink_stats: dict[str, Any] = {}
    try:
        stack.start_postgres(log, PG_STAT_OPTIONS if args.pg_stat else ())
        stack.start_dns(txt, log)
        # The sink needs the signing secret, which exists only after bootstrap: start e2a first.
        stack.start_e2a({
            # max_concurrency_per_agent: the e2a default (4) unless --per-agent (diagnostics).
            "webhooks": {"allow_private": True, "max_concurrency_per_agent": args.per_agent},
            # 1,000 agents from one IP through the API (default 20/h per IP).
            "rate_limits": {"register_per_hour": 100000},
            # Their WebSockets all come from 127.0.0.1 too (default 64 connections per IP).
            "http": {"max_connections_per_ip": n_agents + 64, "max_connections": max(1000, n_agents + 64)},
            **({"cpu_affinity": args.pin} if args.pin is not None else {}),
        }, log)
        if args.leased_index:
            add_leased_index(stack.dsn, log)
        env = {"BENCH_WEBHOOK_SECRET": stack.signing_secret}
        sink = stack.spawn([sys.executable, str(REPO / "bench" / "webhook_sink.py"), "--port", "0",
                            "--hold-ms", str(args.sink_hold_ms)], "sink.log", env)
        sink_port = read_listening(sink, "webhook sink")
        ctx.sink_pid = sink.pid
        agent = stack.api("/api/v1/agents", {"slug": AGENT_SLUG, "name": "Bench", "agent_mode": "cloud",
                                             "webhook_url": f"http://{LOOPBACK}:{sink_port}/e2a"})
        log(f"cloud agent {agent.get('id')} → sink :{sink_port}")
        if do_matrix:
            ref = stack.spawn([sys.executable, str(REPO / "bench" / "reference_pipeline.py"), "--dsn", stack.dsn,
                               "--port", "0", "--webhook-url", f"http://{LOOPBACK}:{sink_port}/ref"], "ref.log", env)
            ctx.ref_smtp = read_listening(ref, "reference pipeline")
            ctx.ref_pid = ref.pid
        log(f"e2a pid {stack.e2a.pid} smtp {stack.e2a_smtp} http {stack.e2a_http}; sink pid {sink.pid}; "
            f"reference pid {ctx.ref_pid or '-'}; load {loadavg():.2f}")
        profiler = Profiler(Path(args.profile), stack.e2a.pid, args.profile_gil) if args.profile else None
        profile_conc = max([c for c in concs if c <= 8] or concs)
        id_base = uuid.uuid4().hex[:10]

        from twisted.internet import defer, task

        async def measure(reactor: Any) -> None:
            nonlocal soak
            ctx.sink = SinkCollector(sink_port, reactor)
            receivers = {"e2a": (stack.e2a_smtp, stack.e2a.pid)}
            if do_matrix:
                receivers["reference"] = (ctx.ref_smtp, ctx.ref_pid)
            for name, (port, pid) in receivers.items():
                r = await webhook_round(reactor, ctx, name, port, pid, WARMUP_MESSAGES, 4,
                                        f"warm.{id_base}.{name}", args.round_timeout)
                log(f"warm-up {name}: {r.delivered}/{r.accepted} delivered, p50 {r.p50_ms:.1f} ms")
            if args.pg_stat:
                pg_stat_reset(stack.dsn)

            if soak_only:
                soak = await run_soak(reactor, ctx, args.soak, id_base, 60 * args.soak_minutes, args.soak_rate)
                return

            if do_matrix:
                global_deadline = time.monotonic() + 60 * args.max_minutes
                for run in range(runs):
                    for cell, conc in enumerate(concs):
                        order = round_order(["e2a", "reference"], run, cell)
                        for name in order:
                            if time.monotonic() > global_deadline:
                                log("--max-minutes reached: stopping the matrix early")
                                break
                            port, pid = receivers[name]
                            profiling = profiler is not None and name == "e2a" and conc == profile_conc
                            if profiling:
                                profiler.start(f"e2e-c{conc}-run{run}", int(args.round_timeout) + 60)
                            r = await webhook_round(reactor, ctx, name, port, pid, count, conc,
                                                    f"{id_base}.{name}.c{conc}.r{run}", args.round_timeout, run)
                            if profiling:
                                profiler.stop()
                            rounds.append(r)
                            log(f"run {run + 1}/{runs} c{conc:<2} {name:>9}: {r.throughput:7.1f} dlv/s "
                                f"(accept {r.accept_throughput:6.1f}/s)  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms"
                                f"  dlv {r.delivered}/{r.accepted} dup {r.duplicates}  cpu "
                                f"{1000 * r.cpu_receiver_s / max(r.delivered, 1):.2f}+pg "
                                f"{1000 * r.cpu_postgres_s / max(r.delivered, 1):.2f} ms/msg  load {r.load_after:.2f}"
                                + (f"  errors {r.error_samples}" if r.error_samples else "")
                                + ("  CAPPED" if r.capped else ""))
                            await task.deferLater(reactor, 0.3, lambda: None)

            if do_fanout:
                t0 = time.monotonic()
                agents = await create_agents(reactor, ctx, n_agents)
                setup["create_agents_s"] = round(time.monotonic() - t0, 2)
                log(f"created {len(agents)} local agents in {setup['create_agents_s']} s; opening WebSockets …")
                ws = WsClients(ctx, agents)
                try:
                    rss0 = rss_kib(stack.e2a.pid)
                    opened, failed, secs = await ws.ready(reactor, 300)
                    setup.update(ws_open=opened, ws_failed=failed, ws_connect_s=secs,
                                 e2a_rss_kib_before_ws=rss0, e2a_rss_kib_with_ws=rss_kib(stack.e2a.pid))
                    log(f"{opened} WebSockets open ({failed} failed) in {secs:.1f} s; e2a RSS "
                        f"{rss0 // 1024} → {rss_kib(stack.e2a.pid) // 1024} MiB")
                    await task.deferLater(reactor, 2.0, lambda: None)  # drains settle
                    for run in range(runs):
                        fanouts.append(await fanout_round(reactor, ctx, ws, agents, run, id_base))
                        await task.deferLater(reactor, 1.0, lambda: None)
                finally:
                    ws.quit()

        async def guarded(reactor: Any) -> None:
            nonlocal sink_stats
            try:
                await measure(reactor)
                await task.deferLater(reactor, 1.0, lambda: None)  # late duplicates, if any
                await ctx.sink.take()
                sink_stats = await ctx.sink.stats()
            finally:
                if ctx.sink is not None:
                    await ctx.sink.close()

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(guarded(reactor)))
        except SystemExit as e:
            exit_code = int(e.code or 0)
        checks = db_checks(stack.dsn)
        if args.pg_stat:
            # Per message of ONE receiver (both deliver the same count per round); use --no-fanout.
            delivered = sum(r.delivered for r in rounds if r.receiver == "e2a")
            checks["pg_stat_top"] = pg_stat_top(stack.dsn, delivered or 1)
            for row in checks["pg_stat_top"]:
                log(f"pg_stat {row['exec_ms_per_msg'] + row['plan_ms_per_msg']:.3f} ms/msg "
                    f"(exec {row['exec_ms_per_msg']:.3f}, plan {row['plan_ms_per_msg']:.3f}) "
                    f"wal {row['wal_bytes_per_msg']} B/msg, {row['calls']} calls: {row['query']}")
        if profiler is not None:
            profile_summary = summarize_profile(profiler.files)
    finally:
        stack.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = aggregate(rounds)
    # Exactly once over every measured round (the sink's duplicate counter also covers warm-up).
    e2a_acc = sum(r.accepted for r in rounds if r.receiver == "e2a")
    e2a_dlv = sum(r.delivered for r in rounds if r.receiver == "e2a")
    e2a_dup = sum(r.duplicates for r in rounds if r.receiver == "e2a")
    exactly_once = {
        "e2a_accepted": e2a_acc, "e2a_delivered": e2a_dlv,
        "e2a_duplicates": e2a_dup, "e2a_missing": e2a_acc - e2a_dlv,
        "sink_stats": sink_stats, "db": checks,
    }
    if soak:
        exactly_once.update(soak_accepted=soak["accepted"], soak_delivered=soak["delivered"],
                            soak_duplicates=soak["duplicates"], soak_missing=soak["missing"])
    verdicts = []
    c8 = next((r for r in rows if r["concurrency"] == 8), None)
    if c8 is not None:
        verdicts.append({"target": TARGETS["throughput"], "value": round(c8["ratio_throughput"], 3),
                         "met": bool(c8["ratio_throughput"] >= 1.0)})
    if rounds or soak:
        eo = (e2a_dup == 0 and e2a_acc == e2a_dlv and sink_stats.get("duplicates", 0) == 0
              and (not soak or (soak["duplicates"] == 0 and soak["missing"] == 0)))
        s_dlv, s_acc, s_dup = (soak["delivered"], soak["accepted"], soak["duplicates"]) if soak else (0, 0, 0)
        verdicts.append({"target": TARGETS["exactly_once"],
                         "value": f"{e2a_dlv + s_dlv}/{e2a_acc + s_acc} delivered, dup {e2a_dup + s_dup}",
                         "met": bool(eo)})
    peak = (sink_stats.get("peak_in_flight") or {}).get("/e2a")
    if args.sink_hold_ms > 0 and peak is not None:
        verdicts.append({"target": TARGETS["per_agent_limit"],
                         "value": f"peak {peak} (limit {args.per_agent}, sink hold {args.sink_hold_ms:g} ms)",
                         "met": bool(peak <= args.per_agent)})
    fan_summary = None
    if fanouts:
        fan_summary = {
            "runs": len(fanouts), "agents": fanouts[0]["agents"],
            "p50_ms": median([f["p50_ms"] for f in fanouts]), "p99_ms": median([f["p99_ms"] for f in fanouts]),
            "max_ms": median([f["max_ms"] for f in fanouts]),
            "notified_all": all(f["notified"] == f["agents"] for f in fanouts),
            "duplicate_frames": sum(f["duplicate_frames"] for f in fanouts),
        }
        verdicts.append({"target": TARGETS["fanout_p99"], "value": round(fan_summary["p99_ms"], 1),
                         "met": bool(fan_summary["p99_ms"] <= 1000 and fan_summary["notified_all"])})
    if soak:
        verdicts.append({"target": TARGETS["memory_flat"], "value": soak["rss_mib"], "met": bool(soak["flat"])})

    if rows:
        print(format_table(rows, runs))
    if fan_summary:
        print(f"  WebSocket fan-out to {fan_summary['agents']} agents (medians of {fan_summary['runs']}): "
              f"p50 {fan_summary['p50_ms']:.0f} ms  p99 {fan_summary['p99_ms']:.0f} ms  max {fan_summary['max_ms']:.0f} ms"
              f"  all notified: {fan_summary['notified_all']}")
    if soak:
        print(f"  soak: {soak['delivered']}/{soak['accepted']} delivered, dup {soak['duplicates']}, "
              f"{soak['throughput']:.1f} dlv/s; RSS MiB {soak['rss_mib']}; flat: {soak['flat']}")
    for v in verdicts:
        print(f"  target {v['target']}: {v['value']} -> {'MET' if v['met'] else 'MISSED'}")
    print(f"  exactly once: {json.dumps({k: v for k, v in exactly_once.items() if k != 'db'})}")
    print(f"  db: {json.dumps(checks)}")
    report = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]},
        "settings": {"runs": runs, "size_bytes": mail.length, "concurrency": concs, "messages_per_round": count,
                     "agents": n_agents, "soak": args.soak, "quick": args.quick,
                     "postgres": "embedded, defaults (fsync=on, synchronous_commit=on)",
                     "e2a_overrides": {"webhooks.allow_private": True, "rate_limits.register_per_hour": 100000,
                                       "http.max_connections_per_ip": n_agents + 64,
                                       "http.max_connections": max(1000, n_agents + 64),
                                       "smtp.max_connections_per_ip": 200,
                                       "smtp.max_messages_per_session": 100000},
                     "webhooks.max_concurrency_per_agent": args.per_agent, "sink_hold_ms": args.sink_hold_ms,
                     "cpu_affinity": args.pin,
                     "floor_diagnostic": args.floor, "e2a_processes": args.processes,
                     "bench_leased_index": args.leased_index, "pg_stat": args.pg_stat},
        "setup": setup,
        "medians": rows,
        "fanout": {"summary": fan_summary, "runs": fanouts},
        "soak": soak,
        "exactly_once": exactly_once,
        "targets": verdicts,
        "rounds": [asdict(r) for r in rounds],
        "profile": profile_summary,
    }
    kind = "end_to_end-soak" if soak_only else "end_to_end"
    out = Path(args.output) if args.output else RESULTS / f"{kind}-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"  JSON: {out}")
    if profile_summary:
        print(json.dumps(profile_summary, indent=2))
    complete = all(v["met"] or v["target"] in (TARGETS["throughput"],) for v in verdicts)
    ok = complete and all(not r.capped and not r.error_samples for r in rounds)
    return exit_code or (0 if ok else 1)


# ============================================================== soak


async def run_soak(reactor: Any, ctx: Any, n: int, id_base: str, cap_s: float, rate: float) -> dict[str, Any]:
    pid = ctx.stack.e2a.pid
    samples: list[Any] = []
    rss_start = rss_kib(pid)
    log(f"soak: {n} x 2 KB at c8, offered {rate or 'max'} msg/s; e2a RSS at start {rss_start / 1024:.1f} MiB")
    r = await webhook_round(reactor, ctx, "e2a", ctx.stack.e2a_smtp, pid, n, 8, f"{id_base}.soak", cap_s,
                            rss_samples=samples, rate=rate)
    from twisted.internet import task

    await task.deferLater(reactor, 5.0, lambda: None)  # let the process settle (GC, pools idle)
    rss_settled = rss_kib(pid)

    def at_fraction(frac: float) -> int:
        target = frac * r.accepted
        for _t, sent, _dlv, rss in samples:
            if sent >= target:
                return rss
        return samples[-1][3] if samples else 0

    quarter, middle, three_q = at_fraction(0.25), at_fraction(0.5), at_fraction(0.75)
    end = samples[-1][3] if samples else 0
    peak = max((s[3] for s in samples), default=0)
    # Flat = the second half of the run grew RSS by < 5 % (allocator warm-up happens early).
    flat = bool(middle and end <= middle * 1.05)
    res = {
        "messages": n, "offered_rate": rate, "accepted": r.accepted, "delivered": r.delivered, "duplicates": r.duplicates,
        "missing": r.missing, "throughput": r.throughput, "accept_throughput": r.accept_throughput,
        "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms, "wall_s": r.wall, "capped": r.capped,
        "cpu_e2a_ms_per_msg": 1000 * r.cpu_receiver_s / max(r.delivered, 1),
        "rss_mib": {"start": round(rss_start / 1024, 1), "25%": round(quarter / 1024, 1),
                    "middle": round(middle / 1024, 1), "75%": round(three_q / 1024, 1),
                    "end": round(end / 1024, 1), "settled": round(rss_settled / 1024, 1),
                    "peak": round(peak / 1024, 1)},
        "growth_second_half_pct": round(100 * (end - middle) / middle, 2) if middle else None,
        "flat": flat, "errors": r.error_samples, "load_end": loadavg(),
        "samples": samples,  # (s since first send, sent, delivered, rss KiB)
    }
    log(f"soak done: {r.delivered}/{r.accepted} delivered, dup {r.duplicates}, {r.throughput:.1f} dlv/s, "
        f"RSS MiB {res['rss_mib']}")
    return res


if __name__ == "__main__":
    sys.exit(main())
