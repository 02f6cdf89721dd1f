"""The address-list parse budget is per field, not per value (issue 15.3, attacker's variant).

``getaddresses`` joins all values of a field into one string, and its cost grows faster than
linearly with it: a bound of 8 KiB per value still let twelve 8 KiB ``To:`` lines of ``@`` cost
0.85 s of CPU per message (in a worker thread, but holding the GIL)."""

from __future__ import annotations

from e2a import messageview
from e2a.mailauth.authheaders import split_header_section
from e2a.messageview import MAX_PARSED_ADDRESSES, MAX_PARSED_CHARS, MessageView, parse_address_list


def _view(header: bytes) -> MessageView:
    fields, _ = split_header_section(header + b"\r\nbody\r\n")
    return MessageView.from_fields(fields).parse()


def test_many_large_to_fields_share_one_parse_budget(monkeypatch):
    """Twelve 8 KiB To: values: the parser sees at most MAX_PARSED_CHARS (+ joins) in all."""
    seen: list[int] = []
    real = messageview.getaddresses

    def spy(values):
        seen.append(sum(len(v) + 2 for v in values))
        return real(values)

    monkeypatch.setattr(messageview, "getaddresses", spy)
    _view(b"".join(b"To: " + b"@" * 8000 + b"\r\n" for _ in range(12))).to_addresses()
    assert seen and max(seen) <= MAX_PARSED_CHARS + 2


def test_many_small_values_share_one_entry_budget():
    """500 To: lines of one address each: at most the listed cap, first ones kept, in order."""
    values = [f"u{i}@example.com" for i in range(500)]
    got = parse_address_list(values)
    assert got == values[: len(got)] and 0 < len(got) <= MAX_PARSED_ADDRESSES


def test_ordinary_fields_parse_as_before():
    """Several To:/Cc: lines of a normal message give every address, in order."""
    view = _view(b"To: a@b.example\r\nTo: \"D\" <d@e.example>, f@g.example\r\nCc: x@y.example, w@v.example\r\n")
    assert view.to_addresses() == ["a@b.example", "d@e.example", "f@g.example"]
    assert view.cc_addresses() == ["x@y.example", "w@v.example"]
