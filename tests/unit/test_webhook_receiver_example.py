"""docs/examples/webhook_receiver.py against the Standard Webhooks vector (tests/vectors): the
receiver example accepts the vector, and refuses a tampered body, a stale timestamp and a
secret that did not sign the X-E2A-Auth-* set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VECTOR = json.loads((ROOT / "tests" / "vectors" / "standard-webhooks.json").read_text("utf-8"))


def _example():
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", ROOT / "docs/examples/webhook_receiver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


receiver = _example()
NOW = int(VECTOR["webhook_timestamp"]) + 60


def _headers(body: str, signature: str) -> dict[str, str]:
    headers = {
        "Webhook-Id": VECTOR["webhook_id"],
        "Webhook-Timestamp": VECTOR["webhook_timestamp"],
        "Webhook-Signature": signature,
    }
    headers.update(json.loads(body)["auth_headers"])
    return headers


def test_example_accepts_the_vector_with_either_rotation_header():
    """One secret, and the two-secret rotation header, both verify with the signing secret."""
    body = VECTOR["body"]
    for signature in (VECTOR["webhook_signature"], VECTOR["rotation"]["webhook_signature"]):
        payload = receiver.verify(_headers(body, signature), body.encode(), [VECTOR["secret"]], now=NOW)
        assert payload["message_id"] == VECTOR["webhook_id"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered", "bad webhook-signature"),
        ("stale", "outside ±5 min"),
        ("other_secret", "bad X-E2A-Auth-Signature"),
    ],
)
def test_example_refuses(case, message):
    """A changed body, an old timestamp, or only the new secret for an X-E2A set signed by the old one."""
    body, secrets, now = VECTOR["body"], [VECTOR["secret"]], NOW
    signature = VECTOR["rotation"]["webhook_signature"]
    if case == "tampered":
        body = VECTOR["tampered"]["body"]
    elif case == "stale":
        now = NOW + 600
    else:
        secrets = [VECTOR["rotation"]["secrets_newest_first"][0]]
    with pytest.raises(ValueError, match=message):
        receiver.verify(_headers(VECTOR["body"], signature), body.encode(), secrets, now=now)
