"""build_draft: the reviewer's edits on a held message (api.md §7.3), as a table."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from e2a.errors import BadRequest
from e2a.outbound.hitl import build_draft
from e2a.store.models import Agent, HeldAttachment, HeldMessage

T = datetime(2026, 5, 1, tzinfo=UTC)
AGENT = Agent("bot@agents.test", "u1", "agents.test", "Bot", "local", "", "none", None, True, 60, "reject", True, (),
              T, True)
ATT = {"filename": "a.txt", "content_type": "text/plain", "data": base64.b64encode(b"hi").decode()}


def _held(**kw) -> HeldMessage:
    base = dict(
        id="msg_" + "a" * 32, agent_id=AGENT.id, user_id="u1", type="send", status="pending_approval",
        subject="Plan", to=("alice@example.org",), cc=("bob@example.org",), bcc=(), body_text="text", body_html=None,
        attachments=(HeldAttachment(**ATT),), conversation_id="c", in_reply_to="<x@y>", references="<x@y>",
        replied_message_id="<x@y>", approval_expires_at=T, created_at=T, edited=False, reviewed_at=None,
        rejection_reason="", expiration_action="reject",
    )
    base.update(kw)
    return HeldMessage(**base)


@pytest.mark.parametrize(
    ("edits", "edited"),
    [
        (None, False),
        ({}, False),
        ({"subject": " Plan\t"}, False),
        ({"to": ["Alice <ALICE@example.org>"], "cc": ["bob@example.org", "alice@example.org"]}, False),
        ({"body_html": ""}, False),
        ({"subject": None, "to": None}, False),  # null = absent
        ({"unknown": "x"}, False),
        ({"subject": "Plan B"}, True),
        ({"body_text": "other"}, True),
        ({"body_html": "<p>x</p>"}, True),
        ({"bcc": ["carol@example.org"]}, True),
        ({"cc": []}, True),
        ({"attachments": [ATT]}, True),  # present = edit, even when equal
        ({"attachments": []}, True),
    ],
)
def test_edited_only_when_a_normalised_value_differs(edits, edited):
    """A field is an edit only if its normalised value differs; attachments whenever present."""
    draft, was_edited = build_draft(_held(), AGENT, edits, 50)
    assert was_edited is edited
    assert draft.in_reply_to == "<x@y>" and draft.replied_message_id == "<x@y>" and draft.routes == {}


def test_edits_are_normalised_like_a_send():
    """Recipients parsed, lowercased, deduplicated To > Cc > Bcc, the agent itself removed."""
    draft, _ = build_draft(_held(), AGENT, {
        "to": ["Carol <CAROL@example.org>", "bot@agents.test"], "cc": ["carol@example.org", "dan@example.org"],
        "bcc": ["DAN@example.org", "eve@example.org"], "attachments": [],
    }, 50)
    r = draft.recipients
    assert (r.to, r.cc, r.bcc) == (("carol@example.org",), ("dan@example.org",), ("eve@example.org",))
    assert draft.content.attachments == ()


@pytest.mark.parametrize(
    ("held_kw", "edits", "code"),
    [
        ({}, {"to": ["nope"]}, "invalid_address"),
        ({}, {"to": [], "cc": []}, "no_recipients"),
        ({}, {"subject": "a\nb"}, "invalid_header_value"),
        ({}, {"subject": ""}, "missing_field"),
        ({}, {"body_text": ""}, "missing_field"),
        ({}, {"subject": 1}, "invalid_request_body"),
        ({}, {"to": "alice@example.org"}, "invalid_request_body"),
        ({}, {"attachments": {}}, "invalid_request_body"),
        ({}, {"attachments": [{"filename": "a", "data": "%%"}]}, "invalid_attachment"),
        ({}, {"cc": [f"u{i}@example.org" for i in range(50)]}, "too_many_recipients"),
        ({"type": "test", "to": (AGENT.id,), "cc": ()}, {"subject": "x"}, "invalid_field"),
    ],
)
def test_invalid_edits_are_the_send_validation_errors(held_kw, edits, code):
    """Edited content fails with the 400 codes of a send (api.md §6.1 #8)."""
    with pytest.raises(BadRequest) as err:
        build_draft(_held(**held_kw), AGENT, edits, 50)
    assert err.value.code == code
