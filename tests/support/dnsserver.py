"""A loopback DNS zone served by twisted.names from a Python dict, for tests.

Usage::

    handle = await start_dns_server(reactor, {
        "example.com": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"], "MX": [(10, "mx.example.com")],
                        "A": ["127.0.0.1"], "AAAA": ["::1"]},
        "alias.example.com": {"CNAME": "example.com"},
        "broken.example": "SERVFAIL",            # every type answers SERVFAIL
        "slow.example": "TIMEOUT",               # never answers
        "half.example": {"A": ["192.0.2.1"], "AAAA": "SERVFAIL"},   # per-type modes
    })
    client = DnsClient(handle.nameservers, timeout=1, reactor=reactor)
    ...
    await handle.stop()

Names not in the dict answer NXDOMAIN; a known name without the asked type answers NOERROR
with no data. Modes: ``"SERVFAIL"``, ``"REFUSED"``, ``"TIMEOUT"`` (whole name or per type).
TXT values: a ``str``/``bytes`` is one record, split into 255-byte strings when longer (DKIM
keys); a ``list``/``tuple`` of ``str``/``bytes`` is one record with exactly those strings.
UDP and TCP listen on the same random port of 127.0.0.1, so truncated answers can be retried
over TCP as real clients do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import common, server
from twisted.names import dns as twdns
from twisted.names import error as twerror

__all__ = ["DnsServerHandle", "start_dns_server", "split_txt"]

_MODES = ("SERVFAIL", "REFUSED", "TIMEOUT")
_TYPES = {
    twdns.A: "A",
    twdns.AAAA: "AAAA",
    twdns.MX: "MX",
    twdns.TXT: "TXT",
    twdns.CNAME: "CNAME",
    twdns.PTR: "PTR",
    twdns.SPF: "SPF",
    twdns.NS: "NS",
    twdns.SOA: "SOA",
}


class _ServFail(Exception):
    pass


class _Refused(Exception):
    pass


def split_txt(value: str | bytes) -> list[bytes]:
    """One TXT record as character-strings of at most 255 bytes (RFC 1035 §3.3.14)."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not data:
        return [b""]
    return [data[i : i + 255] for i in range(0, len(data), 255)]


def _txt_strings(value: Any) -> list[bytes]:
    if isinstance(value, (list, tuple)):
        return [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
    return split_txt(value)


def _norm(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.rstrip(".").lower()


class _DictZone(common.ResolverBase):
    """An authority answering from the handle's dict; raises marker errors for the modes."""

    def __init__(self, handle: DnsServerHandle) -> None:
        super().__init__()
        self._handle = handle

    def _lookup(self, name, cls, type, timeout):  # noqa: A002 - twisted's signature
        h = self._handle
        qname = _norm(name)
        type_name = _TYPES.get(type, str(type))
        h.queries.append((qname, type_name))
        try:
            answers = h._answers(qname, type, depth=0)
        except (_ServFail, _Refused, twerror.DomainError) as exc:
            return defer.fail(exc)
        if answers is None:  # TIMEOUT: keep the query unanswered
            d: defer.Deferred[Any] = defer.Deferred()
            h._hanging.append(d)
            return d
        return defer.succeed((answers, [], []))


class _ZoneServerFactory(server.DNSServerFactory):
    """Maps the marker errors to SERVFAIL/REFUSED without logging them as test errors."""

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(_ServFail, _Refused):
            rcode = twdns.EREFUSED if failure.check(_Refused) else twdns.ESERVER
            response = self._responseFromMessage(message=message, rCode=rcode)
            self.sendReply(protocol, response, address)
            return None
        return super().gotResolverError(failure, protocol, message, address)


class DnsServerHandle:
    """A running loopback zone: read ``port``/``nameservers``, change records, ``stop()``."""

    def __init__(self, records: Mapping[str, Any], ttl: int) -> None:
        self.ttl = ttl
        self.records: dict[str, Any] = {}
        self.queries: list[tuple[str, str]] = []  # (name, type) in arrival order
        self._hanging: list[defer.Deferred[Any]] = []
        self._udp: Any = None
        self._tcp: Any = None
        self.port = 0
        self.set(records)

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", self.port)]

    def set(self, records: Mapping[str, Any]) -> None:
        """Replace the whole zone."""
        self.records = {}
        for name, value in records.items():
            self.records[_norm(name)] = (
                value if isinstance(value, str) else {k.upper(): v for k, v in value.items()}
            )

    def add(self, name: str, rtype: str, value: Any) -> None:
        """Add one value (or a mode string) for ``name``/``rtype``; keeps what is there."""
        key = _norm(name)
        rtype = rtype.upper()
        entry = self.records.get(key)
        if not isinstance(entry, dict):
            entry = {}
            self.records[key] = entry
        if isinstance(value, str) and value in _MODES:
            entry[rtype] = value
        elif rtype == "CNAME":
            entry[rtype] = value
        else:
            current = entry.get(rtype)
            if not isinstance(current, list):
                current = []
            current.append(value)
            entry[rtype] = current

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drop a name (NXDOMAIN afterwards) or one of its types (no data afterwards)."""
        key = _norm(name)
        if rtype is None:
            self.records.pop(key, None)
        elif isinstance(self.records.get(key), dict):
            self.records[key].pop(rtype.upper(), None)

    def _answers(self, qname: str, qtype: int, depth: int) -> list[twdns.RRHeader] | None:
        entry = self.records.get(qname)
        if entry is None:
            raise twerror.DomainError(qname)
        if isinstance(entry, str):
            return self._mode(entry)
        type_name = _TYPES.get(qtype)
        if "CNAME" in entry and qtype != twdns.CNAME and depth < 8:
            target = _norm(entry["CNAME"])
            head = twdns.RRHeader(
                name=qname, type=twdns.CNAME, ttl=self.ttl, auth=True,
                payload=twdns.Record_CNAME(target, ttl=self.ttl),
            )
            try:
                rest = self._answers(target, qtype, depth + 1)
            except twerror.DomainError:
                rest = []
            return None if rest is None else [head, *rest]
        values = entry.get(type_name) if type_name else None
        if values is None:
            return []
        if isinstance(values, str) and values in _MODES:
            return self._mode(values)
        if type_name == "CNAME":
            values = [values]
        return [
            twdns.RRHeader(name=qname, type=qtype, ttl=self.ttl, auth=True,
                           payload=self._payload(type_name, v))
            for v in values
        ]

    def _mode(self, mode: str) -> None:
        if mode == "SERVFAIL":
            raise _ServFail()
        if mode == "REFUSED":
            raise _Refused()
        if mode == "TIMEOUT":
            return None
        raise ValueError(f"unknown mode {mode!r}")

    def _payload(self, type_name: str, value: Any) -> Any:
        ttl = self.ttl
        if type_name == "A":
            return twdns.Record_A(str(ipaddress.IPv4Address(value)), ttl=ttl)
        if type_name == "AAAA":
            return twdns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl=ttl)
        if type_name == "MX":
            preference, host = value
            return twdns.Record_MX(int(preference), host, ttl=ttl)
        if type_name in ("TXT", "SPF"):
            cls = twdns.Record_TXT if type_name == "TXT" else twdns.Record_SPF
            return cls(*_txt_strings(value), ttl=ttl)
        if type_name == "CNAME":
            return twdns.Record_CNAME(value, ttl=ttl)
        if type_name == "PTR":
            return twdns.Record_PTR(value, ttl=ttl)
        if type_name == "NS":
            return twdns.Record_NS(value, ttl=ttl)
        raise ValueError(f"unsupported record type {type_name}")

    async def stop(self) -> None:
        """Close both ports; unanswered (TIMEOUT) queries are dropped, never answered."""
        self._hanging.clear()
        if self._udp is not None:
            await defer.maybeDeferred(self._udp.stopListening)
            self._udp = None
        if self._tcp is not None:
            await defer.maybeDeferred(self._tcp.stopListening)
            self._tcp = None


async def start_dns_server(
    reactor: Any, records: Mapping[str, Any], *, ttl: int = 60
) -> DnsServerHandle:
    """Serve ``records`` on 127.0.0.1, UDP and TCP on one random port.

    ``ttl`` is put on every answer; clients with caches (DnsClient's thread side) keep
    answers that long, so tests that change records and re-read them through ``thd_*`` use a
    fresh client, ``DnsClient.flush_cache()`` or ``ttl=0``.
    """
    handle = DnsServerHandle(records, ttl)
    factory = _ZoneServerFactory(authorities=[_DictZone(handle)], verbose=0)
    for _attempt in range(20):
        udp = reactor.listenUDP(0, twdns.DNSDatagramProtocol(controller=factory),
                                interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            await defer.maybeDeferred(udp.stopListening)
            continue
        handle._udp, handle._tcp, handle.port = udp, tcp, port
        return handle
    raise RuntimeError("could not bind UDP and TCP to the same loopback port")
