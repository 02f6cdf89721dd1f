"""The console's recipient-field splitting: entries for the API's one address rule."""

from __future__ import annotations

import pytest

from e2a.api.wire import parse_recipient, split_recipient_text


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        ("", []),
        ("a@x.com, b@y.com\nc@z.com", ["a@x.com", "b@y.com", "c@z.com"]),
        ('"Doe, Jane" <jane@example.com>', ['"Doe, Jane" <jane@example.com>']),
        ('"Doe, Jane" <jane@example.com>, bob@example.net', ['"Doe, Jane" <jane@example.com>', "bob@example.net"]),
        ('"Say \\"hi, there\\"" <a@x.com>,b@x.com', ['"Say \\"hi, there\\"" <a@x.com>', "b@x.com"]),
        ('"a,b"@x.com, c@x.com', ['"a,b"@x.com', "c@x.com"]),
        ("Jane <jane@example.com>,,\n\n , ", ["Jane <jane@example.com>"]),
        ('"unterminated, x@y.com\nb@x.com', ['"unterminated, x@y.com', "b@x.com"]),  # one bad line stays one
        ("a@x.com\r\nb@x.com", ["a@x.com", "b@x.com"]),
    ],
)
def test_split_recipient_text_keeps_quoted_commas_together(text, entries):
    """Commas split only outside quotes and <…>; new lines always split."""
    assert split_recipient_text(text) == entries


def test_split_entries_parse_with_the_api_rule():
    """Every entry of a display-name list parses to its bare lowercased address."""
    text = '"Doe, Jane" <Jane@Example.com>, "a,b"@x.com'
    assert [parse_recipient(e) for e in split_recipient_text(text)] == ["jane@example.com", '"a,b"@x.com']
