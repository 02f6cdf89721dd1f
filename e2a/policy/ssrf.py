"""Webhook URL and address policy (mail.md §4.6): who may e2a's webhook client reach.

A webhook URL is attacker-chosen, and e2a POSTs to it from inside the operator's network, so
the policy runs at registration, at update and again at every attempt:

1. :func:`check_webhook_url` (pure) refuses URLs whose *shape* could reach somewhere internal:
   IP literals in any notation a resolver or HTTP client might accept, userinfo tricks,
   internal-only names.
2. :func:`resolve_webhook_host` resolves the name through the one :class:`DnsClient` and
   refuses the URL when **any** address is non-public (an attacker controls the DNS answer
   and can mix a public and a private address). The checked addresses are returned so the
   caller connects to one of them and never resolves a second time (no DNS rebinding).

``webhooks.allow_private`` (development only) allows IP literals and ``localhost`` names and
skips the address rules, so local test sinks work.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, replace
from urllib.parse import quote

import idna

from e2a.errors import BadRequest
from e2a.mailauth.dns import DnsClient, DnsTemporaryError

__all__ = [
    "MAX_URL_LENGTH",
    "ParsedUrl",
    "check_webhook_url",
    "is_public_address",
    "resolve_webhook_host",
    "validate_webhook_url",
]

MAX_URL_LENGTH = 2048
ERROR_CODE = "invalid_webhook_url"
BLOCKED_ADDRESS = "blocked address"

_URL_RE = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"
    r"(?P<authority>[^/?#]*)"
    r"(?P<path>[^?#]*)"
    r"(?P<query>\?[^#]*)?"
    r"(?P<fragment>#.*)?$",
    re.DOTALL,
)
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_HEX_LABEL_RE = re.compile(r"^0[xX][0-9A-Fa-f]*$")
_LDH_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REFUSED_SUFFIXES = (".localhost", ".local", ".internal", ".arpa")
# Everything printable in ASCII except what quote() must leave alone anyway: non-ASCII in the
# path or query is percent-encoded, ASCII is kept byte for byte.
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))

_REFUSED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_REFUSED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128",
        "::1/128",
        "::/96",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "64:ff9b:1::/48",
        # IPv4-translated (RFC 2765 SIIT, ``::ffff:0:a.b.c.d``), next to the mapped range below:
        # a translator would forward it to the embedded IPv4 address, and no public host has
        # one, so the whole range is refused rather than judged by the address it carries.
        "::ffff:0:0:0/96",
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


@dataclass(frozen=True)
class ParsedUrl:
    """A webhook URL that passed the URL rules.

    ``host`` is normalised (lowercase ASCII/IDNA A-labels, no trailing dot; an IP literal in
    its canonical text form without brackets). ``target`` is path plus query for the request
    line. ``addresses`` is filled by :func:`validate_webhook_url`: the checked addresses to
    connect to.
    """

    url: str
    scheme: str
    host: str
    port: int
    target: str
    ip_literal: bool = False
    addresses: tuple[str, ...] = ()


def _refuse(message: str) -> BadRequest:
    return BadRequest(f"invalid webhook URL: {message}", code=ERROR_CODE)


#: Appended in development to refusals that ``webhooks.allow_private`` would lift: a new
#: operator pointing a webhook at a local receiver otherwise has no clue which key to set.
#: Never in production, where the key is not allowed at all.
ALLOW_PRIVATE_HINT = " (for a local test receiver in development, set webhooks.allow_private: true)"


def _refuse_private(message: str, production: bool) -> BadRequest:
    return _refuse(message if production else message + ALLOW_PRIVATE_HINT)


def _has_forbidden_char(url: str) -> str | None:
    for ch in url:
        if ch == "\\":
            return "backslashes are not allowed"
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            return "whitespace and control characters are not allowed"
    return None


def _looks_like_ipv4(host: str) -> bool:
    """WHATWG "ends in a number": the last label is decimal digits or ``0x`` hex.

    Resolvers (``inet_aton``) and URL parsers read ``127.1``, ``2130706433``, ``0x7f000001``,
    ``0177.0.0.1`` or ``127.0.0.0x1`` as IPv4 addresses; a real DNS name never ends in an
    all-numeric label (no such TLD exists), so refusing these shapes loses nothing.
    """
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]
    last = labels[-1] if labels else ""
    return bool(last) and (last.isdigit() or bool(_HEX_LABEL_RE.match(last)))


def _parse_ipv4_number(part: str) -> int | None:
    if _HEX_LABEL_RE.match(part):
        digits = part[2:]
        return int(digits, 16) if digits else 0
    if not part.isdigit():
        return None
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8) if all(c in "01234567" for c in part) else None
    return int(part)


def _parse_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """Parse every inet_aton/WHATWG IPv4 notation (1-4 parts, dec/oct/hex); None if invalid."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        n = _parse_ipv4_number(part)
        if n is None:
            return None
        numbers.append(n)
    if any(n > 255 for n in numbers[:-1]):
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _split_authority(authority: str) -> tuple[str, str | None, bool]:
    """(host, port text or None, bracketed?) of an authority without userinfo."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _refuse("unterminated IPv6 literal")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest == "":
            return host, None, True
        if not rest.startswith(":"):
            raise _refuse("invalid authority")
        return host, rest[1:], True
    if "]" in authority:
        raise _refuse("invalid authority")
    if authority.count(":") > 1:
        raise _refuse("invalid authority (IPv6 literals need brackets)")
    host, sep, port = authority.partition(":")
    return host, (port if sep else None), False


def _normalise_name(raw: str) -> str:
    """Lowercase + UTS #46 mapping + IDNA A-labels, one trailing dot removed."""
    try:
        mapped = idna.uts46_remap(raw, std3_rules=True, transitional=False)
    except idna.IDNAError as exc:
        raise _refuse(f"invalid host name ({exc})") from None
    if mapped.endswith("."):
        mapped = mapped[:-1]
    if _looks_like_ipv4(mapped):
        raise _IPv4Shaped(mapped)
    labels = mapped.split(".")
    out = []
    for label in labels:
        if not label:
            raise _refuse("invalid host name (empty label)")
        try:
            alabel = idna.alabel(label).decode("ascii") if not label.isascii() else label
        except idna.IDNAError as exc:
            raise _refuse(f"invalid host name ({exc})") from None
        if not _LDH_LABEL_RE.match(alabel):
            raise _refuse("invalid host name")
        if alabel.startswith("xn--"):
            try:
                idna.decode(alabel)
            except idna.IDNAError as exc:
                raise _refuse(f"invalid host name ({exc})") from None
        out.append(alabel)
    name = ".".join(out)
    if len(name) > 253:
        raise _refuse("host name too long")
    return name


class _IPv4Shaped(Exception):
    """Internal: the host (after mapping) is IPv4-shaped; carries the mapped text."""


def _is_localhost(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


def check_webhook_url(url: str, *, production: bool, allow_private: bool) -> ParsedUrl:
    """Apply the URL rules of mail.md §4.6 and return the normalised URL.

    ``allow_private`` (development only) additionally accepts IP literals and ``localhost``
    names; every syntax rule still applies.

    Raises:
        BadRequest: code ``invalid_webhook_url``, message naming the broken rule.
    """
    if not isinstance(url, str) or not url:
        raise _refuse("a URL is required")
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"longer than {MAX_URL_LENGTH} characters")
    problem = _has_forbidden_char(url)
    if problem:
        raise _refuse(problem)
    m = _URL_RE.match(url)
    if m is None:
        raise _refuse("must be an absolute http(s) URL")
    scheme = m.group("scheme").lower()
    allowed = ("https",) if production else ("http", "https")
    if scheme not in allowed:
        raise _refuse("scheme must be https" if production else "scheme must be http or https")
    if m.group("fragment") is not None:
        raise _refuse("fragments are not allowed")
    authority = m.group("authority")
    if "@" in authority:
        raise _refuse("user information is not allowed")
    if "%" in authority:
        # Percent-encoded hosts ("%31%32%37.0.0.1") and zone ids ("[fe80::1%25eth0]") are
        # decoded differently by different clients; refusing them keeps one reading.
        raise _refuse("percent-encoding and zone ids are not allowed in the host")
    host_text, port_text, bracketed = _split_authority(authority)
    if not host_text:
        raise _refuse("a host is required")

    if port_text is None:
        port = _DEFAULT_PORTS[scheme]
    else:
        if not _PORT_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
            raise _refuse("invalid port")
        port = int(port_text)

    ip_literal = False
    if bracketed:
        try:
            address = ipaddress.IPv6Address(host_text)
        except ValueError:
            raise _refuse("invalid IPv6 literal") from None
        if not allow_private:
            raise _refuse_private("IP address literals are not allowed; use a DNS name", production)
        host, ip_literal = str(address), True
    else:
        try:
            host = _normalise_name(host_text)
        except _IPv4Shaped as shaped:
            if not allow_private:
                raise _refuse_private("IP address literals are not allowed; use a DNS name", production) from None
            v4 = _parse_ipv4_literal(str(shaped))
            if v4 is None:
                raise _refuse("invalid IPv4 literal") from None
            host, ip_literal = str(v4), True
        if not ip_literal:
            if _is_localhost(host):
                if not allow_private:
                    raise _refuse_private(f"host {host!r} is not allowed", production)
            else:
                if "." not in host:
                    raise _refuse("host must be a fully qualified name (at least two labels)")
                if host.endswith(_REFUSED_SUFFIXES):
                    raise _refuse(f"host {host!r} is not allowed (internal name)")

    target = quote(m.group("path") or "/", safe=_PATH_SAFE)
    if not target.startswith("/"):
        target = "/" + target
    query = m.group("query")
    if query is not None:
        target += quote(query, safe=_PATH_SAFE)
    host_part = f"[{host}]" if ":" in host else host
    port_part = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    normalised = f"{scheme}://{host_part}{port_part}{target}"
    return ParsedUrl(
        url=normalised, scheme=scheme, host=host, port=port, target=target,
        ip_literal=ip_literal,
    )


def is_public_address(ip: str) -> bool:
    """True when ``ip`` lies in none of the refused ranges of mail.md §4.6.

    Mapped (``::ffff:0:0/96``), NAT64 (``64:ff9b::/96``) and 6to4 (``2002::/16``) addresses
    are judged by the IPv4 address they carry, since that is where packets end up.
    Unparseable input is not public.
    """
    try:
        address = ipaddress.ip_address(ip.strip("[]") if isinstance(ip, str) else ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in net for net in _REFUSED_V4)
    if address.scope_id:
        return False
    if address in _MAPPED or address in _NAT64:
        return is_public_address(str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)))
    if address in _SIX_TO_FOUR:
        return is_public_address(str(ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)))
    return not any(address in net for net in _REFUSED_V6)


async def resolve_webhook_host(
    dns: DnsClient, host: str, *, allow_private: bool
) -> list[str]:
    """Resolve ``host`` (A and AAAA via ``dns``) and apply the address rules.

    ``host`` is a :attr:`ParsedUrl.host`. Returns the addresses to connect to (pin one; never
    resolve again for the attempt). With ``allow_private`` the address rules are skipped, an
    IP literal is returned as is and ``localhost`` names give the loopback addresses without
    asking DNS (RFC 6761).

    Raises:
        BadRequest: ``invalid_webhook_url`` when the name does not resolve, DNS fails
            temporarily (``__cause__`` is the :class:`DnsTemporaryError`) or any address is
            refused (message starts with ``blocked address``).
    """
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None or _is_localhost(host):
        if not allow_private:
            raise _refuse(f"{BLOCKED_ADDRESS}: {host}")
        return [str(literal)] if literal is not None else ["127.0.0.1", "::1"]
    try:
        addresses = await dns.lookup_addresses(host)
    except DnsTemporaryError as exc:
        raise _refuse(f"host {host} could not be resolved (temporary DNS failure)") from exc
    if not addresses:
        raise _refuse(f"host {host} does not resolve")
    if not allow_private:
        blocked = [a for a in addresses if not is_public_address(a)]
        if blocked:
            raise BadRequest(
                f"{BLOCKED_ADDRESS}: {host} resolves to a non-public address ({blocked[0]})",
                code=ERROR_CODE,
            )
    return addresses


async def validate_webhook_url(
    dns: DnsClient, url: str, *, production: bool, allow_private: bool
) -> ParsedUrl:
    """URL rules then address rules, for the API's create/update; addresses filled in.

    Raises:
        BadRequest: ``invalid_webhook_url``.
    """
    parsed = check_webhook_url(url, production=production, allow_private=allow_private)
    try:
        addresses = await resolve_webhook_host(dns, parsed.host, allow_private=allow_private)
    except BadRequest as exc:
        if production or BLOCKED_ADDRESS not in exc.message:
            raise
        raise BadRequest(exc.message + ALLOW_PRIVATE_HINT, code=ERROR_CODE) from exc.__cause__
    return replace(parsed, addresses=tuple(addresses))
