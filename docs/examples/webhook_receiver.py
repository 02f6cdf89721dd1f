"""A minimal e2a webhook receiver (standard library only); docs/webhooks.md explains each step.

Run it with your signing secret(s), newest first, comma-separated (during a rotation, both):

    E2A_SIGNING_SECRETS=<64 hex>[,<64 hex>] python webhook_receiver.py 8000
"""

import base64
import calendar
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SIGNED = ["Verified", "Sender", "Entity-Type", "Domain-Check", "Delegation", "Timestamp", "Message-Id", "Body-Hash"]


def verify(headers, body: bytes, secrets: list[str], now: float | None = None) -> dict:
    """The webhook's JSON body if both signatures verify with one of ``secrets``; else ValueError."""
    h = {k.lower(): v for k, v in headers.items()}
    now = time.time() if now is None else now
    keys = [s.encode("ascii") for s in secrets]  # the key is the secret's 64 ASCII characters

    def matches(mac: str, data: bytes, encode) -> bool:
        return any(hmac.compare_digest(encode(hmac.new(k, data, hashlib.sha256).digest()), mac) for k in keys)

    # 1. Standard Webhooks (covers the whole body): v1,<base64> per active secret, ±5 min.
    if abs(now - int(h["webhook-timestamp"])) > 300:
        raise ValueError("webhook-timestamp outside ±5 min")
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + body
    sigs = [s.partition(",")[2] for s in h["webhook-signature"].split(" ") if s.startswith("v1,")]
    if not any(matches(s, signed, lambda d: base64.b64encode(d).decode()) for s in sigs):
        raise ValueError("bad webhook-signature")
    # 2. X-E2A-Auth-*: the mail verdict, bound to the message id and the stored bytes.
    payload = json.loads(body)
    raw = base64.b64decode(payload["raw_message"])
    if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), h["x-e2a-auth-body-hash"]):
        raise ValueError("raw_message does not match X-E2A-Auth-Body-Hash")
    signed_at = calendar.timegm(time.strptime(h["x-e2a-auth-timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
    if not -30 <= now - signed_at <= 300:
        raise ValueError("X-E2A-Auth-Timestamp outside -30 s ... +300 s")
    canonical = "\n".join(h.get("x-e2a-auth-" + name.lower(), "") for name in SIGNED).encode("utf-8")
    if not matches(h.get("x-e2a-auth-signature", ""), canonical, lambda d: d.hex()):
        raise ValueError("bad X-E2A-Auth-Signature")
    if payload["message_id"] != h["x-e2a-auth-message-id"]:
        raise ValueError("body message_id differs from X-E2A-Auth-Message-Id")
    return payload


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            payload = verify(self.headers, body, os.environ["E2A_SIGNING_SECRETS"].split(","))
        except (ValueError, KeyError) as e:
            self.send_response(401)  # not 2xx: e2a retries later (and never 410, which disables)
            self.end_headers()
            print("rejected:", e, file=sys.stderr)
            return
        self.send_response(204)  # answer quickly; deduplicate on webhook-id (at-least-once)
        self.end_headers()
        auth = payload["auth_headers"]
        print(payload["message_id"], "from", auth["X-E2A-Auth-Sender"], "verified=" + auth["X-E2A-Auth-Verified"])


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 8000), Handler).serve_forever()
