"""A loopback webhook refused in development names ``webhooks.allow_private``; production does not."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted

from e2a.config import WebhooksConfig
from tests.support.apiserver import insert_user_with_key, make_test_config


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://localhost:9000/hook"])
@pytest_twisted.ensureDeferred
async def test_local_webhook_refusal_hints_allow_private_in_development(api_server_factory, db, url):
    """POST /api/v1/agents with a loopback webhook in development: invalid_webhook_url + the key to set."""
    api = await api_server_factory(config=make_test_config())
    _, key = await insert_user_with_key(db)
    r = await api.request("POST", "/api/v1/agents", key=key, json_body={"slug": "hook-bot", "webhook_url": url})
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_webhook_url")
    assert "webhooks.allow_private: true" in r.json()["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_local_webhook_refusal_has_no_hint_in_production(api_server_factory, db):
    """The same refusal in production keeps its message without the development-only hint."""
    config = dataclasses.replace(make_test_config(), env="production", webhooks=WebhooksConfig())
    api = await api_server_factory(config=config)
    _, key = await insert_user_with_key(db)
    r = await api.request(
        "POST", "/api/v1/agents", key=key, json_body={"slug": "hook-bot", "webhook_url": "https://127.0.0.1:9000/hook"}
    )
    assert (r.code, r.json()["error"]["code"]) == (400, "invalid_webhook_url")
    assert "allow_private" not in r.json()["error"]["message"]
