"""DKIM signing of mail that leaves by SMTP (mail.md §7.5), and the deployment's own keys.

RSA signing and key generation are CPU work and dkimpy is synchronous, so everything here
that touches a key is a ``thd_*`` function for a thread pool; only :func:`signed_header_names`
and :func:`deployment_key_path` are pure.

dkimpy's ``DKIM.sign`` reads the wall clock for ``t=``; the spec wants ``t=`` = the signing
time the caller decided on (and tests want fixed bytes), so :class:`_Signer` builds the tag
list itself and hands it to dkimpy's ``gen_header``, which does the canonicalisation, header
selection and RSA signature exactly as ``sign`` would.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

from e2a.mailauth.dkimkeys import thd_generate_key
from e2a.mailsyntax.headers import split_header_section

__all__ = [
    "SIGNED_HEADERS",
    "deployment_key_path",
    "public_key_b64",
    "signed_header_names",
    "thd_dkim_sign",
    "thd_load_deployment_key",
]

# mail.md §7.5: signed when present, in this order; ``from`` once more at the end
# (oversigning: a second From added in transit then breaks the signature).
SIGNED_HEADERS = (
    "from", "reply-to", "subject", "date", "message-id", "to", "cc", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "x-e2a-conversation-id",
)
_CANON = b"relaxed/relaxed"


def signed_header_names(message: bytes) -> list[bytes]:
    """The ``h=`` list for ``message``: the present ones of :data:`SIGNED_HEADERS` (once
    each, in that order), then ``from`` again."""
    fields, _offset = split_header_section(message)
    present = {f.name.lower().decode("ascii", "replace") for f in fields if f.name is not None}
    names = [name.encode("ascii") for name in SIGNED_HEADERS if name in present]
    if b"from" not in names:
        raise ValueError("a message without From cannot be DKIM-signed")
    return names + [b"from"]


class _Signer(dkim.DKIM):
    """dkimpy's signer with ``t=`` supplied by the caller (see the module docstring)."""

    def sign_at(self, now: int, selector: bytes, domain: bytes, private_pem: bytes,
                include_headers: Sequence[bytes]) -> bytes:
        try:
            pk = parse_pem_private_key(private_pem)
        except Exception as exc:  # dkimpy raises its own UnparsableKeyError and friends
            raise dkim.KeyFormatError(str(exc)) from exc
        self.signature_algorithm = b"rsa-sha256"
        self.hasher = hashlib.sha256
        policy = CanonicalizationPolicy.from_c_value(_CANON)
        include = tuple(h.lower() for h in include_headers)
        self.include_headers = include
        bodyhash = base64.b64encode(hashlib.sha256(policy.canonicalize_body(self.body)).digest())
        fields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", _CANON),
            (b"d", domain),
            (b"s", selector),
            (b"t", str(int(now)).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),  # placeholder, folded onto its own line like dkimpy does
        ]
        value = self.gen_header(fields, include, policy, b"DKIM-Signature", pk)
        self.domain, self.selector = domain, selector
        self.signature_fields = dict(fields)
        return b"DKIM-Signature: " + value


def thd_dkim_sign(message: bytes, domain: str, selector: str, private_pem: bytes, now: int) -> bytes:
    """``DKIM-Signature`` field + ``message`` (mail.md §7.5): ``a=rsa-sha256``,
    ``c=relaxed/relaxed``, no ``l=``, ``t=now``, ``h=`` per :func:`signed_header_names`.

    ``message`` must be the CRLF bytes that will be transmitted (before dot-stuffing): the
    signature covers exactly those. Blocking CPU work: call from a thread.

    Raises:
        dkim.KeyFormatError: ``private_pem`` is not a usable RSA key.
        ValueError: the message has no From field.
    """
    include = signed_header_names(message)
    signer = _Signer(message, linesep=b"\r\n")
    field = signer.sign_at(now, selector.encode("ascii"), domain.encode("ascii"), private_pem, include)
    return field + message


# ---------------------------------------------------------------- deployment keys (I/O)


def deployment_key_path(data_dir: str | os.PathLike[str], domain: str) -> Path:
    """``<data_dir>/dkim/<domain>.pem`` (config.md §6)."""
    return Path(data_dir) / "dkim" / f"{domain.lower().rstrip('.')}.pem"


def public_key_b64(private_pem: bytes) -> str:
    """The ``p=`` value (base64 DER SubjectPublicKeyInfo) for a private key, for
    ``check-config`` and the DNS record printout."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(spki).decode("ascii")


def _check_pem(pem: bytes, where: str) -> bytes:
    try:
        serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    return pem


def thd_load_deployment_key(
    data_dir: str | os.PathLike[str],
    domain: str,
    configured_keys: Sequence[object] = (),
    default_selector: str = "e2a",
) -> tuple[str, bytes]:
    """(selector, PKCS#8 PEM) for a deployment domain (the shared domain or ``M``), mail.md §7.5.

    A ``dkim.keys`` entry for the domain (objects with ``domain``, ``selector``, ``key_file``,
    e.g. :class:`e2a.config.DkimKeyConfig`) wins. Otherwise ``<data_dir>/dkim/<domain>.pem``
    with ``default_selector`` (``dkim.selector``), generated (RSA 2048, PKCS#8, mode 0600) when
    missing. The new file is written under a temporary name and hard-linked into place, so two
    processes starting together never read a half-written key: the loser of the race reads
    the winner's file. File I/O and key generation block: thread only.

    Raises:
        OSError: the key file cannot be read or created.
        ValueError: an existing file is not a PEM private key.
    """
    name = domain.lower().rstrip(".")
    for entry in configured_keys:
        if str(getattr(entry, "domain", "")).lower().rstrip(".") == name:
            key_file = str(entry.key_file)  # type: ignore[attr-defined]
            return str(entry.selector), _check_pem(Path(key_file).read_bytes(), key_file)  # type: ignore[attr-defined]

    path = deployment_key_path(data_dir, name)
    if path.exists():
        return default_selector, _check_pem(path.read_bytes(), str(path))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = thd_generate_key().private_pem
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return default_selector, _check_pem(path.read_bytes(), str(path))
    finally:
        tmp.unlink(missing_ok=True)
    return default_selector, pem
