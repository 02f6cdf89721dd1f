"""A plain Python receiver doing e2a's mandatory ingest work: the peer a user might write instead.

Why it exists: issue 16 compares e2a with what a user would run in its place, doing the same
mandatory work per message. This is the straightforward asyncio version of that work:

* aiosmtpd (SMTP server, one asyncio loop),
* SPF (pyspf) for the client IP and MAIL FROM, DKIM (dkimpy) and a DMARC alignment check
  (relaxed, policy from ``_dmarc.<From domain>``; ``p=reject`` failures get 550),
* every DNS answer cached in-process for its TTL (dnspython against the bench's zone),
* an HMAC-SHA256 over the verdict and the message, added as a header (e2a signs its
  headers with HMAC too),
* one INSERT through asyncpg, and ``250`` only after PostgreSQL committed it.

The verification runs inline on the event loop: with the DNS cache warm it never blocks on
I/O, and a thread hop would only add cost under the GIL. The verdict goes into an
``Authentication-Results`` header of the stored copy, which ``bench/peers.py`` reads back.

Bench-only: aiosmtpd and asyncpg come from ``bench/peers/setup.sh`` (``--target`` folder on
PYTHONPATH), never from the project's install. Loopback only. Prints ``LISTENING <port>``.

    python bench/peers/aiosmtpd_peer.py --dsn postgresql://… --dns-port 5353 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import re
import signal
import sys
import time
from typing import Any

import asyncpg
import dkim
import dns.exception
import dns.rdatatype
import dns.resolver
import spf
from aiosmtpd.smtp import SMTP, Envelope, Session

TABLE = "bench_aiosmtpd_messages"
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " id BIGSERIAL PRIMARY KEY, mail_from TEXT NOT NULL, rcpt TEXT NOT NULL,"
    " raw BYTEA NOT NULL, received_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)
INSERT = f"INSERT INTO {TABLE} (mail_from, rcpt, raw) VALUES ($1, $2, $3)"
HOSTNAME = "aiosmtpd.bench.test"
NEGATIVE_TTL = 300.0


class CachedDNS:
    """dnspython against one server, answers (and NXDOMAIN/NoAnswer) cached for their TTL."""

    def __init__(self, server: str, port: int) -> None:
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = [server]
        self.resolver.port = port
        self.resolver.lifetime = 5.0
        self.cache: dict[tuple[str, str], tuple[float, list[Any]]] = {}

    def lookup(self, name: str, qtype: str) -> list[Any]:
        key = (name.lower().rstrip("."), qtype.upper())
        hit = self.cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            answer = self.resolver.resolve(key[0], key[1], raise_on_no_answer=False)
            rrs = list(answer.rrset or [])
            ttl = float(answer.rrset.ttl) if answer.rrset is not None else NEGATIVE_TTL
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            rrs, ttl = [], NEGATIVE_TTL
        self.cache[key] = (now + ttl, rrs)
        return rrs

    def txt(self, name: str | bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT string of ``name`` (joined), or None."""
        if isinstance(name, bytes):
            name = name.decode("ascii")
        for rr in self.lookup(name, "TXT"):
            return b"".join(rr.strings)
        return None

    def pyspf(self, name: str, qtype: str, tcpfallback: bool = True, timeout: int = 30) -> list[Any]:
        """pyspf's ``DNSLookup`` contract: ``[((name, type), value), …]``."""
        out: list[Any] = []
        for rr in self.lookup(name, qtype):
            t = dns.rdatatype.to_text(rr.rdtype)
            if t in ("A", "AAAA"):
                out.append(((name, t), rr.address))
            elif t == "MX":
                out.append(((name, t), (rr.preference, str(rr.exchange).rstrip("."))))
            elif t in ("TXT", "SPF"):
                out.append(((name, t), list(rr.strings)))
            elif t == "PTR":
                out.append(((name, t), str(rr.target).rstrip(".")))
            elif t == "CNAME":
                out.append(((name, t), str(rr.target).rstrip(".")))
        return out


_FROM_RE = re.compile(rb"^From:(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_DOMAIN_RE = re.compile(rb"@([A-Za-z0-9.-]+)")


def org_domain(domain: str) -> str:
    """Organisational domain, approximated as the last two labels (enough for the bench zone)."""
    return ".".join(domain.split(".")[-2:])


def aligned(a: str, b: str) -> bool:
    return bool(a) and bool(b) and org_domain(a.lower()) == org_domain(b.lower())


class Handler:
    """aiosmtpd handler: RCPT domain check, verification at end of DATA, commit, then 250."""

    def __init__(self, pool: asyncpg.Pool, resolver: CachedDNS, accept_domain: str, secret: bytes) -> None:
        self.pool = pool
        self.dns = resolver
        self.accept_domain = accept_domain.lower()
        self.secret = secret

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.rpartition("@")[2].lower() != self.accept_domain:
            return "550 5.1.1 unknown recipient"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def dmarc_policy(self, domain: str) -> str | None:
        for name in (domain, org_domain(domain)):
            txt = self.dns.txt(f"_dmarc.{name}")
            if txt and txt.lower().startswith(b"v=dmarc1"):
                m = re.search(rb"(?:^|;)\s*p\s*=\s*(\w+)", txt, re.IGNORECASE)
                return m.group(1).decode().lower() if m else "none"
            if name == org_domain(domain):
                break
        return None

    def verify(self, ip: str, helo: str, mail_from: str, raw: bytes) -> tuple[str, str, str, str]:
        spf_result, _ = spf.check2(i=ip, s=mail_from, h=helo)
        mfrom_domain = mail_from.rpartition("@")[2].lower()
        d = dkim.DKIM(raw)
        dkim_ok = d.verify(dnsfunc=self.dns.txt)
        dkim_domain = d.domain.decode().lower() if dkim_ok and d.domain else ""
        head = raw.split(b"\r\n\r\n", 1)[0]
        m = _FROM_RE.search(head)
        dm = _DOMAIN_RE.search(m.group(1)) if m else None
        from_domain = dm.group(1).decode().lower().rstrip(".") if dm else ""
        policy = self.dmarc_policy(from_domain) if from_domain else None
        if policy is None:
            dmarc = "none"
        elif (spf_result == "pass" and aligned(mfrom_domain, from_domain)) or aligned(dkim_domain, from_domain):
            dmarc = "pass"
        else:
            dmarc = "fail"
        return spf_result, ("pass" if dkim_ok else "fail"), dmarc, (policy or "none")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        spf_r, dkim_r, dmarc_r, policy = self.verify(
            session.peer[0], session.host_name or "", mail_from, raw
        )
        if dmarc_r == "fail" and policy == "reject":
            return "550 5.7.1 DMARC policy rejects this message"
        domain = mail_from.rpartition("@")[2]
        ar = (
            f"Authentication-Results: {HOSTNAME}; spf={spf_r} smtp.mailfrom={domain};"
            f" dkim={dkim_r}; dmarc={dmarc_r}\r\n"
        ).encode()
        mac = hmac.new(self.secret, ar + raw, hashlib.sha256).hexdigest()
        stored = ar + f"X-Bench-HMAC: {mac}\r\n".encode() + raw
        try:
            await self.pool.execute(INSERT, mail_from, ",".join(envelope.rcpt_tos), stored)
        except (OSError, asyncpg.PostgresError):
            return "451 4.3.0 database error, try again later"
        return "250 2.0.0 stored"


async def main(args: argparse.Namespace) -> None:
    # libpq "key=value" DSN (what the bench's embedded PostgreSQL hands out) or a URL.
    if "://" in args.dsn:
        pool = await asyncpg.create_pool(args.dsn, min_size=args.pool_size, max_size=args.pool_size)
    else:
        kw = dict(part.split("=", 1) for part in args.dsn.split())
        if "dbname" in kw:
            kw["database"] = kw.pop("dbname")
        pool = await asyncpg.create_pool(**kw, min_size=args.pool_size, max_size=args.pool_size)
    await pool.execute(DDL)
    resolver = CachedDNS("127.0.0.1", args.dns_port)
    spf.DNSLookup = resolver.pyspf  # pyspf resolves through this module-level function
    handler = Handler(pool, resolver, args.accept_domain, os.urandom(32))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, ident="bench aiosmtpd peer", data_size_limit=33554432,
                     decode_data=False, enable_SMTPUTF8=False),
        "127.0.0.1", args.port,
    )
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="PostgreSQL URL or DSN of the bench database")
    parser.add_argument("--dns-port", type=int, required=True, help="port of the bench DNS zone on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--accept-domain", default="agents.bench.test", help="recipient domain accepted")
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg connections (e2a's default pool is 10)")
    asyncio.run(main(parser.parse_args()))
