"""Pure rules of agent updates (api.md §4.4) and DKIM selectors (mail.md §7.5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from e2a.errors import BadRequest
from e2a.mailauth.dkimkeys import selector_for
from e2a.store.agents import AgentUpdate, plan_update
from e2a.store.models import Agent

T0 = datetime(2026, 4, 27, 12, 0, tzinfo=UTC)


def agent(mode="cloud", url="https://h.example/x", status="active"):
    return Agent("bot@x.com", "u", "x.com", "", mode, url, status, None, False, 604800,
                 "reject", True, (), T0, True)


@pytest.mark.parametrize(
    ("current", "update", "mode", "url", "status", "activate", "changed"),
    [
        # webhook on a cloud agent: active + release, even the same URL
        (agent(status="disabled"), AgentUpdate(webhook_url="https://h.example/x"), "cloud", "https://h.example/x", "active", True, False),
        # HITL-only change keeps webhook state
        (agent(status="disabled"), AgentUpdate(hitl_enabled=True), "cloud", "https://h.example/x", None, False, False),
        # to local: webhook cleared, status none
        (agent(), AgentUpdate(agent_mode="local"), "local", "", "none", False, True),
        # to local keeping a URL given in the same request
        (agent(), AgentUpdate(agent_mode="local", webhook_url="https://h.example/y"), "local", "https://h.example/y", "none", False, True),
        # local → cloud with URL
        (agent("local", "", "none"), AgentUpdate(agent_mode="cloud", webhook_url="https://h.example/z"), "cloud", "https://h.example/z", "active", True, True),
        # URL on a local agent without mode: stored, mode and status unchanged
        (agent("local", "", "none"), AgentUpdate(webhook_url="https://h.example/z"), "local", "https://h.example/z", "none", False, False),
    ],
)
def test_plan_update_follows_spec_rules(current, update, mode, url, status, activate, changed):
    """Mode/webhook interplay of §4.4 and the webhook_status effects of mail.md §4.5."""
    plan = plan_update(current, update)
    assert plan.values["agent_mode"] == mode and plan.values["webhook_url"] == url
    assert plan.values.get("webhook_status") == status
    assert plan.activate_webhook is activate and plan.mode_changed is changed


@pytest.mark.parametrize(
    ("current", "update"),
    [
        (agent(), AgentUpdate(agent_mode="cloud")),
        (agent(), AgentUpdate(webhook_url="")),
        (agent("local", "", "none"), AgentUpdate(agent_mode="cloud", webhook_url="")),
    ],
)
def test_plan_update_refused_when_cloud_without_webhook(current, update):
    """A cloud agent can never end with an empty webhook URL."""
    with pytest.raises(BadRequest) as exc:
        plan_update(current, update)
    assert exc.value.code == "webhook_url_required"


def test_agent_update_empty_when_no_field():
    """is_empty drives no_fields."""
    assert AgentUpdate().is_empty() and not AgentUpdate(name="").is_empty()


@pytest.mark.parametrize(
    ("when", "selector"),
    [
        (datetime(2026, 4, 27, 0, 0, tzinfo=UTC), "e2a20260427"),
        (datetime(2026, 4, 27, 23, 30, tzinfo=timezone(timedelta(hours=-3))), "e2a20260428"),
        (datetime(2026, 1, 2, 5, tzinfo=UTC), "e2a20260102"),
    ],
)
def test_dkim_selector_is_e2a_plus_utc_date(when, selector):
    """Selector = e2a + UTC creation date YYYYMMDD."""
    assert selector_for(when) == selector
