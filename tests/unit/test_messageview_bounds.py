"""Issue 15.3: the address-list parse of a MessageView is bounded per field and done once."""

from __future__ import annotations

import pytest

from e2a.messageview import MAX_PARSED_CHARS, MessageView, bounded_prefix, parse_address_list

CUTS = [
    # (value, max_addresses, expected prefix)
    ("a@b, c@d, e@f", 2, "a@b, c@d"),
    ("a@b, c@d", 2, "a@b, c@d"),
    ('"a,b" <x@y>, (q,r) z@w, k@l', 2, '"a,b" <x@y>, (q,r) z@w'),
    ("<a,b@c>, d@e, f@g", 2, "<a,b@c>, d@e"),
    ('"esc\\",aped" <x@y>, k@l, m@n', 2, '"esc\\",aped" <x@y>, k@l'),
    ("(nested (c,o) mment) a@b, c@d, e@f", 2, "(nested (c,o) mment) a@b, c@d"),
]


@pytest.mark.parametrize(("value", "limit", "expected"), CUTS)
def test_bounded_prefix_cuts_at_top_level_comma(value, limit, expected):
    """Commas inside quotes, comments and angle brackets do not count."""
    assert bounded_prefix(value, limit) == expected


def test_bounded_prefix_caps_characters():
    """One endless entry is cut at MAX_PARSED_CHARS."""
    assert len(bounded_prefix("x" * (MAX_PARSED_CHARS * 3))) == MAX_PARSED_CHARS


@pytest.mark.parametrize(
    "value",
    [
        ", ".join(f'"U, {i} (x)" <u{i}@e.com>' for i in range(5000)),
        "(" * 50_000 + ")" * 50_000,
        '"' + "a," * 50_000,
        "a@b," * 50_000,
        "<" * 100_000,
        "@" * 100_000,
    ],
    ids=["many", "nested-comments", "open-quote", "commas", "angles", "ats"],
)
def test_parse_address_list_bounded_cost(value, monkeypatch):
    """Hostile 100 KiB values reach the parser cut to MAX_PARSED_CHARS and yield ≤ 100
    addresses. What bounds the cost is that cut: ``getaddresses`` grows faster than linearly
    with its input (8 KiB of ``@`` ≈ 28 ms here, 16 KiB no more, since the cut applies), so the
    test checks the input it is given, not a time."""
    import e2a.messageview as mv

    seen: list[int] = []
    real = mv.getaddresses
    monkeypatch.setattr(mv, "getaddresses", lambda parts: seen.append(len(", ".join(parts))) or real(parts))
    result = parse_address_list([value])
    assert seen and max(seen) <= MAX_PARSED_CHARS
    assert result is None or len(result) <= 100


def test_several_values_share_one_budget(monkeypatch):
    """Twelve 8 KiB ``To:`` lines together reach the parser as at most MAX_PARSED_CHARS, not
    twelve times that."""
    import e2a.messageview as mv

    seen: list[int] = []
    real = mv.getaddresses
    monkeypatch.setattr(mv, "getaddresses", lambda parts: seen.append(len(", ".join(parts))) or real(parts))
    parse_address_list(["@" * 8192] * 12)
    assert len(seen) == 1 and seen[0] <= MAX_PARSED_CHARS


def test_view_parses_each_field_once(monkeypatch):
    """to/cc/display sender asked per copy reuse the one parse."""
    import e2a.messageview as mv

    calls = []
    real = mv.parse_address_list
    monkeypatch.setattr(mv, "parse_address_list", lambda values: calls.append(1) or real(values))
    view = MessageView("", "", "", "", ("a@b.c",), (), ("x@y.z",), ("c@d.e",)).parse()
    n = len(calls)
    for _ in range(50):
        assert view.to_addresses() == ["x@y.z"] and view.cc_addresses() == ["c@d.e"]
        assert view.display_sender() == "a@b.c"
    assert len(calls) == n
