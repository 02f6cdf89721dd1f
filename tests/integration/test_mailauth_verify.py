"""MailVerifier against a loopback twisted.names zone: SPF, DKIM and DMARC end to end (mail.md §2).

Messages are DKIM-signed here with dkimpy and keys generated for the test; their public keys
are published in the zone. Every query goes to the test server on 127.0.0.1.

Most tests call ``thd_verify`` directly, in a reactor thread (the DNS server lives on the
reactor, so the blocking side must not run on it); one test goes through ``verify`` and a
real bounded worker pool.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time

import dkim
import pytest
import pytest_twisted
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy

from twisted.internet import reactor, threads

from e2a.mailauth.dns import DnsClient
from e2a.mailauth.verdict import DkimResult
from e2a.mailauth.verify import MailVerifier
from e2a.workers import WorkerPool
from tests.support.dnsserver import start_dns_server

# ---------------------------------------------------------------- keys and signing helpers

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

# cryptography refuses to generate RSA keys under 1024 bits; this one exists only to prove
# that such keys never verify (RFC 8301).
SMALL_KEY = serialization.load_pem_private_key(
    b"""-----BEGIN PRIVATE KEY-----
MIIB5QIBADANBgkqhkiG9w0BAQEFAASCAc8wggHLAgEAAmEA63om3Ji0z+uJ1OGk
lhlP1zd+nFQQxXrPGF3akaWswwdjQaUQmaz29Qd9GxQuFWx8P/w4sJnvAASMyKxv
CfEhJZUNi4sFbWjfKEzk7UxSUanL0OqhudNQmFkvqQdRlkO/AgMBAAECYQDXas32
bLSsqTtURoA82DcUGa538OfO4QRntCRprXiYij+hJBJFo9fgXNN0XEe0TaKzgrLk
yNbEDiQ2rLUd8mlxOjjd/qZo3k0VRajJFH/BsJ9L/eB5BxxjkqQsWPQ7eSECMQD/
5I9f6D+7K1hGr9JqLPW2IIddadcw89HPp8SvlJNbiUbHXAxZ3RfVikJDydVoKxcC
MQDrk2cMRhEmNBgKdWr4bekzm+9u7HqyHd5jJVoc2c7WFXKhmsJm2vKlSBM9cIRV
dZkCMQCqkAss7x5DwLF3dEw5LzycJ/RyRFEGNQ5dbkMAkXTjJ45A5c7pux/e2ugu
TQLtCwMCMBBwF6eul/G/ftH0AYPWP4h/YASwcZtOJD9s0s3ikOE1W+tU3i3JJ1dL
ITSPTlycOQIwbBxIdVv/qr8O4E27c6GMXalKPo+XzVdhP4jxz8IG3ceHe67nulbw
sBQbL00dMrsQ
-----END PRIVATE KEY-----
""",
    password=None,
)


def _private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _key_record(key, extra: str = "") -> str:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; {extra}p={base64.b64encode(spki).decode('ascii')}"


BODY = b"Hello agent.\r\nPlease read this.\r\n"


def _message(from_: str = "Alice <alice@example.com>", body: bytes = BODY, extra: str = "") -> bytes:
    head = (
        f"From: {from_}\r\n"
        "To: agent@e2a.test\r\n"
        "Subject: authentication test\r\n"
        "Date: Mon, 27 Apr 2026 12:05:00 +0000\r\n"
        "Message-ID: <t1@example.com>\r\n"
        f"{extra}"
    )
    return head.encode("ascii") + b"\r\n" + body


def _sign(raw: bytes, *, d: str = "example.com", s: str = "sel", key=KEY,
          algorithm: bytes = b"rsa-sha256", length: bool = False) -> bytes:
    """raw with a dkimpy DKIM-Signature prepended."""
    sig = dkim.sign(raw, s.encode(), d.encode(), _private_pem(key), signature_algorithm=algorithm,
                    include_headers=[b"from", b"to", b"subject", b"date"], length=length)
    return sig + raw


def _sign_with_tags(raw: bytes, *, h: list[bytes], extra: list[tuple[bytes, bytes]],
                    d: bytes = b"example.com", s: bytes = b"sel", key=KEY) -> bytes:
    """A valid signature carrying tags dkimpy's sign() will not write (x=, h= without from)."""
    signer = dkim.DKIM(raw)
    signer.signature_algorithm = b"rsa-sha256"
    signer.hasher = dkim.HASH_ALGORITHMS[b"rsa-sha256"]
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    bh = base64.b64encode(hashlib.sha256(canon.canonicalize_body(signer.body)).digest())
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/simple"), (b"d", d), (b"s", s),
              *extra, (b"h", b" : ".join(h)), (b"bh", bh), (b"b", b"0" * 60)]
    pk = dkim.crypto.parse_pem_private_key(_private_pem(key))
    value = signer.gen_header(fields, h, canon, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + value + raw


SPF_LOCAL = "v=spf1 ip4:127.0.0.1 -all"

ZONE = {
    "example.com": {"TXT": [SPF_LOCAL]},
    "sel._domainkey.example.com": {"TXT": [_key_record(KEY)]},
    "other._domainkey.example.com": {"TXT": [_key_record(OTHER_KEY)]},
    "test._domainkey.example.com": {"TXT": [_key_record(KEY, "t=y; ")]},
    "small._domainkey.example.com": {"TXT": [_key_record(SMALL_KEY)]},
    "revoked._domainkey.example.com": {"TXT": ["v=DKIM1; k=rsa; p="]},
    "garbled._domainkey.example.com": {"TXT": ["v=DKIM1; k=rsa; p=!!notbase64"]},
    "broken._domainkey.example.com": "SERVFAIL",
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@example.com", "unrelated"]},
    # SPF outcomes for the MAIL FROM domain
    "fail.test": {"TXT": ["v=spf1 -all"]},
    "softfail.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "nospf.test": {"A": ["127.0.0.1"], "TXT": ["just text"]},
    "servfail.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
    "twospf.test": {"TXT": [SPF_LOCAL, "v=spf1 -all"]},
    "badspf.test": {"TXT": ["v=spf1 ip4:127.0.0.300 -all"]},
    "other.test": {"TXT": [SPF_LOCAL]},
    # DMARC outcomes for the From domain
    "nodmarc.test": {"TXT": [SPF_LOCAL]},
    "sel._domainkey.nodmarc.test": {"TXT": [_key_record(KEY)]},
    "tempdmarc.test": {"TXT": [SPF_LOCAL]},
    "_dmarc.tempdmarc.test": "SERVFAIL",
    "baddmarc.test": {"TXT": [SPF_LOCAL]},
    "_dmarc.baddmarc.test": {"TXT": ["v=DMARC1; p=bogus"]},
    "twodmarc.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.twodmarc.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
    "strict.test": {"TXT": [SPF_LOCAL]},
    "mail.strict.test": {"TXT": [SPF_LOCAL]},
    "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=none; aspf=s; adkim=s"]},
}


# ---------------------------------------------------------------- runners


@pytest.fixture
def spf_hook():
    """pyspf's DNS hook is process-wide: every test leaves it as it found it."""
    before = spf.DNSLookup
    yield
    assert spf.DNSLookup is before
    spf.DNSLookup = before


async def _verify(raw: bytes, *, mail_from: str = "alice@example.com", helo: str = "mx.example.com",
                  ip: str = "127.0.0.1", now: float | None = None, timeout: float = 2.0, handle_out=None):
    """thd_verify in a reactor thread against a fresh loopback zone."""
    handle = await start_dns_server(reactor, ZONE)
    client = DnsClient(handle.nameservers, timeout=timeout, reactor=reactor)
    verifier = MailVerifier(client, pool=None, reactor=reactor)  # pool unused by thd_verify
    try:
        when = time.time() if now is None else now
        return await threads.deferToThread(verifier.thd_verify, raw, ip, helo, mail_from, when)
    finally:
        verifier.close()
        if handle_out is not None:
            handle_out.append(handle)
        await handle.stop()


# ---------------------------------------------------------------- the happy path


@pytest_twisted.ensureDeferred
async def test_verify_passes_all_when_signed_and_authorised(spf_hook):
    """DKIM-signed by example.com, sent from an SPF-authorised IP: spf, dkim, dmarc pass; verified."""
    handles: list = []
    v = await _verify(_sign(_message()), handle_out=handles)
    assert (v.spf, v.spf_e2a, v.dkim, v.dmarc) == ("pass", "pass", "pass", "pass")
    assert v.dkim_signatures == (DkimResult("pass", "example.com", "sel"),)
    assert (v.from_address, v.from_domain) == ("alice@example.com", "example.com")
    assert v.spf_aligned and v.dkim_aligned and v.aligned and v.verified
    assert v.domain_check() == "spf=pass; dkim=pass; dmarc=pass"
    asked = {name for name, _type in handles[0].queries}
    assert {"example.com", "sel._domainkey.example.com", "_dmarc.example.com"} <= asked


@pytest_twisted.ensureDeferred
async def test_verify_runs_on_the_given_thread_pool(spf_hook):
    """verify() runs the checks on the injected bounded worker pool, never on the reactor."""
    handle = await start_dns_server(reactor, ZONE)
    pool = WorkerPool(reactor, 2, "mailauth-test")
    pool.start()
    client = DnsClient(handle.nameservers, timeout=2.0, reactor=reactor)
    verifier = MailVerifier(client, pool, reactor)
    seen_threads: list[str] = []
    original = verifier.thd_verify

    def spy(*args):
        seen_threads.append(threading.current_thread().name)
        return original(*args)

    verifier.thd_verify = spy
    try:
        v = await verifier.verify(_sign(_message()), "127.0.0.1", "mx.example.com", "alice@example.com")
    finally:
        verifier.close()
        pool.stop()
        await handle.stop()
    assert v.verified and v.dmarc == "pass"
    assert seen_threads and "mailauth-test" in seen_threads[0]


@pytest_twisted.ensureDeferred
async def test_close_restores_previous_spf_hook(spf_hook):
    """Constructing a verifier installs pyspf's hook; close() puts the previous one back."""
    before = spf.DNSLookup
    client = DnsClient([("127.0.0.1", 9)], timeout=1.0, reactor=reactor)
    verifier = MailVerifier(client, pool=None, reactor=reactor)
    assert spf.DNSLookup == client.thd_spf_lookup
    verifier.close()
    assert spf.DNSLookup is before


# ---------------------------------------------------------------- SPF (§2.2)


@pytest.mark.parametrize(
    ("mail_from", "spf_result", "e2a"),
    [
        ("bounce@example.com", "pass", "pass"),
        ("x@fail.test", "fail", "fail"),
        ("x@softfail.test", "softfail", "fail"),
        ("x@neutral.test", "neutral", "none"),
        ("x@nospf.test", "none", "none"),
        ("x@missing.test", "none", "none"),
        ("x@servfail.test", "temperror", "temperror"),
        ("x@twospf.test", "permerror", "permerror"),
        ("x@badspf.test", "permerror", "permerror"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_verify_spf_results(spf_hook, mail_from, spf_result, e2a):
    """Each RFC 7208 outcome of the MAIL FROM domain and its §2.2 mapping."""
    v = await _verify(_message(), mail_from=mail_from)
    assert (v.spf, v.spf_e2a) == (spf_result, e2a)


@pytest_twisted.ensureDeferred
async def test_verify_spf_temperror_when_dns_times_out(spf_hook):
    """An SPF record query that never answers gives temperror (after dns.timeout)."""
    v = await _verify(_message(), mail_from="x@slow.test", timeout=0.5)
    assert (v.spf, v.spf_e2a) == ("temperror", "temperror")


@pytest_twisted.ensureDeferred
async def test_verify_spf_fail_when_ip_not_authorised(spf_hook):
    """The same authorised domain fails for a client IP outside its record."""
    v = await _verify(_message(), mail_from="bounce@example.com", ip="127.0.0.2")
    assert v.spf == "fail"


@pytest_twisted.ensureDeferred
async def test_verify_spf_uses_helo_for_null_sender(spf_hook):
    """Null MAIL FROM → postmaster@HELO is checked; the HELO domain aligns with From."""
    v = await _verify(_message(), mail_from="", helo="example.com")
    assert v.spf == "pass" and v.spf_aligned and v.verified
    v = await _verify(_message(), mail_from="", helo="fail.test")
    assert v.spf == "fail" and not v.verified


# ---------------------------------------------------------------- DKIM (§2.3)


async def _dkim(raw: bytes, **kwargs) -> tuple[str, tuple[DkimResult, ...]]:
    v = await _verify(raw, mail_from="x@nospf.test", **kwargs)
    return v.dkim, v.dkim_signatures


@pytest_twisted.ensureDeferred
async def test_verify_dkim_pass_when_signature_valid(spf_hook):
    """A good rsa-sha256 signature with a 2048-bit key passes."""
    assert await _dkim(_sign(_message())) == ("pass", (DkimResult("pass", "example.com", "sel"),))


@pytest_twisted.ensureDeferred
async def test_verify_dkim_fail_when_body_tampered(spf_hook):
    """Changing one body byte after signing fails the signature."""
    raw = _sign(_message()).replace(b"Please read", b"Please READ")
    assert await _dkim(raw) == ("fail", (DkimResult("fail", "example.com", "sel"),))


@pytest_twisted.ensureDeferred
async def test_verify_dkim_fail_when_header_tampered(spf_hook):
    """Changing a signed header after signing fails the signature."""
    raw = _sign(_message()).replace(b"Subject: authentication test", b"Subject: changed")
    assert (await _dkim(raw))[0] == "fail"


@pytest_twisted.ensureDeferred
async def test_verify_dkim_none_when_unsigned(spf_hook):
    """No DKIM-Signature: summary none, no per-signature results."""
    assert await _dkim(_message()) == ("none", ())


@pytest_twisted.ensureDeferred
async def test_verify_dkim_temperror_when_key_lookup_fails(spf_hook):
    """SERVFAIL on the key record → temperror, not fail."""
    raw = _sign(_message(), s="broken")
    assert await _dkim(raw) == ("temperror", (DkimResult("temperror", "example.com", "broken"),))


@pytest_twisted.ensureDeferred
async def test_verify_dkim_policy_when_length_shorter_than_body(spf_hook):
    """l= covering only part of the body → policy, never a pass (summary fail)."""
    raw = _sign(_message(), length=True) + b"Appended by a list.\r\n"
    assert await _dkim(raw) == ("fail", (DkimResult("policy", "example.com", "sel"),))


@pytest_twisted.ensureDeferred
async def test_verify_dkim_pass_when_length_covers_whole_body(spf_hook):
    """l= equal to the body length is an ordinary pass."""
    assert (await _dkim(_sign(_message(), length=True)))[0] == "pass"


@pytest_twisted.ensureDeferred
async def test_verify_dkim_fail_when_rsa_sha1(spf_hook):
    """rsa-sha1 signatures never verify (RFC 8301), even when cryptographically valid."""
    raw = _sign(_message(), algorithm=b"rsa-sha1")
    assert await _dkim(raw) == ("fail", (DkimResult("fail", "example.com", "sel"),))


@pytest_twisted.ensureDeferred
async def test_verify_dkim_fail_when_rsa_key_under_1024_bits(spf_hook):
    """A valid signature by a 768-bit key fails."""
    raw = _sign(_message(), s="small", key=SMALL_KEY)
    assert (await _dkim(raw))[1] == (DkimResult("fail", "example.com", "small"),)


@pytest_twisted.ensureDeferred
async def test_verify_dkim_treats_testing_key_as_unsigned(spf_hook):
    """A key record with t=y makes the signature count as no signature."""
    raw = _sign(_message(), s="test")
    assert await _dkim(raw) == ("none", (DkimResult("none", "example.com", "test"),))


@pytest.mark.parametrize(
    ("selector", "result"),
    [("missing", "fail"), ("revoked", "fail"), ("garbled", "permerror"), ("other", "fail")],
)
@pytest_twisted.ensureDeferred
async def test_verify_dkim_key_record_problems(spf_hook, selector, result):
    """Missing or revoked key → fail; unparseable key → permerror; wrong key → fail."""
    raw = _sign(_message(), s=selector)
    assert (await _dkim(raw))[1] == (DkimResult(result, "example.com", selector),)


@pytest_twisted.ensureDeferred
async def test_verify_dkim_fail_when_signature_expired(spf_hook):
    """x= before now → fail; the same signature passes while still valid."""
    t = int(time.time())
    raw = _sign_with_tags(_message(), h=[b"from", b"to", b"subject"],
                          extra=[(b"t", str(t).encode()), (b"x", str(t + 3600).encode())])
    assert (await _dkim(raw, now=t + 60))[0] == "pass"
    assert (await _dkim(raw, now=t + 3601))[1] == (DkimResult("fail", "example.com", "sel"),)


@pytest_twisted.ensureDeferred
async def test_verify_dkim_permerror_when_from_not_signed(spf_hook):
    """A signature whose h= omits From is a permerror even when it verifies."""
    raw = _sign_with_tags(_message(), h=[b"to", b"subject"], extra=[])
    assert await _dkim(raw) == ("permerror", (DkimResult("permerror", "example.com", "sel"),))


@pytest.mark.parametrize(
    "signature",
    [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; bh=AAAA\r\n",  # no b=
        b"DKIM-Signature: v=1; a=rsa-sha512; d=example.com; s=sel; h=from; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; c=odd/simple; d=example.com; s=sel; h=from; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; x=soon; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature: this is not a tag list\r\n",
        b"DKIM-Signature: v=1; v=1; a=rsa-sha256\r\n",
    ],
)
@pytest_twisted.ensureDeferred
async def test_verify_dkim_permerror_when_signature_malformed(spf_hook, signature):
    """Missing tags, unknown algorithm or canonicalisation, bad values, bad syntax → permerror."""
    assert (await _dkim(signature + _message()))[0] == "permerror"


@pytest_twisted.ensureDeferred
async def test_verify_dkim_evaluates_every_signature_up_to_ten(spf_hook):
    """Each signature gets its own result; only the first 10 are evaluated; any pass wins."""
    good = _sign(_message())
    bad = _sign(_message(), s="revoked")[: -len(_message())]
    raw = bad * 11 + good
    summary, results = await _dkim(raw)
    assert len(results) == 10 and all(r.result == "fail" for r in results)
    assert summary == "fail"  # the good one is the 12th field: never looked at
    summary, results = await _dkim(bad + good)
    assert summary == "pass" and [r.result for r in results] == ["fail", "pass"]


# ---------------------------------------------------------------- DMARC (§2.4) and Verified (§2.5)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_pass_when_only_spf_aligned(spf_hook):
    """Unsigned mail with an aligned SPF pass is a DMARC pass and verified."""
    v = await _verify(_message(), mail_from="bounce@example.com")
    assert (v.dkim, v.dmarc, v.verified) == ("none", "pass", True)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_pass_when_only_dkim_aligned(spf_hook):
    """SPF fails but the aligned DKIM signature passes → DMARC pass, verified."""
    v = await _verify(_sign(_message()), mail_from="x@fail.test")
    assert (v.spf, v.dkim, v.dmarc, v.verified) == ("fail", "pass", "pass", True)


@pytest_twisted.ensureDeferred
async def test_verify_not_verified_when_spf_pass_unaligned(spf_hook):
    """SPF pass for another domain's MAIL FROM does not verify the From domain."""
    v = await _verify(_message(), mail_from="bounce@other.test")
    assert (v.spf, v.spf_e2a, v.dmarc) == ("pass", "pass", "fail")
    assert not v.spf_aligned and not v.verified


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_fail_when_dkim_domain_unaligned(spf_hook):
    """A passing signature by an unrelated domain does not align."""
    raw = _sign(_message(), d="nodmarc.test")
    v = await _verify(raw, mail_from="x@fail.test")
    assert (v.dkim, v.dmarc, v.verified) == ("pass", "fail", False)


@pytest_twisted.ensureDeferred
async def test_verify_verified_when_dkim_aligned_and_no_dmarc_record(spf_hook):
    """Aligned DKIM pass with no DMARC record: dmarc=none, still verified."""
    raw = _sign(_message(from_="bob@nodmarc.test"), d="nodmarc.test")
    v = await _verify(raw, mail_from="x@fail.test")
    assert (v.dkim, v.dmarc, v.verified) == ("pass", "none", True)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_uses_org_domain_record(spf_hook):
    """No record at the From subdomain: the organisational domain's record applies (relaxed)."""
    handles: list = []
    raw = _sign(_message(from_="alice@news.example.com"))
    v = await _verify(raw, mail_from="x@fail.test", handle_out=handles)
    assert (v.from_domain, v.dmarc, v.verified) == ("news.example.com", "pass", True)
    asked = [name for name, _t in handles[0].queries]
    assert asked.index("_dmarc.news.example.com") < asked.index("_dmarc.example.com")


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_strict_alignment_from_record(spf_hook):
    """aspf=s: an SPF pass for a subdomain of the From domain no longer aligns."""
    v = await _verify(_message(from_="a@strict.test"), mail_from="b@mail.strict.test")
    assert (v.spf, v.dmarc, v.verified) == ("pass", "fail", False)
    v = await _verify(_message(from_="a@strict.test"), mail_from="b@strict.test")
    assert (v.dmarc, v.verified) == ("pass", True)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_temperror_when_record_lookup_fails(spf_hook):
    """SERVFAIL on _dmarc → temperror; the aligned SPF pass still verifies."""
    v = await _verify(_message(from_="a@tempdmarc.test"), mail_from="b@tempdmarc.test")
    assert (v.spf, v.dmarc, v.verified) == ("pass", "temperror", True)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_temperror_when_dkim_key_lookup_fails(spf_hook):
    """Nothing aligned but a signature hit a DNS failure → temperror, not fail."""
    v = await _verify(_sign(_message(), s="broken"), mail_from="x@fail.test")
    assert (v.dkim, v.dmarc, v.verified) == ("temperror", "temperror", False)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_permerror_when_record_malformed(spf_hook):
    """A single malformed v=DMARC1 record → permerror."""
    v = await _verify(_message(from_="a@baddmarc.test"), mail_from="b@baddmarc.test")
    assert (v.dmarc, v.verified) == ("permerror", True)


@pytest_twisted.ensureDeferred
async def test_verify_dmarc_none_when_several_records(spf_hook):
    """Two v=DMARC1 records count as none."""
    v = await _verify(_message(from_="a@twodmarc.test"), mail_from="b@twodmarc.test")
    assert (v.spf, v.dmarc, v.verified) == ("fail", "none", False)


@pytest.mark.parametrize(
    "raw",
    [
        _message(extra="From: bob@example.com\r\n"),
        _message(from_="friends: alice@example.com;"),
        _message(from_="=?utf-8?q?alice=40example.com?="),
        _message(from_="<<not parseable"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_verify_dmarc_permerror_when_from_invalid(spf_hook, raw):
    """Two From fields, a group, an encoded-word address or garbage: permerror, never verified."""
    v = await _verify(raw, mail_from="bounce@example.com")
    assert (v.spf, v.dmarc, v.from_address, v.from_domain, v.verified) == (
        "pass", "permerror", None, None, False)


@pytest_twisted.ensureDeferred
async def test_verify_dkim_pass_when_ed25519_signature_valid(spf_hook):
    """ed25519-sha256 (RFC 8463) signatures verify like rsa-sha256 ones."""
    import nacl.signing

    signing = nacl.signing.SigningKey.generate()
    seed = base64.b64encode(bytes(signing))
    public = base64.b64encode(bytes(signing.verify_key)).decode("ascii")
    raw = _message()
    raw = dkim.sign(raw, b"ed", b"example.com", seed, signature_algorithm=b"ed25519-sha256",
                    include_headers=[b"from", b"to", b"subject"]) + raw
    ZONE["ed._domainkey.example.com"] = {"TXT": [f"v=DKIM1; k=ed25519; p={public}"]}
    try:
        assert await _dkim(raw) == ("pass", (DkimResult("pass", "example.com", "ed"),))
        assert (await _dkim(raw.replace(b"Please read", b"Please READ")))[0] == "fail"
    finally:
        del ZONE["ed._domainkey.example.com"]


@pytest.mark.parametrize(
    ("helo", "mail_from"),
    [("[127.0.0.1]", ""), ("not a name", ""), ("", ""), ("localhost", ""), ("h", "x@[127.0.0.1]")],
)
@pytest_twisted.ensureDeferred
async def test_verify_spf_none_when_identity_not_a_domain(spf_hook, helo, mail_from):
    """An address-literal, single-label or garbage SPF identity is none, with no SPF query."""
    handles: list = []
    v = await _verify(_message(), mail_from=mail_from, helo=helo, handle_out=handles)
    assert v.spf == "none" and not v.spf_aligned
    assert all(qtype != "TXT" or name.startswith(("_dmarc.", "sel.")) for name, qtype in handles[0].queries)


def test_header_section_opening_with_continuation_line_gets_a_verdict():
    """dkimpy cannot parse it; the verifier still answers (permerror), never raises."""
    from e2a.mailauth.verify import MailVerifier

    verifier = MailVerifier.__new__(MailVerifier)
    raw = b" x\r\nFrom: a@example.org\r\nDKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s; h=from; bh=x; b=y\r\n\r\nbody\r\n"
    assert [r.result for r in verifier.thd_dkim(raw, 0)] == ["permerror"]


def test_expired_budget_reports_temperror_without_dns():
    """A verification that starts after its deadline asks no DNS and reports temperror for
    SPF, each DKIM signature and DMARC (a stale queue cannot pin the thread pool)."""
    import time as _time

    from e2a.mailauth.dns import DnsClient
    from e2a.mailauth.verify import MailVerifier

    class Unused(DnsClient):
        def thd_spf_lookup(self, *args, **kwargs):
            raise AssertionError("no DNS after the deadline")

        def thd_txt(self, *args, **kwargs):
            raise AssertionError("no DNS after the deadline")

    verifier = MailVerifier.__new__(MailVerifier)
    verifier._dns = Unused([("127.0.0.1", 9)], 1.0)
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s; h=from; bh=x; b=y\r\n"
        b"From: a@example.org\r\n\r\nbody\r\n"
    )
    verdict = verifier.thd_verify(raw, "127.0.0.1", "client.example.org", "a@example.org", 0, _time.monotonic() - 1)
    assert verdict.domain_check() == "spf=temperror; dkim=temperror; dmarc=temperror"
    assert verdict.verified is False


@pytest.mark.parametrize(
    "raw",
    [
        b"From: Alice <a@example.org>\r\nTo: b@example.net\r\n\r\nbody\r\n",
        b"From: a@example.org\r\nfrom: b@example.org\r\n\r\nbody\r\n",
        b"To: b@example.net\r\n\r\nFrom: a@example.org\r\n",
        b" x\r\nFrom: a@example.org\r\n\r\nbody\r\n",
    ],
)
def test_thd_verify_with_header_fields_equals_without(raw):
    """Precomputed header_fields (the inbound pipeline's split) give the verdict a fresh parse gives."""
    import time as _time

    from e2a.mailauth.authheaders import split_header_section

    verifier = MailVerifier.__new__(MailVerifier)  # past deadline: no DNS, pure decisions only
    past = _time.monotonic() - 1
    fields, _ = split_header_section(raw)
    plain = verifier.thd_verify(raw, "127.0.0.1", "c.example.org", "a@example.org", 0, past)
    given = verifier.thd_verify(raw, "127.0.0.1", "c.example.org", "a@example.org", 0, past, fields)
    assert given == plain
