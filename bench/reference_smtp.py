"""Reference SMTP receiver for ``bench/smtp_ingest.py``: the cheapest honest baseline.

Why it exists: e2a's ingest figures mean little on their own on a shared 2-core machine. This
receiver does the minimum any durable MX must do — stock ``twisted.mail`` ESMTP, one
``INSERT`` through txpostgres per message, ``250`` only after that statement committed — and
nothing else (no SPF/DKIM/DMARC, no header rewriting, no signing). Run against the same
PostgreSQL in the same invocation, it turns e2a's numbers into ratios that survive machine
noise.

Run (the benchmark does this for you)::

    .venv/bin/python bench/reference_smtp.py --dsn "host=… port=5432 user=postgres dbname=e2a" --port 0

It prints ``LISTENING <port>`` on stdout once it accepts connections; SIGTERM stops it.
Loopback only: it binds 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psycopg2
from txpostgres import txpostgres
from zope.interface import implementer

from twisted.internet import defer
from twisted.mail import smtp

TABLE = "bench_reference_messages"
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " id BIGSERIAL PRIMARY KEY,"
    " mail_from TEXT NOT NULL,"
    " rcpt TEXT NOT NULL,"
    " raw BYTEA NOT NULL,"
    " received_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)
INSERT = f"INSERT INTO {TABLE} (mail_from, rcpt, raw) VALUES (%s, %s, %s)"


@implementer(smtp.IMessage)
class _StoredMessage:
    """Collects the lines stock ESMTP hands over; one INSERT (autocommit) at end of data."""

    def __init__(self, pool: txpostgres.ConnectionPool, mail_from: str, rcpt: str) -> None:
        self._pool = pool
        self._from = mail_from
        self._rcpt = rcpt
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - twisted.mail API
        self._lines.append(line)

    def eomReceived(self) -> defer.Deferred[Any]:  # noqa: N802 - twisted.mail API
        raw = b"\r\n".join(self._lines) + b"\r\n"
        self._lines = []
        # txpostgres connections are autocommit: the Deferred fires after COMMIT.
        d = self._pool.runOperation(INSERT, (self._from, self._rcpt, psycopg2.Binary(raw)))
        d.addCallback(lambda _: "stored")
        return d

    def connectionLost(self) -> None:  # noqa: N802 - twisted.mail API
        self._lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Accepts every sender and recipient: the reference does no verification at all."""

    def __init__(self, pool: txpostgres.ConnectionPool) -> None:
        self._pool = pool

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:  # noqa: N802
        return b"Received: from " + helo[0] + b" by reference.bench"

    def validateFrom(self, helo: Any, origin: Any) -> Any:  # noqa: N802
        return origin

    def validateTo(self, user: Any) -> Any:  # noqa: N802
        mail_from = str(user.orig)
        rcpt = str(user.dest)
        return lambda: _StoredMessage(self._pool, mail_from, rcpt)


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
    pool = txpostgres.ConnectionPool(None, args.dsn, min=args.pool_size)
    await pool.start()
    await pool.runOperation(DDL)
    port = reactor.listenTCP(args.port, _Factory(_Delivery(pool)), interface="127.0.0.1")
    sys.stdout.write(f"LISTENING {port.getHost().port}\n")
    sys.stdout.flush()
    stopped: defer.Deferred[None] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: stopped.called or stopped.callback(None))
    await stopped
    await defer.maybeDeferred(port.stopListening)
    pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="libpq DSN of the benchmark database")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--pool-size", type=int, default=10, help="txpostgres connections (e2a's default pool is 10)")
    args = parser.parse_args(argv)
    from twisted.internet import task

    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor, args)))


if __name__ == "__main__":
    main()
