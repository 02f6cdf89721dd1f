"""Reference end-to-end pipeline for ``bench/end_to_end.py``: the cheapest honest SMTP → webhook.

Why it exists: e2a's delivered-messages/s on a shared 2-core machine mean little alone. This
process does the minimum any "mail in, signed webhook out" gateway must do, and nothing else:

1. stock ``twisted.mail`` ESMTP accepts the message;
2. one ``INSERT … RETURNING id`` through txpostgres (autocommit: it has committed when the
   Deferred fires), then ``250``;
3. right after the 250 (next reactor turn, straight from memory — no queue, no lease, no
   re-read), a ``treq`` POST of a compact JSON body (``message_id`` + base64 of the raw
   message) with Standard-Webhooks-style headers (``webhook-id`` / ``-timestamp`` /
   ``-signature`` = ``v1,`` base64 HMAC-SHA256 over ``id.timestamp.body``);
4. on a 2xx, one ``UPDATE … SET delivered_at = now()``.

No SPF/DKIM/DMARC, no header rewriting, no dedupe, no retry (a failed POST is only counted).
``webhook-id`` is the message's own ``Message-ID`` (without ``<>``), so the benchmark client
can match sink receipts to its sends; the stock ESMTP 250 text carries no id.

Run (the benchmark does this for you; the secret comes from ``BENCH_WEBHOOK_SECRET``)::

    .venv/bin/python bench/reference_pipeline.py --dsn "host=… dbname=e2a" --webhook-url http://127.0.0.1:PORT/ref

It prints ``LISTENING <port>`` once it accepts connections; SIGTERM stops it. Loopback only: it
binds 127.0.0.1 and refuses a webhook URL that is not ``http://127.0.0.1:…``.
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

import psycopg2
import treq
from txpostgres import txpostgres
from zope.interface import implementer

from twisted.internet import defer
from twisted.mail import smtp
from twisted.web.client import HTTPConnectionPool

TABLE = "bench_pipeline_messages"
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " id BIGSERIAL PRIMARY KEY,"
    " mail_from TEXT NOT NULL,"
    " rcpt TEXT NOT NULL,"
    " raw BYTEA NOT NULL,"
    " received_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
    " delivered_at TIMESTAMPTZ)"
)
INSERT = f"INSERT INTO {TABLE} (mail_from, rcpt, raw) VALUES (%s, %s, %s) RETURNING id"
UPDATE = f"UPDATE {TABLE} SET delivered_at = now() WHERE id = %s"


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks ``v1,`` signature (the same shape e2a sends, docs/webhooks.md)."""
    mac = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def message_id_of(lines: list[bytes]) -> str:
    """The Message-ID token of the header section (unfolded values only), or ``""``."""
    for line in lines:
        if not line:
            break
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().strip(b"<>").decode("ascii", "replace")
    return ""


class Pipeline:
    """Shared state: the DB pool, the HTTP pool, counters."""

    def __init__(self, reactor: Any, pool: txpostgres.ConnectionPool, url: str, secret: bytes) -> None:
        self.reactor = reactor
        self.pool = pool
        self.url = url
        self.secret = secret
        self.http = HTTPConnectionPool(reactor, persistent=True)
        self.http.maxPersistentPerHost = 64
        self.http.retryAutomatically = False
        self.posted = self.delivered = self.failed = 0

    def stored(self, rows: Any, raw: bytes, lines: list[bytes]) -> str:
        row_id = rows[0][0]
        webhook_id = message_id_of(lines) or f"ref_{row_id}"
        # After the 250 has been written (SMTP writes it when this callback chain returns).
        self.reactor.callLater(0, self._fire, row_id, webhook_id, raw)
        return "stored"

    def _fire(self, row_id: int, webhook_id: str, raw: bytes) -> None:
        defer.Deferred.fromCoroutine(self._post(row_id, webhook_id, raw))

    async def _post(self, row_id: int, webhook_id: str, raw: bytes) -> None:
        body = json.dumps(
            {"message_id": webhook_id, "raw_message": base64.b64encode(raw).decode("ascii")},
            separators=(",", ":"),
        ).encode()
        ts = int(time.time())
        headers = {
            "Content-Type": ["application/json"],
            "webhook-id": [webhook_id],
            "webhook-timestamp": [str(ts)],
            "webhook-signature": [sign(self.secret, webhook_id, ts, body)],
        }
        self.posted += 1
        try:
            response = await treq.post(self.url, data=body, headers=headers, pool=self.http,
                                       reactor=self.reactor, timeout=10)
            await response.content()
            ok = 200 <= response.code <= 299
        except Exception as e:  # noqa: BLE001 - counted, never retried (no queue by design)
            print(f"POST failed: {e!r}", file=sys.stderr)
            ok = False
        if ok:
            await self.pool.runOperation(UPDATE, (row_id,))
            self.delivered += 1
        else:
            self.failed += 1


@implementer(smtp.IMessage)
class _StoredMessage:
    """Collects the lines stock ESMTP hands over; one INSERT (autocommit) at end of data."""

    def __init__(self, pipeline: Pipeline, mail_from: str, rcpt: str) -> None:
        self._p = pipeline
        self._from = mail_from
        self._rcpt = rcpt
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - twisted.mail API
        self._lines.append(line)

    def eomReceived(self) -> defer.Deferred[Any]:  # noqa: N802 - twisted.mail API
        lines, self._lines = self._lines, []
        raw = b"\r\n".join(lines) + b"\r\n"
        d = self._p.pool.runQuery(INSERT, (self._from, self._rcpt, psycopg2.Binary(raw)))
        d.addCallback(self._p.stored, raw, lines)
        return d

    def connectionLost(self) -> None:  # noqa: N802 - twisted.mail API
        self._lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Accepts every sender and recipient: the reference does no verification at all."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:  # noqa: N802
        return b"Received: from " + helo[0] + b" by reference.bench"

    def validateFrom(self, helo: Any, origin: Any) -> Any:  # noqa: N802
        return origin

    def validateTo(self, user: Any) -> Any:  # noqa: N802
        mail_from, rcpt = str(user.orig), str(user.dest)
        return lambda: _StoredMessage(self._p, mail_from, rcpt)


class _Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"reference.bench"

    def __init__(self, delivery: _Delivery) -> None:
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        p = super().buildProtocol(addr)
        p.delivery = self.delivery
        return p


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    if not args.webhook_url.startswith("http://127.0.0.1:"):
        raise SystemExit("loopback only: --webhook-url must be http://127.0.0.1:<port>/…")
    secret = os.environ.get("BENCH_WEBHOOK_SECRET", "").encode("ascii")
    if not secret:
        raise SystemExit("BENCH_WEBHOOK_SECRET is not set")
    pool = txpostgres.ConnectionPool(None, args.dsn, min=args.pool_size)
    await pool.start()
    await pool.runOperation(DDL)
    pipeline = Pipeline(reactor, pool, args.webhook_url, secret)
    port = reactor.listenTCP(args.port, _Factory(_Delivery(pipeline)), interface="127.0.0.1")
    sys.stdout.write(f"LISTENING {port.getHost().port}\n")
    sys.stdout.flush()
    stopped: defer.Deferred[None] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: stopped.called or stopped.callback(None))
    await stopped
    print(f"posted {pipeline.posted} delivered {pipeline.delivered} failed {pipeline.failed}", file=sys.stderr)
    await defer.maybeDeferred(port.stopListening)
    await pipeline.http.closeCachedConnections()
    pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="libpq DSN of the benchmark database")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--webhook-url", required=True, help="http://127.0.0.1:<port>/<path> of the sink")
    parser.add_argument("--pool-size", type=int, default=10, help="txpostgres connections (e2a's default pool is 10)")
    args = parser.parse_args(argv)
    from twisted.internet import task

    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor, args)))


if __name__ == "__main__":
    main()
