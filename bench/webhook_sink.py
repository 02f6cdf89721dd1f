"""Loopback webhook sink for ``bench/end_to_end.py``: records arrivals, checks signatures, counts duplicates.

A separate process (twisted.web on 127.0.0.1) so that the receiving side never competes with
the benchmark client's reactor. For every POST it records ``time.monotonic()`` (CLOCK_MONOTONIC:
the same clock in every process of the machine, so the client can subtract its own 250 times)
under the ``webhook-id`` header, and answers ``200`` with an empty body.

* Standard Webhooks signature (docs/webhooks.md: ``v1,`` base64 HMAC-SHA256 with the 64 ASCII
  characters of the secret over ``id.timestamp.body``; ±5 min tolerance) is verified on every
  ``--verify-every``-th request (and always on the first), with the secret from
  ``BENCH_WEBHOOK_SECRET``.
* Duplicates: a ``webhook-id`` seen before is counted (and its arrival kept) — the
  exactly-once check of the benchmark.
* Requests in flight: with ``--hold-ms N`` each answer is sent N ms after the request arrived,
  so requests overlap as they would at a real receiver; the most requests in flight at once
  per path (one path per agent) is kept in ``peak_in_flight``: the check of the per-agent
  concurrency limit (``webhooks.max_concurrency_per_agent``), across all e2a processes.

Control endpoints (for the benchmark client only):

* ``GET /_stats`` → JSON counters;
* ``POST /_take`` → JSON ``{webhook_id: [arrival, …]}`` of everything that arrived since the
  previous take (the duplicate detection itself spans the whole process lifetime).

Prints ``LISTENING <port>``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from typing import Any

from twisted.web import resource, server


class Sink(resource.Resource):
    isLeaf = True

    def __init__(self, secret: bytes, verify_every: int, reactor: Any = None, hold_s: float = 0.0) -> None:
        super().__init__()
        self.secret = secret
        self.verify_every = max(1, verify_every)
        self.reactor = reactor
        self.hold_s = hold_s
        self.seen: set[str] = set()
        self.pending: dict[str, list[float]] = {}
        self.in_flight: dict[str, int] = {}
        self.stats = {
            "received": 0, "unique": 0, "duplicates": 0, "missing_id": 0,
            "sig_checked": 0, "sig_ok": 0, "sig_bad": 0, "bytes": 0, "by_path": {},
            "peak_in_flight": {}, "hold_ms": round(hold_s * 1000, 3),
        }

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
        now = time.monotonic()
        if request.path == b"/_take":
            out, self.pending = self.pending, {}
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(out).encode()
        body = request.content.read()
        st = self.stats
        st["received"] += 1
        st["bytes"] += len(body)
        path = request.path.decode("ascii", "replace")
        st["by_path"][path] = st["by_path"].get(path, 0) + 1
        wid = request.getHeader(b"webhook-id")
        if not wid:
            st["missing_id"] += 1
            return b""
        wid = wid.decode("ascii", "replace")
        if wid in self.seen:
            st["duplicates"] += 1
        else:
            self.seen.add(wid)
            st["unique"] += 1
        self.pending.setdefault(wid, []).append(now)
        if st["received"] % self.verify_every == 1 or self.verify_every == 1:
            st["sig_checked"] += 1
            st["sig_ok" if self._verify(wid, request, body) else "sig_bad"] += 1
        return self._answer(request, path)

    def _answer(self, request: Any, path: str) -> Any:
        """Answer now, or after ``hold_s`` while counting the path's requests in flight."""
        n = self.in_flight.get(path, 0) + 1
        self.in_flight[path] = n
        peaks = self.stats["peak_in_flight"]
        peaks[path] = max(peaks.get(path, 0), n)
        if self.hold_s <= 0:
            self.in_flight[path] -= 1
            return b""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def finish() -> None:
            self.in_flight[path] -= 1
            if not gone:
                request.finish()

        self.reactor.callLater(self.hold_s, finish)
        return server.NOT_DONE_YET

    def _verify(self, wid: str, request: Any, body: bytes) -> bool:
        ts = (request.getHeader(b"webhook-timestamp") or b"").decode("ascii", "replace")
        sigs = (request.getHeader(b"webhook-signature") or b"").decode("ascii", "replace").split()
        if not ts.isdigit() or abs(int(ts) - time.time()) > 300:
            return False
        mac = hmac.new(self.secret, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(mac).decode("ascii")
        return any(hmac.compare_digest(expected, s) for s in sigs)

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.stats).encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--verify-every", type=int, default=10, help="verify the signature of every Nth request")
    parser.add_argument("--hold-ms", type=float, default=0.0,
                        help="answer each webhook this many ms after it arrived (requests then overlap)")
    args = parser.parse_args(argv)
    secret = os.environ.get("BENCH_WEBHOOK_SECRET", "").encode("ascii")
    if not secret:
        raise SystemExit("BENCH_WEBHOOK_SECRET is not set")
    from twisted.internet import reactor

    site = server.Site(Sink(secret, args.verify_every, reactor, args.hold_ms / 1000))
    site.noisy = False
    site.log = lambda request: None  # no access log
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=256)
    sys.stdout.write(f"LISTENING {port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
