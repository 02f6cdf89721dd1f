"""The one resolver seam: every DNS lookup e2a makes goes through a :class:`DnsClient`.

mail.md §2 and config.md ``dns.nameservers``: when nameservers are configured, every query
(SPF, DKIM, DMARC, MX, domain TXT verification, webhook hosts) goes to them and *no other
resolver is ever asked*. Keeping all lookups behind one object makes that rule checkable in one
place, and lets tests point the whole process at a loopback zone.

Two faces, one configuration:

- ``async`` methods for reactor code, built on ``twisted.names.client.Resolver`` (never blocks);
- ``thd_*`` methods for the blocking libraries (dkimpy, pyspf) that must run in a thread pool,
  built on dnspython. dkimpy takes :meth:`DnsClient.thd_dkim_dnsfunc` per call; pyspf's hook is
  a module global, installed with :func:`install_spf_lookup` and undone with
  :func:`restore_spf_lookup`.

Temporary failures (timeout, SERVFAIL, REFUSED, no usable server) raise
:class:`DnsTemporaryError`; NXDOMAIN and an empty answer are not errors, they return ``[]``.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna

from twisted.internet import defer
from twisted.names import client as twclient
from twisted.names import dns as twdns
from twisted.names import error as twerror

from e2a.errors import TransientError

__all__ = [
    "DkimDnsRecorder",
    "DkimDnsTemporaryError",
    "DnsClient",
    "DnsTemporaryError",
    "install_spf_lookup",
    "restore_spf_lookup",
]

#: Upper bound of cached answers on the blocking side (per DnsClient).
DEFAULT_CACHE_SIZE = 2048

# twisted.names failures that mean "ask again later" (everything except NXDOMAIN).
_TW_TEMPORARY = (
    twerror.DNSQueryTimeoutError,
    defer.TimeoutError,
    TimeoutError,
    twerror.DNSServerError,
    twerror.DNSQueryRefusedError,
    twerror.DNSFormatError,
    twerror.DNSNotImplementedError,
    twerror.DNSUnknownError,
    twerror.ResolverError,
)

# dnspython failures that mean "ask again later".
_DP_TEMPORARY = (
    dns.exception.Timeout,  # includes LifetimeTimeout
    dns.resolver.NoNameservers,  # every server answered SERVFAIL/REFUSED/garbage
    dns.resolver.NoResolverConfiguration,
)

# dnspython failures that mean "no such data": treated like NXDOMAIN.
_DP_ABSENT = (
    dns.resolver.NXDOMAIN,
    dns.resolver.NoAnswer,
    dns.resolver.YXDOMAIN,
    dns.name.EmptyLabel,
    dns.name.LabelTooLong,
    dns.name.NameTooLong,
    dns.name.BadEscape,
)

_SPF_QTYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF")


class DnsTemporaryError(TransientError):
    """A lookup failed for a reason worth retrying: timeout, SERVFAIL, REFUSED, no server."""


try:  # dkimpy swallows its own DnsTimeoutError and reports "fail"; see DkimDnsRecorder.
    from dkim import DnsTimeoutError as _DkimDnsTimeoutError
except ImportError:  # pragma: no cover - dkimpy is a hard dependency
    _DkimDnsTimeoutError = Exception  # type: ignore[assignment,misc]


class DkimDnsTemporaryError(_DkimDnsTimeoutError, DnsTemporaryError):  # type: ignore[misc,valid-type]
    """Raised by :meth:`DnsClient.thd_dkim_dnsfunc`: dkimpy sees its own ``DnsTimeoutError``."""


def _ascii_name(name: str | bytes) -> str:
    """A query name as ASCII (IDNA A-labels per label), without changing ASCII labels.

    ASCII labels pass untouched so service names such as ``_dmarc`` or ``s._domainkey`` keep
    their underscores (IDNA would refuse them); only labels with non-ASCII characters are
    converted.
    """
    if isinstance(name, bytes):
        return name.decode("ascii")
    try:
        return name.encode("ascii").decode("ascii")
    except UnicodeEncodeError:
        pass
    labels = name.split(".")
    out = []
    for label in labels:
        if label.isascii():
            out.append(label)
        else:
            out.append(idna.encode(label, uts46=True).decode("ascii"))
    return ".".join(out)


def _twisted_timeouts(timeout: float) -> tuple[float, ...]:
    """Per-attempt timeouts summing to ``timeout``: one quick UDP retry when there is room."""
    if timeout > 2:
        return (1.0, timeout - 1.0)
    return (float(timeout),)


def _system_nameservers() -> list[tuple[str, int]]:
    """Nameservers from the system resolver configuration (resolv.conf), as (host, port)."""
    try:
        system = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return [("127.0.0.1", 53)]
    servers: list[tuple[str, int]] = []
    for ns in system.nameservers:
        if isinstance(ns, str):
            servers.append((ns, system.nameserver_ports.get(ns, system.port)))
        elif isinstance(ns, dns.nameserver.AddressAndPortNameserver):
            servers.append((ns.address, ns.port))
    return servers or [("127.0.0.1", 53)]


class DnsClient:
    """All of e2a's DNS: async lookups for the reactor, ``thd_*`` lookups for thread pools.

    Args:
        nameservers: (host, port) pairs; empty means the system resolvers (resolv.conf).
            When given, these and only these servers are asked.
        timeout: seconds per query (``dns.timeout``).
        reactor: the reactor for the twisted.names side (``None``: Twisted's default).
        cache_size: bound of the blocking side's TTL cache; 0 disables it.
        wall_clock: POSIX time source the cached answers' expiry is compared with (dnspython
            stamps answers with ``time.time()``); tests pass a fake one.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]],
        timeout: float,
        reactor: Any = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.nameservers: list[tuple[str, int]] = [(str(h), int(p)) for h, p in nameservers]
        self.timeout = float(timeout)
        self._reactor = reactor
        self._tw_timeouts = _twisted_timeouts(self.timeout)

        servers = self.nameservers or _system_nameservers()
        # No resolv= argument: with explicit servers twisted.names reads no file and schedules
        # no periodic re-read, so nothing else is asked and no timer is left behind.
        self._tw_resolver = twclient.Resolver(servers=servers, reactor=reactor)

        if self.nameservers:
            blocking = dns.resolver.Resolver(configure=False)
            blocking.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in self.nameservers
            ]
        else:
            try:
                blocking = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                blocking = dns.resolver.Resolver(configure=False)
                blocking.nameservers = ["127.0.0.1"]
        blocking.lifetime = self.timeout
        blocking.timeout = min(2.0, self.timeout)  # per try; dnspython retries within lifetime
        blocking.use_edns(0, 0, 1232)  # fewer TCP fallbacks for DKIM keys
        # dnspython's LRUCache honours each answer's TTL, is bounded and takes a lock around
        # every access, which is exactly the thread-safe TTL cache the ingest path needs: the
        # same SPF/DKIM records are asked for on every message from a sender.
        self._cache: dns.resolver.LRUCache | None = None
        if cache_size > 0:
            self._cache = dns.resolver.LRUCache(max_size=cache_size)
            blocking.cache = self._cache
        self._blocking = blocking
        # In front of dnspython: (name as asked, type) → (expiry, rdatas) of positive answers.
        # A cached dnspython lookup still parses the name, builds a resolution object and takes
        # the cache lock (~13 µs); verification asks the same three names (SPF, DKIM key,
        # DMARC) for every message from a sender, so a dict hit (~1 µs) is worth having. The
        # expiry is dnspython's own (the smallest TTL along the CNAME chain), so nothing is
        # kept longer than the DNS cache would keep it.
        self._front: dict[tuple[str | bytes, str], tuple[float, tuple[Any, ...]]] = {}
        self._front_size = cache_size
        self._front_lock = threading.Lock()
        self._wall = wall_clock

    # ------------------------------------------------------------------ reactor side

    @property
    def twisted_resolver(self) -> twclient.Resolver:
        """The twisted.names ``IResolver`` asking the same servers (e.g. for MXCalculator)."""
        return self._tw_resolver

    async def _tw_query(self, name: str | bytes, method: str) -> list[twdns.RRHeader]:
        qname = _ascii_name(name)
        lookup = getattr(self._tw_resolver, method)
        try:
            answers, _authority, _additional = await lookup(qname, timeout=self._tw_timeouts)
        except twerror.DNSNameError:
            return []
        except _TW_TEMPORARY as exc:
            raise DnsTemporaryError(f"DNS lookup of {qname} failed: {type(exc).__name__}") from exc
        return list(answers)

    async def lookup_txt(self, name: str) -> list[str]:
        """TXT records of ``name``, each record's strings concatenated; ``[]`` when none.

        Raises:
            DnsTemporaryError: timeout, SERVFAIL or REFUSED.
        """
        answers = await self._tw_query(name, "lookupText")
        return [
            b"".join(rr.payload.data).decode("utf-8", "replace")
            for rr in answers
            if rr.type == twdns.TXT
        ]

    async def lookup_addresses(self, name: str) -> list[str]:
        """A then AAAA addresses of ``name`` as normalised strings; ``[]`` when none.

        Both queries must succeed: a half answer would let a webhook host slip its other
        family past the SSRF check, so a temporary failure of either raises.

        Raises:
            DnsTemporaryError: timeout, SERVFAIL or REFUSED of either query.
        """
        try:
            v4, v6 = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(self._tw_query(name, "lookupAddress")),
                    defer.Deferred.fromCoroutine(self._tw_query(name, "lookupIPV6Address")),
                ],
                consumeErrors=True,
            )
        except defer.FirstError as exc:
            exc.subFailure.raiseException()
        addresses: list[str] = []
        for rr in v4:
            if rr.type == twdns.A:
                addresses.append(str(ipaddress.IPv4Address(rr.payload.address)))
        for rr in v6:
            if rr.type == twdns.AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
        return _dedupe(addresses)

    async def lookup_mx(self, name: str) -> list[tuple[int, str]]:
        """MX records of ``name`` as (preference, host without trailing dot), sorted.

        Raises:
            DnsTemporaryError: timeout, SERVFAIL or REFUSED.
        """
        answers = await self._tw_query(name, "lookupMailExchange")
        found = [
            (int(rr.payload.preference), str(rr.payload.name).rstrip(".").lower())
            for rr in answers
            if rr.type == twdns.MX
        ]
        return sorted(found)

    # ------------------------------------------------------------------ thread side

    def flush_cache(self) -> None:
        """Forget every cached answer of the blocking side (tests that change records)."""
        if self._cache is not None:
            self._cache.flush()
        with self._front_lock:
            self._front.clear()

    def _remember(self, key: tuple[str | bytes, str], expiry: float, rdatas: tuple[Any, ...]) -> None:
        with self._front_lock:
            if key not in self._front and len(self._front) >= self._front_size:
                # Oldest insertion first out: a bound, not an LRU; misses fall through to
                # dnspython's own cache anyway.
                self._front.pop(next(iter(self._front)), None)
            self._front[key] = (expiry, rdatas)

    def _thd_rrset(
        self, name: str | bytes, rdtype: str, lifetime: float | None = None
    ) -> tuple[Any, ...]:
        """Blocking query; the rdata of the final answer RRset (CNAMEs followed), or ()."""
        key = (name, rdtype)
        hit = self._front.get(key)  # a single dict read is atomic; writes take the lock
        if hit is not None and hit[0] > self._wall():
            return hit[1]
        qname = _ascii_name(name)
        life = self.timeout if lifetime is None else max(0.01, min(float(lifetime), self.timeout))
        try:
            answer = self._blocking.resolve(
                qname,
                rdtype,
                raise_on_no_answer=False,
                lifetime=life,
                search=False,
            )
        except _DP_ABSENT:
            return ()
        except _DP_TEMPORARY as exc:
            raise DnsTemporaryError(f"DNS lookup of {qname} {rdtype} failed: {exc}") from exc
        if answer.rrset is None:
            return ()
        rdatas = tuple(answer.rrset)
        if self._front_size > 0 and answer.expiration > self._wall():
            self._remember(key, answer.expiration, rdatas)
        return rdatas

    def thd_txt(self, name: str | bytes, timeout: float | None = None) -> list[bytes]:
        """Blocking TXT lookup: each record's strings concatenated. Thread only.

        Raises:
            DnsTemporaryError: timeout, SERVFAIL, REFUSED.
        """
        return [b"".join(rdata.strings) for rdata in self._thd_rrset(name, "TXT", timeout)]

    def thd_addresses(self, name: str | bytes, timeout: float | None = None) -> list[str]:
        """Blocking A then AAAA lookup. Thread only.

        Raises:
            DnsTemporaryError: timeout, SERVFAIL, REFUSED of either query.
        """
        v4 = [rdata.address for rdata in self._thd_rrset(name, "A", timeout)]
        v6 = [str(ipaddress.IPv6Address(r.address)) for r in self._thd_rrset(name, "AAAA", timeout)]
        return _dedupe(v4 + v6)

    def thd_mx(self, name: str | bytes, timeout: float | None = None) -> list[tuple[int, str]]:
        """Blocking MX lookup as sorted (preference, host without trailing dot). Thread only.

        Raises:
            DnsTemporaryError: timeout, SERVFAIL, REFUSED.
        """
        return sorted(
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())
            for r in self._thd_rrset(name, "MX", timeout)
        )

    def thd_dkim_dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the key record at ``name`` or ``None`` when there is none.

        Same contract as ``dkim.dnsplug.get_txt``: ``None`` (dkimpy then reports a missing
        key → fail) for NXDOMAIN, no TXT or a name that is not ASCII; a
        ``dkim.DnsTimeoutError`` subclass for temporary failures. When a name holds several
        TXT records, the one starting ``v=DKIM1`` wins, else the first (dkimpy's own
        function takes the first). dkimpy converts the exception into a plain ``False``, so
        callers that must report ``temperror`` use :class:`DkimDnsRecorder`.
        """
        try:
            qname = _ascii_name(name)
        except (UnicodeError, idna.IDNAError):
            return None
        try:
            records = self.thd_txt(qname, timeout)
        except DnsTemporaryError as exc:
            raise DkimDnsTemporaryError(str(exc)) from exc
        if not records:
            return None
        for record in records:
            if record.lstrip().startswith(b"v=DKIM1"):
                return record
        return records[0]

    def thd_spf_lookup(
        self, name: str, qtype: str, tcpfallback: Any = True, timeout: float = 30
    ) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``spf.DNSLookup``: ``[((name, qtype), value), ...]``.

        Values as ``spf.DNSLookup_dnspython`` gives them: A/AAAA address strings, MX
        ``(preference, host)``, PTR host without trailing dot, TXT/SPF a tuple of the
        record's byte strings (pyspf joins them). pyspf passes its ``strict`` flag in the
        ``tcpfallback`` position; it is ignored (dnspython falls back to TCP on truncation).
        ``timeout`` is pyspf's remaining budget; the per-query ``dns.timeout`` still caps it.

        Raises:
            spf.TempError: timeout, SERVFAIL, REFUSED (pyspf maps it to ``temperror``).
        """
        import spf

        qtype = qtype.upper()
        if qtype not in _SPF_QTYPES:
            return []
        try:
            rdatas = self._thd_rrset(name, qtype, timeout)
        except DnsTemporaryError as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        key = (name, qtype)
        if qtype in ("A", "AAAA"):
            if qtype == "AAAA":
                return [(key, str(ipaddress.IPv6Address(r.address))) for r in rdatas]
            return [(key, r.address) for r in rdatas]
        if qtype == "MX":
            return [
                (key, (int(r.preference), r.exchange.to_text(omit_final_dot=True)))
                for r in rdatas
            ]
        if qtype == "PTR":
            return [(key, r.target.to_text(omit_final_dot=True)) for r in rdatas]
        return [(key, tuple(r.strings)) for r in rdatas]


class DkimDnsRecorder:
    """A per-message dkimpy ``dnsfunc`` that remembers which key lookups failed temporarily.

    dkimpy catches ``DnsTimeoutError`` inside ``verify`` and returns ``False``, which would
    turn a DNS outage into ``dkim=fail``. mail.md §2.3 wants ``temperror``, so the verifier
    passes one recorder per signature and checks :attr:`temporary_failures` afterwards.
    """

    def __init__(self, client: DnsClient) -> None:
        self._client = client
        self.temporary_failures: list[bytes | str] = []

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        try:
            return self._client.thd_dkim_dnsfunc(name, timeout=timeout)
        except DkimDnsTemporaryError:
            self.temporary_failures.append(name)
            raise


def install_spf_lookup(client: DnsClient) -> Callable[..., Any]:
    """Point pyspf's module-global ``spf.DNSLookup`` at ``client``; returns the previous hook.

    Call once at startup (and in a test fixture that restores it): pyspf offers no per-query
    hook, so this is process-wide.
    """
    import spf

    previous = spf.DNSLookup
    spf.DNSLookup = client.thd_spf_lookup
    return previous


def restore_spf_lookup(previous: Callable[..., Any]) -> None:
    """Undo :func:`install_spf_lookup` with the hook it returned."""
    import spf

    spf.DNSLookup = previous


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
