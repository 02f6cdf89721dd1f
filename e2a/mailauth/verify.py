"""SPF + DKIM + DMARC for one inbound message → :class:`~e2a.mailauth.verdict.Verdict` (mail.md §2).

pyspf and dkimpy block on DNS, so :meth:`MailVerifier.verify` runs :meth:`MailVerifier.thd_verify`
on the bounded :class:`~e2a.workers.WorkerPool` its owner starts and stops; nothing here
touches the reactor from a thread. Every DNS query goes through the injected :class:`~e2a.mailauth.dns.DnsClient`
(dkimpy per call through ``dnsfunc``, pyspf through its module-global hook), so
``dns.nameservers`` is the only resolver ever asked.

The libraries report less than §2.3 needs (dkimpy folds a missing key, a revoked key, a
malformed key record and a DNS timeout into one ``False``), so this module inspects the
signature tags and fetches the key record itself, then verifies against that very record.
The decisions from the raw results onward live in ``verdict.py``.

Why DKIM verification is not a plain ``dkim.DKIM(raw).verify()``: on the ingest path that call
was most of e2a's CPU per message (docs/performance.md). dkimpy re-splits the whole message
with a regex, canonicalises the body in Python and verifies RSA with pure-Python big-int and
ASN.1 code, re-parsing the key record every time. :class:`DkimMessage` follows dkimpy's
``verify`` step by step (same helpers for tag validation, header selection and header
canonicalisation, same exception → result mapping) but lets dkimpy parse only the header
section, hashes the body with C-speed bytes operations, and checks RSA signatures with
``cryptography`` (OpenSSL) against a public key parsed once per key record. A signature that
OpenSSL does not accept is re-checked with dkimpy's own RSA code, so the verdict is dkimpy's
whenever the two could differ (malleable or odd-length signatures); OpenSSL accepting implies
dkimpy accepting (both demand the exact EMSA-PKCS1-v1_5 encoding).
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import dkim
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import DigestTooLargeError, RSASSA_PKCS1_v1_5_verify
from dkim.util import InvalidTagValueList, parse_tag_value

from twisted.logger import Logger

from e2a.mailauth.dns import (
    DkimDnsTemporaryError,
    DnsClient,
    DnsTemporaryError,
    install_spf_lookup,
    restore_spf_lookup,
)
from e2a.mailauth.verdict import (
    DMARC_NONE,
    DMARC_TEMPERROR,
    SPF_RESULTS,
    DkimResult,
    DmarcLookup,
    Verdict,
    build_verdict,
    from_address_of,
    from_address_of_fields,
    is_domain_name,
    mail_from_domain,
    organizational_domain,
    select_dmarc_record,
)
from e2a.mailsyntax.headers import HeaderField
from e2a.workers import WorkerPool

__all__ = ["MAX_DKIM_SIGNATURES", "DkimMessage", "MailVerifier"]

log = Logger()

#: §2.3: at most this many DKIM-Signature fields are verified per message.
MAX_DKIM_SIGNATURES = 10
#: RFC 8301: RSA keys below this size never verify.
MIN_RSA_BITS = 1024

_spf_hook_lock = threading.Lock()


class MailVerifier:
    """Authenticates inbound messages on a bounded thread pool.

    Args:
        dns: the resolver seam; the only DNS any check uses.
        pool: a started :class:`~e2a.workers.WorkerPool` owned by a service (never the reactor's).
        reactor: for the default ``now``.
        spf_timeout: seconds for one whole SPF evaluation (§2.2: 20 s → ``temperror``).

    Constructing a verifier points pyspf's process-wide DNS hook at ``dns``
    (``install_spf_lookup``); :meth:`close` puts the previous hook back.
    """

    #: :meth:`verify` takes ``header_fields`` (the inbound pipeline checks this flag, so
    #: verifiers with the plain four-argument ``verify`` keep working).

    def __init__(
        self,
        dns: DnsClient,
        pool: WorkerPool,
        reactor: Any,
        spf_timeout: float = 20.0,
        budget: float | None = None,
    ) -> None:
        # ``budget``: seconds from submission after which a verification stops asking DNS and
        # reports what it has not checked as ``temperror``. A call in a worker thread cannot be
        # cancelled, so without it a few senders with slow DNS (10 DKIM keys × 5 s + SPF 20 s)
        # could keep every pool thread busy long after SMTP answered 451.
        self._budget = budget
        self._dns = dns
        self._pool = pool
        self._reactor = reactor
        self._spf_timeout = float(spf_timeout)
        with _spf_hook_lock:
            self._previous_spf_lookup = install_spf_lookup(dns)

    def close(self) -> None:
        """Restore pyspf's DNS hook as it was before this verifier (service stop, tests)."""
        with _spf_hook_lock:
            if spf.DNSLookup == self._dns.thd_spf_lookup:
                restore_spf_lookup(self._previous_spf_lookup)

    async def verify(
        self,
        raw: bytes,
        client_ip: str,
        helo: str,
        mail_from: str,
        now: float | None = None,
        header_fields: Sequence[HeaderField] | None = None,
        crlf_only: bool = False,
    ) -> Verdict:
        """Authenticate ``raw`` (the received bytes, CRLF) on the thread pool.

        ``mail_from`` is the reverse-path without brackets, ``""`` for the null sender.
        ``now`` (POSIX seconds, for DKIM ``x=``) defaults to the reactor's clock. DNS
        trouble never raises: it becomes ``temperror`` results in the verdict.
        ``header_fields``: ``split_header_section(raw)[0]`` when the caller has it already
        (the inbound pipeline), so the header section is not split a second time.
        ``crlf_only``: the caller knows that every line of ``raw`` ends with CRLF and no CR or
        LF stands alone (the SMTP DATA scanner's check, mail.md §1.5), so DKIM does not count
        them again (:func:`_dkim_split`). Only for content so checked; the default counts.
        """
        when = self._reactor.seconds() if now is None else now
        deadline = None if self._budget is None else time.monotonic() + self._budget
        return await self._pool.run(
            self.thd_verify, raw, client_ip, helo, mail_from, when, deadline, header_fields, crlf_only
        )

    # ------------------------------------------------------------------ thread side

    def thd_verify(
        self,
        raw: bytes,
        client_ip: str,
        helo: str,
        mail_from: str,
        now: float,
        deadline: float | None = None,
        header_fields: Sequence[HeaderField] | None = None,
        crlf_only: bool = False,
    ) -> Verdict:
        """Blocking: SPF, every DKIM signature, the DMARC record, then the verdict.

        Past ``deadline`` (``time.monotonic()``), the checks not yet run are ``temperror``
        (a job that waited in the queue beyond it makes no DNS query at all).
        ``header_fields`` must be ``split_header_section(raw)[0]`` (None: split here);
        ``crlf_only`` as for :meth:`verify`.
        """

        def expired() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        from_address = from_address_of(raw) if header_fields is None else from_address_of_fields(header_fields)
        spf_result = "temperror" if expired() else self.thd_spf(client_ip, helo, mail_from)
        if expired():
            count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", raw[: raw.find(b"\r\n\r\n") + 2]))
            dkim_results = tuple(DkimResult("temperror") for _ in range(min(count, MAX_DKIM_SIGNATURES)))
        else:
            dkim_results = self.thd_dkim(raw, now, deadline, crlf_only)
        if from_address is None:
            lookup = DmarcLookup(DMARC_NONE)  # unused: no From → dmarc=permerror
        elif expired():
            lookup = DmarcLookup(DMARC_TEMPERROR)
        else:
            lookup = self.thd_dmarc_lookup(from_address.rpartition("@")[2])
        return build_verdict(
            spf=spf_result,
            dkim_signatures=dkim_results,
            from_address=from_address,
            mail_from=mail_from,
            helo=helo,
            dmarc_lookup=lookup,
        )

    def thd_spf(self, client_ip: str, helo: str, mail_from: str) -> str:
        """RFC 7208 result of ``client_ip`` for MAIL FROM (null → ``postmaster@<HELO>``).

        pyspf's own limits are §2.2's (10 DNS mechanisms, 2 void lookups, 10 names per
        mx/ptr); ``querytime`` bounds the whole check. A domain that is malformed or not
        multi-label (an address-literal HELO, garbage) is ``none`` without any query
        (RFC 7208 §4.3).
        """
        domain = mail_from_domain(mail_from, helo)
        if not is_domain_name(domain) or "." not in domain:
            return "none"
        with _spf_hook_lock:
            # pyspf's hook is process-wide: if anything replaced it, put ours back rather
            # than let pyspf fall back to the system resolvers.
            if spf.DNSLookup != self._dns.thd_spf_lookup:
                install_spf_lookup(self._dns)
        sender = mail_from or f"postmaster@{helo}"
        try:
            result, _code, _explanation = spf.query(
                i=client_ip,
                s=sender,
                h=helo,
                timeout=self._spf_timeout,
                querytime=self._spf_timeout,
            ).check()
        except Exception:
            # pyspf turns DNS and record problems into results itself; anything escaping
            # is a crash on odd input (IDN, garbage HELO). Say "could not evaluate".
            log.failure("SPF evaluation crashed", client_ip=client_ip, helo=helo)
            return "temperror"
        return result if result in SPF_RESULTS else "permerror"

    def thd_dkim(
        self, raw: bytes, now: float, deadline: float | None = None, crlf_only: bool = False
    ) -> tuple[DkimResult, ...]:
        """One :class:`DkimResult` per ``DKIM-Signature`` field (the first 10), §2.3;
        ``crlf_only`` as for :meth:`verify`."""
        try:
            message = DkimMessage(raw, crlf_only)
        except (dkim.MessageFormatError, IndexError, ValueError):
            # dkimpy raises IndexError for a header section that opens with a continuation
            # line (which §1.5 lets through); like any unparseable header section it must
            # give a verdict, never an exception (that would be a 451 the sender retries forever).
            # The SMTP layer refuses such headers (§1.5); if one gets here, a signature
            # we cannot even locate is a permanent error, not an unsigned message.
            if re.search(rb"(?im)^dkim-signature[ \t]*:", raw):
                return (DkimResult("permerror"),)
            return ()
        fields = message.signature_fields()
        keys: dict[bytes, bytes | None | Exception] = {}
        results = []
        for idx, value in enumerate(fields[:MAX_DKIM_SIGNATURES]):
            if deadline is not None and time.monotonic() >= deadline:
                results.append(DkimResult("temperror"))  # budget spent: not checked
                continue
            try:
                results.append(self._thd_one_signature(message, idx, value, now, keys))
            except Exception:
                # A library failure on hostile input is this signature's permanent error.
                log.failure("DKIM verification raised; reporting permerror")
                results.append(DkimResult("permerror"))
        return tuple(results)

    def _thd_one_signature(
        self,
        message: DkimMessage,
        idx: int,
        value: bytes,
        now: float,
        keys: dict[bytes, bytes | None | Exception],
    ) -> DkimResult:
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            return DkimResult("permerror")
        d = _ascii(tags.get(b"d", b"")).lower()
        s = _ascii(tags.get(b"s", b""))
        early = precheck_signature(tags, now)
        if early is not None:
            return DkimResult(early, d, s)

        name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
        if name not in keys:  # several signatures may share a key: one query per message
            try:
                keys[name] = self._dns.thd_dkim_dnsfunc(name, timeout=self._dns.timeout)
            except (DkimDnsTemporaryError, DnsTemporaryError) as exc:
                keys[name] = exc
        record = keys[name]
        if isinstance(record, Exception):
            return DkimResult("temperror", d, s)
        key_result = check_key_record(record, tags[b"a"])
        if key_result is not None:
            return DkimResult(key_result, d, s)

        try:
            ok = message.verify(idx, record, tags)
        except (dkim.ValidationError, dkim.KeyFormatError):
            return DkimResult("fail", d, s)  # body hash mismatch, digest/key mismatch
        except Exception:
            return DkimResult("permerror", d, s)
        if not ok:
            return DkimResult("fail", d, s)
        if b"l" in tags:
            body = message.canonical_body(CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple")))
            length = int(tags[b"l"])
            if length > len(body):
                return DkimResult("fail", d, s)
            if length < len(body):
                return DkimResult("policy", d, s)
        return DkimResult("pass", d, s)

    def thd_dmarc_lookup(self, from_domain: str) -> DmarcLookup:
        """§2.4 item 3: ``_dmarc.<From domain>``, else ``_dmarc.<organisational domain>``."""
        org = organizational_domain(from_domain)
        try:
            found = select_dmarc_record(self._dns.thd_txt(f"_dmarc.{from_domain}"))
            if found is None and org != from_domain:
                found = select_dmarc_record(self._dns.thd_txt(f"_dmarc.{org}"))
        except DnsTemporaryError:
            return DmarcLookup(DMARC_TEMPERROR)
        return found if found is not None else DmarcLookup(DMARC_NONE)


# ---------------------------------------------------------------- per-signature rules (no DNS)


def _ascii(value: bytes) -> str:
    return value.decode("ascii", "replace")


def precheck_signature(tags: dict[bytes, bytes], now: float) -> str | None:
    """The §2.3 verdicts that need no key: ``permerror``/``fail``, or None to go on.

    Order: malformed (missing or bad tags, bad ``c=``, bad ``x=``/``t=``/``l=``) → permerror;
    ``h=`` without ``from`` → permerror; ``rsa-sha1`` → fail (RFC 8301); ``x=`` before
    ``now`` → fail. dkimpy's own field check reads the wall clock for ``t=``/``x=``, so
    those two are judged here against ``now`` and left out of its check.
    """
    try:
        dkim.validate_signature_fields({k: v for k, v in tags.items() if k not in (b"t", b"x")})
        CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except (dkim.ValidationError, InvalidCanonicalizationPolicyError, KeyError):
        return "permerror"
    for tag in (b"t", b"x", b"l"):
        if tag in tags and re.fullmatch(rb"\d{1,12}", tags[tag]) is None:
            return "permerror"
    if b"t" in tags and b"x" in tags and int(tags[b"x"]) < int(tags[b"t"]):
        return "permerror"
    signed = [h.strip().lower() for h in re.split(rb"\s*:\s*", tags[b"h"])]
    if b"from" not in signed:
        return "permerror"
    if tags[b"a"].lower() == b"rsa-sha1":
        return "fail"
    if b"x" in tags and int(tags[b"x"]) < now:
        return "fail"
    return None


def check_key_record(record: bytes | None, algorithm: bytes) -> str | None:
    """The §2.3 verdicts decided by the key record, or None when the key is usable.

    Missing → fail; ``p=`` empty (revoked) → fail; ``t=y`` (testing) → ``none``, treated
    as unsigned; unparseable record or key → permerror; RSA under 1024 bits → fail.
    """
    if record is None:
        return "fail"
    try:
        key_tags = parse_tag_value(record)
    except InvalidTagValueList:
        return "permerror"
    if b"p" not in key_tags:
        return "permerror"
    if not re.sub(rb"\s+", b"", key_tags[b"p"]):
        return "fail"
    flags = [f.strip().lower() for f in key_tags.get(b"t", b"").split(b":")]
    if b"y" in flags:
        return "none"
    try:
        _pk, keysize, ktag, _tlsrpt, _fast = parsed_key(record)
    except (dkim.KeyFormatError, dkim.NaClNotFoundError, binascii.Error, ValueError, TypeError):
        return "permerror"
    if ktag == b"rsa" and keysize < MIN_RSA_BITS:
        return "fail"
    if algorithm.lower().startswith(b"ed25519") != (ktag == b"ed25519"):
        return "fail"  # key type does not match a=: the signature cannot verify
    return None


# ---------------------------------------------------------------- DKIM cryptography (no DNS)

#: Parsed key records (content-addressed: the same record bytes always give the same key, so
#: no TTL is needed here; the DNS cache decides how long a record is used). Bounded.
_KEY_CACHE: dict[bytes, tuple[Any, int, bytes, bool, rsa.RSAPublicKey | None]] = {}
_KEY_CACHE_MAX = 512

_PREHASHED = {"sha256": utils.Prehashed(hashes.SHA256()), "sha1": utils.Prehashed(hashes.SHA1())}
_WSP_RUNS = re.compile(rb"[\t ]+")
_WSP_BEFORE_CRLF = re.compile(rb"[\t ]+\r\n")
_H_SPLIT = re.compile(rb"\s*:\s*")
_UNFOLD = re.compile(rb"\r?\n")
_ALL_WSP = re.compile(rb"\s+")
#: dkimpy's ``RE_BTAG`` (the ``b=`` value to blank out before hashing the signature field),
#: rewritten without its per-character optional FWS group, which made it the most expensive
#: step of verifying a signature. dkimpy's FWS ``(?:(?:\s*\r?\n)?\s+)?`` matches exactly the
#: whitespace strings ``\s*`` matches, so ``(?:FWS [base64])*`` (greedy) ends at the last base64
#: character of the run of whitespace/base64 octets, as ``[\s base64]*[base64]`` does; the
#: matches and hence the substitution are identical (differential test in
#: tests/unit/test_dkim_fastpath.py).
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


def parsed_key(record: bytes) -> tuple[Any, int, bytes, bool, rsa.RSAPublicKey | None]:
    """``dkim.evaluate_pk`` of a key record, plus an OpenSSL RSA key, parsed once per record.

    Returns ``(pk, keysize, ktag, tlsrpt_service, openssl_key)``; ``openssl_key`` is None for
    ed25519 keys and for RSA numbers OpenSSL refuses (dkimpy's own code then decides).
    Raises whatever ``evaluate_pk`` raises (failures are not cached).
    """
    hit = _KEY_CACHE.get(record)
    if hit is not None:
        return hit
    pk, keysize, ktag, tlsrpt = dkim.evaluate_pk(b"", record)
    fast: rsa.RSAPublicKey | None = None
    if ktag == b"rsa" and isinstance(pk, dict):
        try:
            fast = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
        except Exception:
            fast = None
    entry = (pk, keysize, ktag, tlsrpt, fast)
    if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
        _KEY_CACHE.clear()
    _KEY_CACHE[record] = entry
    return entry


def _relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation, skipping the regex passes when they are no-ops."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        body = _WSP_RUNS.sub(b" ", _WSP_BEFORE_CRLF.sub(b"\r\n", body))
    body = dkim.canonicalization.strip_trailing_lines(body)
    return b"" if body == b"\r\n" else body


class DkimMessage:
    """One received message, prepared once for verifying each of its DKIM signatures.

    ``headers``/``body`` are exactly what ``dkim.rfc822_parse`` returns for ``raw``, but for
    CRLF-only content (all SMTP mail, §1.3) only the header section goes through dkimpy's
    regex split; the body is a slice of ``raw``. Canonical bodies are computed once per
    algorithm and shared by all signatures.

    Raises:
        dkim.MessageFormatError: a header line dkimpy cannot parse.
    """

    def __init__(self, raw: bytes, crlf_only: bool = False) -> None:
        self.headers, self.body = _dkim_split(raw, crlf_only)
        self._bodies: dict[bytes, bytes] = {}

    def signature_fields(self) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == b"dkim-signature"]

    def canonical_body(self, policy: CanonicalizationPolicy) -> bytes:
        algorithm = policy.body_algorithm
        name = algorithm.name
        body = self._bodies.get(name)
        if body is None:
            if algorithm is dkim.canonicalization.Simple:
                body = dkim.canonicalization.strip_trailing_lines(self.body)
            elif algorithm is dkim.canonicalization.Relaxed:
                body = _relaxed_body(self.body)
            else:  # pragma: no cover - dkimpy knows only the two
                body = policy.canonicalize_body(self.body)
            self._bodies[name] = body
        return body

    def verify(self, idx: int, record: bytes, tags: dict[bytes, bytes] | None = None) -> bool:
        """``dkim.DKIM(raw).verify(idx, dnsfunc=lambda *_: record)``, same results and errors.

        Raises:
            dkim.ValidationError, dkim.KeyFormatError: the signature does not verify (fail).
            Exception: anything else dkimpy would raise (permerror).
        """
        sigheaders = [(k, v) for k, v in self.headers if k.lower() == b"dkim-signature"]
        if len(sigheaders) <= idx:
            return False
        sig_header = sigheaders[idx]
        # -- dkim.DKIM.verify_headerprep (``tags``: this field's value, already parsed)
        try:
            sig = parse_tag_value(sig_header[1]) if tags is None else tags
        except InvalidTagValueList as e:
            raise dkim.MessageFormatError(e) from e
        dkim.validate_signature_fields(sig)
        include_headers = [x.lower() for x in _H_SPLIT.split(sig[b"h"])]
        # -- dkim.DomainSigner.verify_sig
        try:
            pk, keysize, ktag, tlsrpt, fast = parsed_key(record)
        except (dkim.KeyFormatError, binascii.Error):
            return False
        # -- dkim.DomainSigner.verify_sig_process (tlsrpt=False)
        if tlsrpt:
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from e
        hasher = dkim.HASH_ALGORITHMS[sig[b"a"]]
        if b"bh" in sig:
            body = self.canonical_body(policy)
            if b"l" in sig:
                body = body[: int(sig[b"l"])]
            bodyhash = hasher(body).digest()
            try:
                bh = base64.b64decode(_ALL_WSP.sub(b"", sig[b"bh"]))
            except TypeError as e:
                raise dkim.MessageFormatError(str(e)) from e
            if bodyhash != bh:
                raise dkim.ValidationError("body hash mismatch")
        if b"from" in include_headers:
            include_headers.append(b"from")
        h = hasher()
        _hash_headers(h, policy, self.headers, include_headers, sig_header)
        signature = base64.b64decode(_ALL_WSP.sub(b"", sig[b"b"]))
        if ktag == b"rsa":
            if fast is not None and _openssl_rsa_ok(fast, signature, h):
                res = True
            else:
                try:
                    res = RSASSA_PKCS1_v1_5_verify(h, signature, pk)
                except (TypeError, DigestTooLargeError) as e:
                    raise dkim.KeyFormatError(f"digest too large for modulus: {e}") from e
            if res and keysize < MIN_RSA_BITS:
                raise dkim.KeyFormatError(f"public key too small: {keysize}")
            return bool(res)
        if ktag == b"ed25519":
            import nacl.exceptions

            try:
                pk.verify(h.digest(), signature)
                return True
            except nacl.exceptions.BadSignatureError:
                return False
        raise dkim.UnknownKeyTypeError(ktag)


def _hash_headers(
    hasher: Any, policy: CanonicalizationPolicy, headers: list[Any], include_headers: list[bytes], sig_header: Any
) -> None:
    """``dkim.hash_headers(hasher, policy, policy.canonicalize_headers(headers), …)``, cheaper.

    Same bytes hashed: fields are selected before canonicalisation rather than after (the
    selection compares lowercased names, and canonicalisation only lowercases and right-strips
    names, which ``rfc822_parse`` never leaves with trailing whitespace), so unsigned fields
    are never canonicalised; relaxed canonicalisation uses precompiled patterns; and the
    ``b=`` value is blanked with :data:`_BTAG`.
    """
    canonicalize = _relaxed_headers if policy.header_algorithm is dkim.canonicalization.Relaxed else policy.canonicalize_headers
    sign_headers = canonicalize(dkim.select_headers(headers, include_headers))
    cheaders = canonicalize([(sig_header[0], _BTAG.sub(b"\\1", sig_header[1]))])
    for name, value in sign_headers + [(x, y.rstrip()) for x, y in cheaders]:
        hasher.update(name)
        hasher.update(b":")
        hasher.update(value)


def _relaxed_headers(headers: list[Any]) -> list[tuple[bytes, bytes]]:
    """dkimpy's ``Relaxed.canonicalize_headers`` with precompiled patterns."""
    return [
        (name.lower().rstrip(), _WSP_RUNS.sub(b" ", _UNFOLD.sub(b"", value)).strip() + b"\r\n")
        for name, value in headers
    ]


def _openssl_rsa_ok(key: rsa.RSAPublicKey, signature: bytes, h: Any) -> bool:
    """True when OpenSSL accepts the RSASSA-PKCS1-v1_5 signature (then dkimpy would too)."""
    prehashed = _PREHASHED.get(h.name)
    if prehashed is None:
        return False
    try:
        key.verify(signature, h.digest(), padding.PKCS1v15(), prehashed)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _dkim_split(raw: bytes, crlf_only: bool = False) -> tuple[list[Any], bytes]:
    """``dkim.rfc822_parse(raw)`` without splitting the body when ``raw`` is CRLF-only.

    rfc822_parse splits at ``\\r?\\n`` and rejoins the body lines with CRLF, so for content
    without a bare LF the body is simply the bytes after the first empty line. Messages with
    a bare LF (never from SMTP) take dkimpy's own path. ``crlf_only``: the caller has checked
    that there is none (the SMTP DATA scanner has); counting both over a 100 KB message cost
    about a tenth of e2a's CPU per message (docs/performance.md).
    """
    if not crlf_only and raw.count(b"\n") != raw.count(b"\r\n"):
        return dkim.rfc822_parse(raw)
    if raw.startswith(b"\r\n"):
        return [], raw[2:]
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return dkim.rfc822_parse(raw)
    headers, _ = dkim.rfc822_parse(raw[: end + 4])
    return headers, raw[end + 4 :]
