"""Query and form parsing of the magic-link pages: any bytes a client sends decode without
raising (schemathesis found non-ASCII escapes answering 500)."""

from __future__ import annotations

import pytest

from e2a.api.magiclink_pages import parse_pairs, token_from


@pytest.mark.parametrize(
    ("raw", "pairs"),
    [
        (b"t=abc", [(b"t", b"abc")]),
        (b"t=a%2Bb+c&reason=", [(b"t", b"a+b c"), (b"reason", b"")]),
        (b"%C3%86f=%C2%89&t", [("Æf".encode(), b"\xc2\x89"), (b"t", b"")]),
        (b"t=%FF%FE", [(b"t", b"\xff\xfe")]),
        (b"&&t=1&", [(b"t", b"1")]),
        (b"", []),
    ],
)
def test_parse_pairs_decodes_any_escapes_without_raising(raw, pairs):
    """Percent escapes and ``+`` are decoded to bytes, whatever they encode."""
    assert parse_pairs(raw) == pairs


def test_token_from_non_utf8_value_is_present_but_invalid():
    """A token that is not UTF-8 is reported (as U+FFFD), so the page says "invalid", not "missing"."""
    assert token_from(parse_pairs(b"t=%FF")) == "\ufffd"
