"""The outcome of authenticating one inbound message (mail.md §2) and the pure rules behind it.

Everything here is pure: no DNS, no threads, no clock. ``verify.py`` gathers the raw facts
(pyspf's result, one dkimpy result per signature, the DMARC TXT records it fetched) and
:func:`build_verdict` turns them into a :class:`Verdict`. Keeping the decisions here lets the
table tests pin every rule of §2.1–§2.5 without a DNS server.

DMARC is computed here rather than with ``authheaders``: the spec demands current Public
Suffix data, and ``authheaders`` pins a 2019 ``publicsuffix2`` snapshot (see docs/mailauth.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from publicsuffixlist import PublicSuffixList

from e2a.mailsyntax.domains import is_domain_name
from e2a.mailsyntax.headers import HeaderField, field_value, split_header_section

__all__ = [
    "DMARC_FOUND",
    "DMARC_MALFORMED",
    "DMARC_NONE",
    "DMARC_TEMPERROR",
    "DkimResult",
    "DmarcLookup",
    "DmarcPolicy",
    "Verdict",
    "aligns",
    "authentication_results_clauses",
    "build_verdict",
    "dkim_summary",
    "dmarc_result",
    "from_address_of",
    "from_address_of_fields",
    "is_dmarc_record",
    "is_domain_name",
    "mail_from_domain",
    "organizational_domain",
    "parse_dmarc_record",
    "parse_mailbox",
    "select_dmarc_record",
    "sender_value",
    "signed_sender",
    "spf_to_e2a",
]

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# ---------------------------------------------------------------- SPF (§2.2)

_SPF_MAP = {
    "pass": "pass",
    "fail": "fail",
    "softfail": "fail",
    "neutral": "none",
    "none": "none",
    "temperror": "temperror",
    "permerror": "permerror",
}


def spf_to_e2a(result: str) -> str:
    """The §2.2 mapping of an RFC 7208 result to the ``spf=`` value of Domain-Check.

    Raises:
        ValueError: ``result`` is not one of the seven RFC 7208 results.
    """
    try:
        return _SPF_MAP[result]
    except KeyError:
        raise ValueError(f"unknown SPF result {result!r}") from None


# ---------------------------------------------------------------- DKIM (§2.3)


class DkimResult(NamedTuple):
    """One evaluated ``DKIM-Signature``: RFC 8601 result (``pass``, ``fail``, ``policy``,
    ``temperror``, ``permerror`` or ``none`` for a testing key), ``d=`` (lowercased) and
    ``s=``; empty strings when the signature did not carry them. Same shape as
    ``authheaders.DkimClause``, so it goes straight into ``trace_headers``."""

    result: str
    domain: str = ""
    selector: str = ""


def dkim_summary(results: Sequence[DkimResult | tuple[str, str, str]]) -> str:
    """§2.3 summary: pass > temperror > fail (fail or policy) > permerror > none.

    A ``policy`` signature (``l=`` shorter than the body) never counts as a pass; a testing
    signature (``none``) counts as no signature at all.
    """
    seen = {r[0] for r in results}
    if "pass" in seen:
        return "pass"
    if "temperror" in seen:
        return "temperror"
    if "fail" in seen or "policy" in seen:
        return "fail"
    if "permerror" in seen:
        return "permerror"
    return "none"


# ---------------------------------------------------------------- From address (§2.1)

_WSP_CHARS = " \t\r\n"
_SPECIALS = "<>@,:;.[]"
_ATEXT_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_ENCODED_WORD_RE = re.compile(r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")


class _Token(NamedTuple):
    kind: str  # "atom", "qs" (quoted-string), "dl" (domain-literal) or the special itself
    text: str  # as sent (a quoted-string keeps its quotes and quoted-pairs)
    gap: bool  # folding whitespace or a comment came right before it


def _tokenize(value: str) -> list[_Token] | None:
    """RFC 5322 lexical tokens of a header value, comments and whitespace dropped.

    Returns None for anything that does not lex (unbalanced comment, unterminated
    quoted-string or domain-literal, stray ``)`` or backslash). Non-ASCII characters are
    accepted inside atoms (RFC 6532 display names); the address rules reject them later.
    """
    tokens: list[_Token] = []
    i, n = 0, len(value)
    gap = False
    while i < n:
        c = value[i]
        if c in _WSP_CHARS:
            gap = True
            i += 1
        elif c == "(":
            depth = 0
            while i < n:
                c = value[i]
                if c == "\\":
                    i += 2
                    continue
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= n:
                return None
            i += 1
            gap = True
        elif c == '"':
            j = i + 1
            while j < n and value[j] != '"':
                j += 2 if value[j] == "\\" else 1
            if j >= n:
                return None
            tokens.append(_Token("qs", value[i : j + 1], gap))
            i, gap = j + 1, False
        elif c == "[":
            j = value.find("]", i + 1)
            if j < 0:
                return None
            tokens.append(_Token("dl", value[i : j + 1], gap))
            i, gap = j + 1, False
        elif c in _SPECIALS:
            tokens.append(_Token(c, c, gap))
            i, gap = i + 1, False
        elif c in ')\\"':
            return None
        else:
            j = i
            while j < n and value[j] not in _WSP_CHARS and value[j] not in _SPECIALS + '()\\"':
                j += 1
            tokens.append(_Token("atom", value[i:j], gap))
            i, gap = j, False
    return tokens


def _quoted_local_ok(text: str) -> bool:
    """A quoted-string local part: printable ASCII (space included), not empty."""
    inner = text[1:-1]
    if not inner:
        return False
    return all(" " <= ch <= "~" for ch in inner)


def _dot_atom(tokens: Sequence[_Token]) -> str | None:
    """``atom *("." atom)`` with nothing between the pieces (no obsolete CFWS), or None."""
    if not tokens or len(tokens) % 2 == 0:
        return None
    parts = []
    for k, tok in enumerate(tokens):
        if k and tok.gap:
            return None
        want = "atom" if k % 2 == 0 else "."
        if tok.kind != want:
            return None
        parts.append(tok.text)
    return "".join(parts)


def _addr_spec(tokens: Sequence[_Token]) -> str | None:
    """``local-part "@" domain`` → ``local@domain`` (domain lowercased) or None."""
    ats = [k for k, t in enumerate(tokens) if t.kind == "@"]
    if len(ats) != 1:
        return None
    k = ats[0]
    local_toks, domain_toks = tokens[:k], tokens[k + 1 :]
    if len(local_toks) == 1 and local_toks[0].kind == "qs":
        local = local_toks[0].text
        if not _quoted_local_ok(local):
            return None
    else:
        local = _dot_atom(local_toks)
        if local is None:
            return None
    domain = _dot_atom(domain_toks)  # a domain-literal is no DNS domain: DMARC cannot use it
    if domain is None or not is_domain_name(domain):
        return None
    address = f"{local}@{domain.lower()}"
    if not all("!" <= ch <= "~" or ch == " " for ch in address):
        return None
    if _ENCODED_WORD_RE.search(address):
        return None
    return address


def parse_mailbox(value: str) -> str | None:
    """The address of a header value holding exactly one RFC 5322 mailbox, else None.

    Refused: empty, unparseable, more than one mailbox, a group, a route (obsolete
    ``<@relay:addr>``), a domain-literal, obsolete whitespace inside the address, an
    address that is not printable ASCII or that is (or contains) an encoded-word. The
    domain comes back lowercased, the local part exactly as sent. Display names may be
    anything that lexes, encoded-words and UTF-8 included: only the address is judged.
    """
    tokens = _tokenize(value)
    if not tokens:
        return None
    kinds = [t.kind for t in tokens]
    if any(k in kinds for k in (",", ":", ";")):  # several mailboxes, group, route
        return None
    if "<" in kinds or ">" in kinds:
        if kinds.count("<") != 1 or kinds.count(">") != 1:
            return None
        lt, gt = kinds.index("<"), kinds.index(">")
        if gt != len(tokens) - 1 or gt < lt:
            return None
        if any(t.kind not in ("atom", "qs", ".") for t in tokens[:lt]):  # display-name phrase
            return None
        return _addr_spec(tokens[lt + 1 : gt])
    return _addr_spec(tokens)


def from_address_of(raw: bytes) -> str | None:
    """§2.1 From address of a message, or None when it is not valid.

    Valid only when the top-level header has exactly one ``From`` field and that field
    holds exactly one mailbox accepted by :func:`parse_mailbox`.
    """
    fields, _ = split_header_section(raw)
    return from_address_of_fields(fields)


def from_address_of_fields(fields: Sequence[HeaderField]) -> str | None:
    """:func:`from_address_of` for a header section already split with
    :func:`~e2a.mailsyntax.headers.split_header_section`: the one §2.1 rule, so callers
    that parsed the header section already (the inbound pipeline) need not parse it again."""
    froms = [f for f in fields if f.name is not None and f.name.lower() == b"from"]
    if len(froms) != 1:
        return None
    text = field_value(froms[0]).decode("utf-8", "surrogateescape")
    return parse_mailbox(text)


def mail_from_domain(mail_from: str, helo: str) -> str:
    """The SPF identity's domain: MAIL FROM's domain, the HELO name for the null sender.

    Lowercased, trailing dot dropped; ``""`` when MAIL FROM has no ``@``.
    """
    if not mail_from:
        return helo.strip().rstrip(".").lower()
    local, at, domain = mail_from.rpartition("@")
    if not at:
        return ""
    return domain.strip().rstrip(".").lower()


def sender_value(from_address: str | None, mail_from: str) -> str:
    """§2.5 Sender: the From address; else the MAIL FROM address; ``""`` for neither (and for
    anything that is not printable ASCII, which the signed header cannot carry)."""
    sender = from_address or mail_from or ""
    return sender if sender.isascii() and sender.isprintable() else ""


def signed_sender(verdict: Verdict, mail_from: str) -> str:
    """:func:`sender_value` of a verdict."""
    return sender_value(verdict.from_address, mail_from)


# ---------------------------------------------------------------- organisational domain, alignment


@functools.lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # Built once (parsing the list takes ~0.1 s); read-only afterwards, so threads share it.
    # Default: ICANN and private sections, unknown TLDs act as public suffixes ("*" rule).
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """§2.4 item 2: public suffix + one label (ICANN and private PSL sections).

    A domain that is itself a public suffix is its own organisational domain.
    Memoised (bounded): the PSL walk is pure and runs several times per message (alignment
    of SPF and every DKIM ``d=``, the DMARC fallback), mostly for the same few domains.
    """
    d = domain.strip().rstrip(".").lower()
    if not d:
        return d
    return _psl().privatesuffix(d) or d


def aligns(identifier: str, from_domain: str, mode: str) -> bool:
    """§2.4 item 4: strict (``s``) = identical domain; relaxed (``r``) = same org domain.

    Only syntactically valid domain names align: an IP literal HELO or a garbled ``d=``
    never does.
    """
    a = identifier.strip().rstrip(".").lower()
    b = from_domain.strip().rstrip(".").lower()
    if not (is_domain_name(a) and is_domain_name(b)):
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


# ---------------------------------------------------------------- DMARC record (§2.4 item 3)

DMARC_FOUND = "found"
DMARC_NONE = "none"
DMARC_MALFORMED = "malformed"
DMARC_TEMPERROR = "temperror"

_DMARC_V_RE = re.compile(rb"v[ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")
_DMARC_TAG_RE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*?)[ \t]*")
_POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class DmarcPolicy:
    """The parts of a DMARC record e2a uses. ``p`` is informational: e2a tags, it never
    rejects (§2.4 item 3)."""

    p: str
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True)
class DmarcLookup:
    """What policy discovery found: ``status`` is one of ``found`` (``policy`` set),
    ``none``, ``malformed`` or ``temperror``."""

    status: str
    policy: DmarcPolicy | None = None


def is_dmarc_record(txt: bytes) -> bool:
    """A TXT record that starts with the ``v=DMARC1`` tag (RFC 7489 §6.6.3 step 2)."""
    return _DMARC_V_RE.match(txt) is not None


def parse_dmarc_record(txt: bytes) -> DmarcPolicy | None:
    """Parse a ``v=DMARC1`` record; None when malformed.

    Malformed: not ASCII, a piece that is not ``tag=value``, a repeated tag, ``p`` missing
    or not none/quarantine/reject, ``sp`` present and invalid, ``adkim``/``aspf`` not
    ``r``/``s``. Unknown tags are ignored (RFC 7489 §6.3). Tag values are compared
    case-insensitively.
    """
    if not is_dmarc_record(txt):
        return None
    try:
        text = txt.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for piece in text.split(";"):
        piece = piece.strip(" \t")
        if not piece:
            continue
        m = _DMARC_TAG_RE.fullmatch(piece)
        if m is None:
            return None
        name = m.group(1).lower()
        if name in tags:
            return None
        tags[name] = m.group(2)
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        return None
    if "sp" in tags and tags["sp"].lower() not in _POLICIES:
        return None
    modes = {}
    for name in ("adkim", "aspf"):
        value = tags.get(name, "r").lower()
        if value not in ("r", "s"):
            return None
        modes[name] = value
    return DmarcPolicy(p=p, **modes)


def select_dmarc_record(txts: Sequence[bytes]) -> DmarcLookup | None:
    """Pick the policy out of the TXT records at one ``_dmarc`` name.

    None when no record starts with ``v=DMARC1`` (the caller then asks the organisational
    domain); ``none`` when several do (§2.4 item 3: treated as none, and RFC 7489 §6.6.3
    stops discovery there); otherwise ``found`` or ``malformed``.
    """
    candidates = [t for t in txts if is_dmarc_record(t)]
    if not candidates:
        return None
    if len(candidates) > 1:
        return DmarcLookup(DMARC_NONE)
    policy = parse_dmarc_record(candidates[0])
    if policy is None:
        return DmarcLookup(DMARC_MALFORMED)
    return DmarcLookup(DMARC_FOUND, policy)


def dmarc_result(
    *,
    from_valid: bool,
    lookup: DmarcLookup,
    spf_aligned: bool,
    dkim_aligned: bool,
    spf_temperror: bool,
    dkim_temperror: bool,
) -> str:
    """§2.4 items 1 and 5, first match wins.

    ``dkim_temperror`` is true when *any* evaluated signature had a temporary error: that
    signature might have been the aligned pass, so the result is not a definite fail.
    """
    if not from_valid:
        return "permerror"
    if lookup.status == DMARC_TEMPERROR:
        return "temperror"
    if lookup.status == DMARC_NONE:
        return "none"
    if lookup.status == DMARC_MALFORMED:
        return "permerror"
    if spf_aligned or dkim_aligned:
        return "pass"
    if spf_temperror or dkim_temperror:
        return "temperror"
    return "fail"


# ---------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """Authentication of one inbound message (mail.md §2).

    Attributes:
        spf: RFC 7208/8601 result (``pass`` … ``permerror``).
        spf_e2a: the §2.2 mapping used in Domain-Check.
        dkim_signatures: one :class:`DkimResult` per evaluated signature (first 10).
        dkim: the §2.3 summary.
        dmarc: the §2.4 result.
        from_domain / from_address: §2.1; None when the From address is invalid.
        spf_aligned / dkim_aligned: §2.4 item 4 with the record's modes (relaxed without one).
        aligned: §2.4 item 6.
        verified: §2.5 Verified (= aligned).
    """

    spf: str
    spf_e2a: str
    dkim_signatures: tuple[DkimResult, ...]
    dkim: str
    dmarc: str
    from_domain: str | None
    from_address: str | None
    spf_aligned: bool
    dkim_aligned: bool
    aligned: bool
    verified: bool

    def domain_check(self) -> str:
        """``X-E2A-Auth-Domain-Check``: ``spf=<r>; dkim=<r>; dmarc=<r>`` (§2.5)."""
        return f"spf={self.spf_e2a}; dkim={self.dkim}; dmarc={self.dmarc}"


def build_verdict(
    *,
    spf: str,
    dkim_signatures: Sequence[DkimResult | tuple[str, str, str]],
    from_address: str | None,
    mail_from: str,
    helo: str,
    dmarc_lookup: DmarcLookup,
) -> Verdict:
    """Combine the raw results into a :class:`Verdict` (§2.2–§2.5).

    ``dmarc_lookup`` is ignored when ``from_address`` is None (no policy can be looked up
    without a From domain).
    """
    sigs = tuple(DkimResult(*s) for s in dkim_signatures)
    from_domain = from_address.rpartition("@")[2] if from_address else None
    policy = dmarc_lookup.policy if dmarc_lookup.status == DMARC_FOUND else None
    aspf = policy.aspf if policy else "r"
    adkim = policy.adkim if policy else "r"
    spf_aligned = bool(
        from_domain and spf == "pass" and aligns(mail_from_domain(mail_from, helo), from_domain, aspf)
    )
    dkim_aligned = bool(
        from_domain
        and any(s.result == "pass" and aligns(s.domain, from_domain, adkim) for s in sigs)
    )
    aligned = spf_aligned or dkim_aligned
    dmarc = dmarc_result(
        from_valid=from_domain is not None,
        lookup=dmarc_lookup,
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
        spf_temperror=spf == "temperror",
        dkim_temperror=any(s.result == "temperror" for s in sigs),
    )
    return Verdict(
        spf=spf,
        spf_e2a=spf_to_e2a(spf),
        dkim_signatures=sigs,
        dkim=dkim_summary(sigs),
        dmarc=dmarc,
        from_domain=from_domain,
        from_address=from_address,
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
        aligned=aligned,
        verified=aligned,
    )


def authentication_results_clauses(verdict: Verdict, mail_from: str, helo: str) -> dict[str, Any]:
    """The ``Authentication-Results`` part of ``authheaders.trace_headers``' keywords (§1.8).

    Returns ``mail_from``, ``helo``, ``spf``, ``dkim`` (one ``(result, d, s)`` per
    evaluated signature; empty → ``dkim=none``; ``policy`` → ``(partial body)``),
    ``dmarc`` and ``from_domain`` (None omits ``header.from``). Use as
    ``trace_headers(**clauses, authserv_id=…, client_ip=…, smtp_domain=…, protocol=…,
    message_id=…, recipient=…, date=…)``.
    """
    return {
        "mail_from": mail_from,
        "helo": helo,
        "spf": verdict.spf,
        "dkim": list(verdict.dkim_signatures),
        "dmarc": verdict.dmarc,
        "from_domain": verdict.from_domain,
    }
