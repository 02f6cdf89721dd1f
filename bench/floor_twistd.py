"""``twistd`` with e2a's mail verification replaced by a remembered verdict: a diagnostic.

``bench/smtp_ingest.py --floor`` starts e2a through this file instead of ``twistd``. The first
message per (client IP, MAIL FROM) is verified for real; later ones get that verdict back at
once, on the reactor, with no DNS, no SPF/DKIM/DMARC work and no thread-pool hop. Everything
else (hardened SMTP, strip, trace headers, HMAC signing, the three statements, NOTIFY) runs
unchanged, so the figures are e2a's cost *except* verification: the floor any verification
strategy sits on. Never use it to receive real mail: the remembered verdict ignores the
message.
"""

from __future__ import annotations

import sys
from typing import Any


def install() -> None:
    from e2a.mailauth.verify import MailVerifier

    real_verify = MailVerifier.verify
    remembered: dict[tuple[str, str], Any] = {}

    async def remembered_verify(self: MailVerifier, raw: bytes, client_ip: str, helo: str, mail_from: str,
                                now: float | None = None, header_fields: Any = None, crlf_only: bool = False) -> Any:
        key = (client_ip, mail_from)
        verdict = remembered.get(key)
        if verdict is None:
            verdict = await real_verify(self, raw, client_ip, helo, mail_from, now, header_fields, crlf_only)
            remembered[key] = verdict
        return verdict

    MailVerifier.verify = remembered_verify  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from twisted.scripts.twistd import run

    sys.argv[0] = "twistd"
    run()
