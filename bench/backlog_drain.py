"""What one webhook delivery costs while an agent's backlog drains, by the backlog's size.

Why: after an agent's webhook was down, its mail waits as pending jobs, and every delivery of
the drain finishes one job and leases the next in one statement (the worker's hand-on). If
that statement read the agent's whole backlog, the drain would slow down the longer the
outage was, just when the mail is most late. This runs e2a's own store functions against the
embedded PostgreSQL: for each backlog size, a fresh database with one cloud agent and that
many due jobs (with statistics, as after autovacuum's ANALYZE), eight jobs claimed in two claims
(the second timed: a worker's claim when it wakes), then a run of hand-ons, each timed; PostgreSQL's
CPU is taken from its processes over the hand-ons. Flat figures across the sizes are the goal.

``--new-installation``: the backlog arrives after the pool's connections have planned their
statements on a nearly empty database, and before any ANALYZE (autovacuum kept off those
tables), as on a new installation whose agent's webhook goes down in its first minutes: each
connection keeps those plans until the next ANALYZE.

    python bench/backlog_drain.py                   # backlogs 1,000 / 10,000 / 50,000, medians of 3
    python bench/backlog_drain.py --quick
    python bench/backlog_drain.py --new-installation
    python bench/backlog_drain.py --e2a-tree DIR    # the same store code and schema from another copy
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))

WEBHOOK = "https://hook.bench.test/in"
AGENT = "bench@agents.bench.test"
# Job g is due DUE_SPAN_SECONDS - g/1000 seconds ago: every job due, in the order of its id.
DUE_SPAN_SECONDS = 100_000


def _setup(dsn: str, backlog: int, *, analyze: bool = True, agent: bool = True) -> None:
    """One user, domain and cloud agent (unless ``agent`` is False: already there),
    ``backlog`` inbound messages each with a due job, then (``analyze``) statistics.

    Written straight in SQL, as the store's tests build their rows: 50,000 jobs through SMTP
    would take minutes and measure the accept, not the drain.
    """
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            if agent:
                _insert_agent(cur)
            _insert_backlog(cur, backlog)
    finally:
        conn.close()
    if analyze:
        _autocommit(dsn, "VACUUM ANALYZE messages", "VACUUM ANALYZE deliveries")


def _insert_agent(cur: Any) -> None:
    cur.execute("INSERT INTO users (id, email, name) VALUES ('usr_bench', 'bench@example.com', 'bench')")
    cur.execute("INSERT INTO domains (domain, user_id, verified) VALUES ('agents.bench.test', 'usr_bench', true)")
    cur.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
        " VALUES (%s, 'usr_bench', 'agents.bench.test', 'cloud', %s, 'active')",
        (AGENT, WEBHOOK),
    )


def _insert_backlog(cur: Any, backlog: int) -> None:
    """``backlog`` jobs, due in the order of their ids and after every job already there."""
    cur.execute("SELECT count(*) FROM deliveries")
    (first,) = cur.fetchone()
    cur.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status)"
        " SELECT 'msg_' || g, %s, 'usr_bench', 'inbound', 'unread' FROM generate_series(%s, %s) g",
        (AGENT, first + 1, first + backlog),
    )
    cur.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at, created_at)"
        " SELECT 'dlv_' || lpad(g::text, 8, '0'), 'msg_' || g, %s, %s, 'pending',"
        " now() - make_interval(secs => %s - g / 1000.0), now() FROM generate_series(%s, %s) g",
        (AGENT, WEBHOOK, DUE_SPAN_SECONDS, first + 1, first + backlog),
    )


def _autocommit(dsn: str, *statements: str) -> None:
    """Statements that cannot run in a transaction block."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


async def _drain(
    reactor: Any, dsn: str, deliveries_count: int, pg_cpu: Any, backlog_arrives: Any = None
) -> dict[str, float]:
    """Time the claims and hand-ons; with ``backlog_arrives``, first plan every statement on
    each pooled connection with the jobs already there, then call it (it adds the backlog)."""
    from twisted.internet import defer

    from e2a.store import deliveries
    from e2a.store.database import Database

    db = Database(dsn, 4, reactor)
    await db.start()
    try:
        if backlog_arrives is not None:
            # Four claims at once take every connection: each plans the claim, and each
            # claimed job's hand-on plans the hand-on on a connection of the pool.
            now = datetime.now(UTC)
            batches = await defer.gatherResults([
                defer.Deferred.fromCoroutine(deliveries.claim_due(db, now, 1, 600.0, 8)) for _ in range(4)
            ])
            handed_on = await defer.gatherResults([
                defer.Deferred.fromCoroutine(deliveries.record_delivered_and_claim_next(
                    db, job, 200, WEBHOOK, now, 600.0, 8)) for batch in batches for job in batch
            ])
            for _delivered, following in handed_on:  # their slots free again for the claims below
                if following is not None:
                    await deliveries.record_delivered(db, following, 200, WEBHOOK, now)
            backlog_arrives()
        now = datetime.now(UTC)
        # two claims of four: the first prepares the statement on its connection, the second
        # is timed (a worker's claim while the agent has free slots)
        jobs = await deliveries.claim_due(db, now, 4, 600.0, 8)
        start = time.perf_counter()
        jobs += await deliveries.claim_due(db, now, 4, 600.0, 8)
        claim = time.perf_counter() - start
        if len(jobs) != 8:
            raise RuntimeError(f"the claims leased {len(jobs)} jobs, not 8")
        times: list[float] = []
        cpu0 = pg_cpu()
        for _ in range(deliveries_count):
            job = jobs.pop(0)
            start = time.perf_counter()
            delivered, following = await deliveries.record_delivered_and_claim_next(
                db, job, 200, WEBHOOK, now, 600.0, 8
            )
            times.append(time.perf_counter() - start)
            if not delivered or following is None:
                raise RuntimeError("the hand-on did not deliver and lease the next job")
            jobs.append(following)
        cpu = pg_cpu() - cpu0
    finally:
        db.close()
    return {
        "median_ms": 1000 * statistics.median(times),
        "pg_cpu_ms": 1000 * cpu / deliveries_count,
        "claim_ms": 1000 * claim,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run, small backlogs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backlogs", default="1000,10000,50000", help="comma list of backlog sizes")
    parser.add_argument("--deliveries", type=int, default=500, help="hand-ons timed per backlog")
    parser.add_argument("--new-installation", action="store_true",
                        help="the backlog arrives after the statements were planned on a nearly empty database")
    parser.add_argument("--e2a-tree", metavar="DIR", default=None, help="import e2a (and its schema) from DIR")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/backlog_drain-<time>.json)")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    backlogs = [500, 2000] if args.quick else [int(b) for b in args.backlogs.split(",")]
    count = 100 if args.quick else args.deliveries
    if any(b < count + 8 for b in backlogs):
        parser.error(f"every backlog must hold the {count} deliveries timed plus the 8 claimed")

    tree = Path(args.e2a_tree).resolve() if args.e2a_tree else Path(__file__).resolve().parents[1]
    if not (tree / "e2a" / "store" / "deliveries.py").exists():
        parser.error(f"--e2a-tree {tree}: no e2a/store/deliveries.py there")
    sys.path.insert(0, str(tree))

    from common import RESULTS, E2AStack
    from smtp_ingest import postgres_cpu

    from e2a.store import migrate

    # An editable install maps the schema package to its own checkout: take the tree's.
    migrate.schema_files = lambda: list((tree / "schema").iterdir())

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="e2a-backlog-"))
    stack = E2AStack(tmp=tmp)
    results: dict[int, list[dict[str, float]]] = {b: [] for b in backlogs}
    try:
        stack.start_postgres(log)

        def pg_cpu() -> float:
            return postgres_cpu(stack.postmaster_pid)

        async def body(reactor: Any) -> None:
            for run in range(1, runs + 1):
                for backlog in backlogs:
                    name = f"drain_{run}_{backlog}"
                    _autocommit(stack.dsn, f"CREATE DATABASE {name}")
                    dsn = stack.dsn.replace("dbname=e2a", f"dbname={name}")
                    await migrate.migrate(dsn, reactor)
                    if args.new_installation:
                        _autocommit(dsn, *(f"ALTER TABLE {t} SET (autovacuum_enabled = false)"
                                           for t in ("messages", "deliveries", "agents")))
                        _setup(dsn, 8 + 8, analyze=False)  # the claims' and hand-ons' before the backlog
                        arrives = functools.partial(_setup, dsn, backlog, analyze=False, agent=False)
                        figures = await _drain(reactor, dsn, count, pg_cpu, arrives)
                    else:
                        _setup(dsn, backlog)
                        figures = await _drain(reactor, dsn, count, pg_cpu)
                    results[backlog].append(figures)
                    log(f"run {run}/{runs} backlog {backlog:>7,}: hand-on {figures['median_ms']:.3f} ms median,"
                        f" PostgreSQL CPU {figures['pg_cpu_ms']:.3f} ms per delivery,"
                        f" claim {figures['claim_ms']:.2f} ms")

        _run(body)
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {
        b: {k: statistics.median(r[k] for r in results[b]) for k in ("median_ms", "pg_cpu_ms", "claim_ms")}
        for b in backlogs
    }
    first, last = backlogs[0], backlogs[-1]
    print(f"backlog drain, {started:%Y-%m-%d %H:%M} UTC, e2a tree {tree}; medians of {runs} run(s),"
          f" {count} hand-ons per backlog" + ("; statements planned before the backlog arrived, no ANALYZE"
                                              if args.new_installation else ""))
    print(" backlog | hand-on ms (median) | PostgreSQL CPU ms per delivery | claim ms")
    for b in backlogs:
        print(f" {b:>7,} | {summary[b]['median_ms']:19.3f} | {summary[b]['pg_cpu_ms']:30.3f} | {summary[b]['claim_ms']:.2f}")
    print(f" largest / smallest backlog: hand-on x{summary[last]['median_ms'] / summary[first]['median_ms']:.2f},"
          f" PostgreSQL CPU x{summary[last]['pg_cpu_ms'] / summary[first]['pg_cpu_ms']:.2f}")
    out = Path(args.output) if args.output else RESULTS / f"backlog_drain-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(), "machine": platform.platform(), "e2a_tree": str(tree),
        "new_installation": args.new_installation,
        "runs": runs, "deliveries": count, "results": {str(b): results[b] for b in backlogs},
        "summary": {str(b): summary[b] for b in backlogs},
    }, indent=2))
    print(f"  JSON: {out}")
    return 0


def _run(body: Any) -> None:
    """Run ``body(reactor)`` to its end on the reactor; re-raise what it raised."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    failures: list[Any] = []

    def start() -> None:
        d = Deferred.fromCoroutine(body(reactor))
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if failures:
        failures[0].raiseException()


if __name__ == "__main__":
    sys.exit(main())
