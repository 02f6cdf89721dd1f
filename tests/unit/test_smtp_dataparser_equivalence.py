"""DataScanner's fast checks agree with the straightforward per-line implementation.

The reference ``_take`` below is the original one (split every region into lines, take the
longest). Seeded random content with long lines, bare CR/LF, NUL, dot-stuffing and headers is
fed in random chunkings to both; every flag, the size and the content must match.
"""

from __future__ import annotations

import random

import pytest

from e2a.smtp.dataparser import _CRLF, _STUFFED, DataLimits, DataScanner


class _ReferenceScanner(DataScanner):
    def _take(self, region: bytes, fragment: bool = False) -> None:
        if not region:
            return
        stuffed = region.count(_STUFFED)
        n = len(region) - stuffed
        starts_with_synthetic = self._first and not self._mid_line
        if starts_with_synthetic:
            n -= 2
            self._first = False
        self._count(n)
        if not self.bad_line_ending:
            crlf = region.count(_CRLF)
            if b"\x00" in region or region.count(b"\r") != crlf or region.count(b"\n") != crlf:
                self.bad_line_ending = True
                self._reject()
        lines = region.split(_CRLF)
        if not self.line_too_long and not fragment:
            if max(map(len, lines)) > self._limits.max_line_length:
                self.line_too_long = True
                self._reject()
        if self._in_headers:
            self._scan_headers(lines, head_is_continuation=self._mid_line, fragment=fragment)
        if self._chunks is not None:
            unstuffed = region.replace(_STUFFED, _CRLF) if stuffed else region
            self._chunks.append(unstuffed[2:] if starts_with_synthetic else unstuffed)


def _line(rng: random.Random, limit: int) -> bytes:
    kind = rng.random()
    if kind < 0.02:
        length = rng.randint(limit - 2, limit + 3)
    elif kind < 0.025:
        length = rng.randint(limit, 3 * limit)
    else:
        length = rng.randint(0, max(1, limit // 3))
    alphabet = b"abc .:\t-"
    line = bytearray(rng.choice(alphabet) for _ in range(length))
    if line and rng.random() < 0.01:
        line[rng.randrange(len(line))] = rng.choice(b"\r\n\x00")
    if rng.random() < 0.05:
        line[:0] = b"."
    return bytes(line)


def _message(rng: random.Random, limit: int) -> bytes:
    head = [b"Subject: x", b"From: a@b"]
    if rng.random() < 0.2:
        head.append(_line(rng, limit))
    if rng.random() < 0.1:
        head.append(b" continued")
    body = [_line(rng, limit) for _ in range(rng.randint(0, 60))]
    lines = head + [b""] + body
    if rng.random() < 0.05:
        lines = body
    return b"\r\n".join(ln for ln in lines if ln != b".") + b"\r\n.\r\n"


def _run(cls, data: bytes, cuts: list[int], limits: DataLimits):
    scanner = cls(limits)
    pos = 0
    for cut in [*cuts, len(data)]:
        consumed = scanner.feed(data[pos:cut])
        if consumed is not None:
            break
        pos = cut
    state = (scanner.done, scanner.size, scanner.too_large, scanner.line_too_long, scanner.bad_line_ending,
             scanner.header_too_large, scanner.header_malformed, scanner.verdict)
    content = scanner.content if scanner._chunks is not None and scanner.done else None
    return consumed, state, content


@pytest.mark.parametrize("seed", range(400))
def test_scanner_matches_reference_when_fed_random_content(seed):
    """Same verdict, flags, size and content as the per-line reference, any chunking."""
    rng = random.Random(seed)
    limit = rng.choice([8, 9, 20, 77, 1000])
    limits = DataLimits(max_message_size=rng.choice([10**7, 3000]), max_line_length=limit,
                        max_header_size=rng.choice([102400, 60]))
    data = _message(rng, limit)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
    assert _run(DataScanner, data, cuts, limits) == _run(_ReferenceScanner, data, cuts, limits)
