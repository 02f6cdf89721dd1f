"""Issue 15.7, attacker's variants: a leading continuation line (or another line that cannot
start a header section) is refused however the bytes are split into TCP reads, also after a
dot-stuffing dot, while a blank first line (no header section) and folding after a field stay
accepted (pure)."""

from __future__ import annotations

import pytest

from e2a.smtp.dataparser import DataLimits, DataScanner, DataVerdict

REFUSED = [
    b" x\r\nA: b\r\n\r\nbody\r\n",
    b"\tx\r\n\r\n",
    b". x\r\nA: b\r\n\r\n",  # a stuffed dot, then SP
    b".\tx\r\n\r\n",
    b" \r\n\r\n",
    b"\t\r\nA: b\r\n\r\n",
    b"\x0bA: b\r\n\r\n",
    b"\x0cA: b\r\n\r\n",
    b"\xa0A: b\r\n\r\n",
    b"\r A: b\r\n\r\n",  # CR-only line
]
ACCEPTED = [b"\r\n x\r\nA: b\r\n", b"A: b\r\n x\r\n\r\n"]


def _verdict(message: bytes, cuts: list[int], limits: DataLimits | None = None) -> DataVerdict | None:
    scanner = DataScanner(limits or DataLimits())
    data = message + b".\r\n"
    prev = 0
    for cut in [*cuts, len(data)]:
        scanner.feed(data[prev:cut])
        prev = cut
    assert scanner.done
    return scanner.verdict


@pytest.mark.parametrize("message", REFUSED)
def test_bad_header_start_refused_at_every_split(message):
    """Every split of the content into 3 reads: refused (malformed header or bare CR)."""
    for i in range(1, len(message) + 2):
        for j in range(i, min(len(message) + 3, i + 6)):
            assert _verdict(message, [i, j]) in (DataVerdict.HEADER_MALFORMED, DataVerdict.BAD_LINE_ENDING), (i, j)


@pytest.mark.parametrize("message", ACCEPTED)
def test_blank_first_line_and_folding_after_a_field_accepted(message):
    """No header section at all, or folding after a field: accepted at every split."""
    for i in range(1, len(message) + 2):
        assert _verdict(message, [i]) is None, i


def test_overlong_leading_continuation_refused_at_every_split():
    """A leading continuation longer than the line limit, split anywhere: still refused."""
    message = b" " + b"x" * 100 + b"\r\nA: b\r\n\r\n"
    for i in range(1, 120, 7):
        assert _verdict(message, [i], DataLimits(max_line_length=50)) in (
            DataVerdict.LINE_TOO_LONG, DataVerdict.HEADER_MALFORMED), i
