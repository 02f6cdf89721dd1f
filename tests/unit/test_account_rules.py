"""Pure request rules of the account endpoints (api.md §10.2, §11.1) and admin helpers."""

from __future__ import annotations

import pytest

from e2a.admin import valid_email
from e2a.api.account import key_agent, key_name, secret_name
from e2a.errors import BadRequest


@pytest.mark.parametrize(
    "body,expected",
    [({}, "unnamed"), ({"name": ""}, "unnamed"), ({"name": "   "}, "unnamed"), ({"name": " ci "}, "ci"),
     ({"name": "x" * 100}, "x" * 100), ({"name": " " + "x" * 100 + " "}, "x" * 100)],
)
def test_secret_name_trims_and_defaults(body, expected):
    """Secret names are trimmed; empty becomes "unnamed"."""
    assert secret_name(body) == expected


@pytest.mark.parametrize("body,code", [({"name": "x" * 101}, "invalid_field"), ({"name": 3}, "invalid_request_body")])
def test_secret_name_rejects_long_or_non_string(body, code):
    """Over 100 chars is invalid_field; a non-string is invalid_request_body."""
    with pytest.raises(BadRequest) as e:
        secret_name(body)
    assert e.value.code == code


@pytest.mark.parametrize("body,expected", [({}, ""), ({"name": " a "}, " a "), ({"name": "x" * 100}, "x" * 100)])
def test_key_name_is_kept_as_given(body, expected):
    """Key names default to "" and are not trimmed."""
    assert key_name(body) == expected


def test_key_name_over_100_chars_is_invalid_field():
    """101 chars is too long."""
    with pytest.raises(BadRequest) as e:
        key_name({"name": "x" * 101})
    assert e.value.code == "invalid_field"


@pytest.mark.parametrize("body,expected", [({}, None), ({"agent": ""}, None), ({"agent": " b@x.test "}, "b@x.test")])
def test_key_agent_blank_means_user_scope(body, expected):
    """Absent or blank agent → user-scoped key."""
    assert key_agent(body) == expected


@pytest.mark.parametrize(
    "email,ok",
    [("ops@example.com", True), ("a.b+c@sub.example.org", True), ("ops@localhost", False),
     ("no at", False), ("a@b@c.d", False), ("", False), ("a @b.c", False)],
)
def test_valid_email_for_bootstrap(email, ok):
    """bootstrap accepts plausible mailbox addresses only."""
    assert valid_email(email) is ok
