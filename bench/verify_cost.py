"""CPU per message of e2a's sender verification alone (SPF, DKIM, DMARC), in one thread.

Why: the ingest benchmarks report the CPU of whole processes; this says how much of that is
the verification every verifying receiver must do, measured without sockets, PostgreSQL or a
reactor. It runs e2a's own ``MailVerifier.thd_verify`` (the function the mail-auth thread
pool runs for each message) on the benchmarks' DKIM-signed messages, with the same loopback
DNS zone and the DNS answers cached as in a running e2a, and times each step with the
thread's CPU clock. For comparison it also times the plain libraries the Python peer uses
(dkimpy ``dkim.verify`` and pyspf ``spf.check2``) on the same message.

    python bench/verify_cost.py              # 2 KB and 100 KB, 2,000 / 300 messages, medians of 3
    python bench/verify_cost.py --quick
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import LOOPBACK, RESULTS, SIZES, E2AStack, build_mail, dkim_key  # noqa: E402
from smtp_ingest import SENDER  # noqa: E402

CLIENT_IP = LOOPBACK
HELO = "bench-client.example.org"


def per_message_ms(fn: Any, count: int) -> float:
    """CPU milliseconds of this thread per call of ``fn`` over ``count`` calls."""
    start = time.thread_time()
    for _ in range(count):
        fn()
    return 1000 * (time.thread_time() - start) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run, few messages")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/verify_cost-<time>.json)")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    counts = {"2k": 200, "100k": 30} if args.quick else {"2k": 2000, "100k": 300}

    import dkim
    import spf

    from e2a.mailauth.dns import DnsClient
    from e2a.mailauth.verify import MailVerifier
    from e2a.workers import WorkerPool

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="e2a-verify-cost-"))
    stack = E2AStack(tmp)
    pem, txt = dkim_key()
    mails = {s: build_mail(s, SIZES[s], pem) for s in counts}
    pool = WorkerPool(None, 1, "verify-cost")  # MailVerifier wants one (never started); thd_verify runs here
    results: dict[str, dict[str, list[float]]] = {}
    verifier = None
    try:
        stack.start_dns(txt, log)
        client = DnsClient([(LOOPBACK, stack.dns_port)], timeout=5.0)
        verifier = MailVerifier(client, pool, reactor=None)
        for size, mail in mails.items():
            raw = mail.wire(f"verify-cost.{size}@example.org")  # never dot-stuffed (build_mail)
            now = time.time()
            verdict = verifier.thd_verify(raw, CLIENT_IP, HELO, SENDER, now)  # fills the DNS cache
            if (verdict.spf, verdict.dkim, verdict.dmarc) != ("pass", "pass", "pass"):
                raise SystemExit(f"{size}: the verdict is not spf/dkim/dmarc = pass: {verdict}")
            if not dkim.verify(raw, dnsfunc=client.thd_dkim_dnsfunc):
                raise SystemExit(f"{size}: dkimpy does not verify the message")
            steps = {
                "e2a thd_verify (all)": lambda raw=raw, now=now: verifier.thd_verify(raw, CLIENT_IP, HELO, SENDER, now),
                "e2a SPF": lambda: verifier.thd_spf(CLIENT_IP, HELO, SENDER),
                "e2a DKIM": lambda raw=raw, now=now: verifier.thd_dkim(raw, now),
                "e2a DMARC record": lambda: verifier.thd_dmarc_lookup("example.org"),
                "dkimpy dkim.verify": lambda raw=raw: dkim.verify(raw, dnsfunc=client.thd_dkim_dnsfunc),
                "pyspf spf.check2": lambda: spf.check2(i=CLIENT_IP, s=SENDER, h=HELO),
            }
            results[size] = {name: [] for name in steps}
            for fn in steps.values():
                per_message_ms(fn, max(counts[size] // 10, 5))  # warm-up
            for run in range(runs):
                for name, fn in steps.items():
                    results[size][name].append(per_message_ms(fn, counts[size]))
                log(f"{size} run {run + 1}/{runs}: " + ", ".join(
                    f"{name} {values[-1]:.3f}" for name, values in results[size].items()))
    finally:
        if verifier is not None:
            verifier.close()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {size: {name: round(statistics.median(v), 4) for name, v in steps.items()} for size, steps in results.items()}
    print(f"verification CPU per message, one thread, DNS answers cached; medians of {runs} run(s), ms")
    names = list(next(iter(medians.values())))
    print(f"{'step':<24}" + "".join(f"{size:>10}" for size in medians))
    for name in names:
        print(f"{name:<24}" + "".join(f"{medians[size][name]:>10.3f}" for size in medians))
    started = datetime.now(UTC)
    out = Path(args.output) if args.output else RESULTS / f"verify_cost-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "finished_at": started.isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg": Path("/proc/loadavg").read_text().split()[:3]},
        "messages_per_run": counts, "runs": runs, "sizes": {s: m.length for s, m in mails.items()},
        "medians_ms": medians, "all_ms": results,
    }, indent=2))
    print(f"  JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
