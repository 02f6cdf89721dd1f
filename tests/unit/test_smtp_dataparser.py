"""Table and property tests for the DATA-phase byte scanner (mail.md §1.3, §1.5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2a.smtp.dataparser import (
    DataLimits,
    DataScanner,
    DataVerdict,
    data_verdict,
    is_header_line,
)

LIMITS = DataLimits(max_message_size=4096, max_line_length=100, max_header_size=512)


def scan(data: bytes, chunks: list[int] | None = None, limits: DataLimits = LIMITS):
    """Feed ``data`` split at ``chunks`` offsets; return (scanner, consumed or None)."""
    scanner = DataScanner(limits)
    cuts = [0, *(chunks or []), len(data)]
    consumed = 0
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece = data[a:b]
        n = scanner.feed(piece)
        if n is not None:
            return scanner, consumed + n
        consumed += len(piece)
    return scanner, None


GOOD = b"Subject: hi\r\nFrom: a@b.test\r\n\r\nbody\r\n"

CASES = [
    # (name, input, consumed, verdict, content)
    ("first line dot ends", b".\r\nMAIL", 3, None, b""),
    ("empty line then end", b"\r\n.\r\n", 5, None, b"\r\n"),
    ("simple", GOOD + b".\r\n", len(GOOD) + 3, None, GOOD),
    ("dot unstuffed", b"a: b\r\n\r\n..x\r\n..\r\n.\r\n", 20, None, b"a: b\r\n\r\n.x\r\n.\r\n"),
    ("dot stuffed header line", b"..a: b\r\n\r\n.\r\n", 13, None, b".a: b\r\n\r\n"),
    ("rest stays", GOOD + b".\r\nQUIT\r\n", len(GOOD) + 3, None, GOOD),
    ("bare LF", b"a: b\nc\r\n.\r\n", 11, DataVerdict.BAD_LINE_ENDING, None),
    ("bare CR", b"a: b\rc\r\n.\r\n", 11, DataVerdict.BAD_LINE_ENDING, None),
    ("CR before CRLF", b"a: b\r\r\n.\r\n", 10, DataVerdict.BAD_LINE_ENDING, None),
    ("NUL", b"a: b\x00\r\n.\r\n", 10, DataVerdict.BAD_LINE_ENDING, None),
    ("no headers body text", b"hello\r\n.\r\n", 10, DataVerdict.HEADER_MALFORMED, None),
    ("space before colon ok", b"Subject : x\r\n\r\n.\r\n", 18, None, b"Subject : x\r\n\r\n"),
    ("continuation ok", b"A: b\r\n\tc\r\n\r\nz\r\n.\r\n", 18, None, b"A: b\r\n\tc\r\n\r\nz\r\n"),
    ("no header section", b"\r\nbody\r\n.\r\n", 11, None, b"\r\nbody\r\n"),
    ("colon in name", b"::\r\n\r\n.\r\n", 9, DataVerdict.HEADER_MALFORMED, None),
    ("body not checked", b"A: b\r\n\r\nnot a header\r\n.\r\n", 25, None, b"A: b\r\n\r\nnot a header\r\n"),
    # issue 15.7: a first line starting with SP/TAB continues nothing (it would join e2a's Received:)
    ("leading space line", b" x: y\r\nA: b\r\n\r\n.\r\n", 18, DataVerdict.HEADER_MALFORMED, None),
    ("leading tab line", b"\tfor <v@x>; evil\r\nA: b\r\n\r\n.\r\n", 29, DataVerdict.HEADER_MALFORMED, None),
]


@pytest.mark.parametrize(("name", "data", "consumed", "verdict", "content"), CASES, ids=[c[0] for c in CASES])
def test_scan_table_matches_spec(name, data, consumed, verdict, content):
    """Each table row yields its consumed length, verdict and unstuffed content."""
    scanner, n = scan(data)
    assert n == consumed
    assert scanner.verdict == verdict
    if verdict is None:
        assert scanner.content == content
        assert scanner.size == len(content)


SMUGGLE = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r\n\x00.\r\n",
    b"\r.\r\n",
]


@pytest.mark.parametrize("variant", SMUGGLE, ids=repr)
def test_smuggled_end_of_data_never_ends_data(variant):
    """An smtpsmug end-of-data variant is content, taints the message, and the real end wins."""
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bot@a.test>\r\nDATA\r\nX: y\r\n"
    data = b"A: b\r\n\r\nfirst" + variant + smuggled + b"\r\n.\r\nNEXT"
    scanner, n = scan(data)
    assert n == len(data) - len(b"NEXT")
    assert scanner.verdict == DataVerdict.BAD_LINE_ENDING


@pytest.mark.parametrize("variant", SMUGGLE, ids=repr)
def test_smuggled_end_of_data_not_terminated_needs_real_end(variant):
    """Without a real <CRLF>.<CRLF> the scanner keeps asking for more input."""
    scanner, n = scan(b"A: b\r\n\r\nfirst" + variant + b"QUIT\r\n")
    assert n is None and not scanner.done


def test_line_too_long_consumed_to_real_end():
    """An over-long line is counted, not buffered, and the body after it is still content."""
    data = b"A: b\r\n\r\n" + b"x" * 5000 + b"\r\nRSET\r\nMAIL FROM:<a@b.c>\r\n.\r\n"
    limits = DataLimits(max_message_size=10**6, max_line_length=100, max_header_size=512)
    for chunks in ([], [10], [500, 1000, 4000]):
        scanner, n = scan(data, chunks, limits)
        assert n == len(data)
        assert scanner.verdict == DataVerdict.LINE_TOO_LONG
        assert len(scanner._buf) <= 0  # nothing carried after the end


def test_line_too_long_buffer_stays_bounded():
    """While an endless line streams in, the carried buffer never exceeds the line limit."""
    scanner = DataScanner(LIMITS)
    scanner.feed(b"A: b\r\n\r\n")
    for _ in range(200):
        assert scanner.feed(b"y" * 1000) is None
        assert len(scanner._buf) <= LIMITS.max_line_length + 3
    assert scanner.line_too_long and scanner._chunks is None


def test_line_exactly_at_limit_is_fine():
    """A line of exactly max_line_length octets (CRLF excluded) is accepted."""
    line = b"x" * 100
    data = b"A: b\r\n\r\n" + line + b"\r\n.\r\n"
    for cut in range(len(data)):
        scanner, n = scan(data, [cut])
        assert scanner.verdict is None, cut
        assert scanner.content == b"A: b\r\n\r\n" + line + b"\r\n"


def test_line_one_over_limit_rejected():
    """A line of max_line_length + 1 octets is refused with the line-length verdict."""
    data = b"A: b\r\n\r\n" + b"x" * 101 + b"\r\n.\r\n"
    for cut in range(len(data)):
        scanner, _ = scan(data, [cut])
        assert scanner.verdict == DataVerdict.LINE_TOO_LONG, cut


def test_too_large_counted_and_discarded():
    """Content over max_message_size is consumed to the end, counted, not kept."""
    body = (b"z" * 98 + b"\r\n") * 100
    data = b"A: b\r\n\r\n" + body + b".\r\n"
    scanner, n = scan(data, [1000, 2000, 9000])
    assert n == len(data)
    assert scanner.verdict == DataVerdict.TOO_LARGE
    assert scanner.size == len(data) - 3
    assert scanner._chunks is None


def test_size_exactly_at_limit_accepted():
    """Unstuffed content of exactly max_message_size octets is fine."""
    limits = DataLimits(max_message_size=20, max_line_length=100, max_header_size=100)
    content = b"A: b\r\n\r\n" + b"." * 10 + b"\r\n"  # 20 octets once unstuffed
    data = b"A: b\r\n\r\n." + b"." * 10 + b"\r\n.\r\n"
    scanner, _ = scan(data, limits=limits)
    assert scanner.verdict is None and scanner.content == content


def test_too_large_wins_over_other_verdicts():
    """Verdict order: size first, then line length, then bare CR/LF."""
    data = b"bad\n" + b"y" * 200 + b"\r\n" + b"z" * 5000 + b"\r\n.\r\n"
    limits = DataLimits(max_message_size=1000, max_line_length=100, max_header_size=100)
    assert scan(data, limits=limits)[0].verdict == DataVerdict.TOO_LARGE


def test_header_section_too_large():
    """A header section over max_header_size is refused even when every line is valid."""
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(20))
    scanner, _ = scan(headers + b"\r\nbody\r\n.\r\n", [7, 300])
    assert scanner.verdict == DataVerdict.HEADER_TOO_LARGE


def test_header_too_large_without_empty_line():
    """A message that is all header lines counts whole as its header section."""
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(20))
    assert scan(headers + b".\r\n")[0].verdict == DataVerdict.HEADER_TOO_LARGE


def test_verdict_order_is_spec_order():
    """data_verdict picks the first applicable item of mail.md §1.5."""
    flags = dict(too_large=True, line_too_long=True, bad_line_ending=True, header_too_large=True, header_malformed=True)
    order = [
        ("too_large", DataVerdict.TOO_LARGE),
        ("line_too_long", DataVerdict.LINE_TOO_LONG),
        ("bad_line_ending", DataVerdict.BAD_LINE_ENDING),
        ("header_too_large", DataVerdict.HEADER_TOO_LARGE),
        ("header_malformed", DataVerdict.HEADER_MALFORMED),
    ]
    for key, expected in order:
        assert data_verdict(**flags) == expected
        flags[key] = False
    assert data_verdict(**flags) is None


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        (b"Subject: x", True),
        (b"Subject:", True),
        (b"Subject \t: x", True),
        (b" folded", True),
        (b"\tfolded", True),
        (b"No colon", False),
        (b": empty name", False),
        (b"Sub ject: x", False),
        (b"", False),
        (b"\x7fX: y", False),
    ],
)
def test_is_header_line_table(line, ok):
    """Header line rule of mail.md §1.5 item 5."""
    assert is_header_line(line) is ok


def test_feed_after_done_raises():
    """A finished scanner refuses more input (the session must switch back to commands)."""
    scanner, _ = scan(b".\r\n")
    with pytest.raises(RuntimeError):
        scanner.feed(b"x")


MESSAGES = [
    b"A: b\r\n\r\n..x\r\n.y\r\nz\r\n.\r\nQUIT\r\n",
    b"A: b\r\n\r\n" + b"q" * 150 + b"\r\nRSET\r\n.\r\n",
    b"A: b\nB: c\r\n\r\n.\r\nMAIL",
    b"A: b\r\n\r\nx\r\n.\n.\r\nRSET\r\n.\r\nNOOP\r\n",
    b"\r\n\r\n.\r\n",
    b".\r\n.\r\n",
    b"A: b\r\n\r\nx\r\n\x00.\r\n.\r\n",
    b"A: b\r\n\r\nx\r.\r\ny\r\n.\r\n",
]


@pytest.mark.parametrize("data", MESSAGES, ids=range(len(MESSAGES)))
def test_every_split_point_gives_same_result(data):
    """Splitting the input at any byte offset changes nothing."""
    whole, n = scan(data)
    expected = (n, whole.verdict, whole.size, whole.content if whole.verdict is None else None)
    for cut in range(len(data) + 1):
        s, m = scan(data, [cut])
        assert (m, s.verdict, s.size, s.content if s.verdict is None else None) == expected, cut


_alphabet = st.sampled_from([b"\r", b"\n", b".", b"a", b":", b" ", b"\x00", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"x" * 40])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_alphabet, max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_property_chunking_is_invisible(parts, cuts):
    """For random content and random chunk boundaries, the outcome equals one-chunk scanning."""
    data = b"".join(parts) + b"\r\n.\r\n"
    limits = DataLimits(max_message_size=300, max_line_length=60, max_header_size=120)
    whole, n = scan(data, limits=limits)
    offsets = sorted({c for c in cuts if c <= len(data)})
    split, m = scan(data, offsets, limits=limits)
    assert m == n
    assert (split.verdict, split.size) == (whole.verdict, whole.size)
    if whole.verdict is None:
        assert split.content == whole.content
        # Reference semantics: content is everything before the first <CRLF>.<CRLF>, unstuffed.
        raw = (b"\r\n" + data)[: (b"\r\n" + data).find(b"\r\n.\r\n") + 2]
        assert split.content == raw.replace(b"\r\n.", b"\r\n")[2:]
