"""The top-level header section of a raw message (mail.md §1.7, §1.8), parsed once (pure).

Bytes in, bytes out: field names and values are never decoded here, so stripping and
signing see exactly what was received.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = ["HeaderField", "field_value", "is_well_formed", "split_header_section"]

_WSP = b" \t"
_FIELD_NAME_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


class HeaderField(NamedTuple):
    """One top-level header field.

    ``name`` is the bytes before the first colon with trailing SP/TAB trimmed, original
    case; ``None`` for a line that is not ``name:`` (no colon, or a continuation line with
    no field before it). ``raw`` is the whole field with its continuation lines and line
    endings, exactly as received.
    """

    name: bytes | None
    raw: bytes


def _lines(data: bytes, start: int, end: int) -> Iterable[tuple[int, int]]:
    """(start, end) of each line in data[start:end]; a line ends after LF (CRLF included)."""
    pos = start
    while pos < end:
        nl = data.find(b"\n", pos, end)
        stop = end if nl < 0 else nl + 1
        yield pos, stop
        pos = stop


def split_header_section(raw: bytes) -> tuple[list[HeaderField], int]:
    """Parse the top-level header section once (§1.7 item 1).

    Returns ``(fields, body_offset)``. The fields are contiguous from offset 0, so
    ``b"".join(f.raw for f in fields)`` is the header section without the empty separator
    line; ``body_offset`` is the first byte after that empty line (``len(raw)`` when there
    is none). A line ends at LF (normally CRLF: SMTP rejects bare CR/LF, §1.3; bare LF is
    tolerated so composed test input parses); the section ends at the first empty line.
    A line starting with SP/TAB continues the previous field. Malformed lines are kept
    (``name=None``) rather than ending the section, so that nothing after them can hide
    from stripping; the SMTP layer rejects such messages (§1.5 item 5, see
    :func:`is_well_formed`).
    """
    fields: list[HeaderField] = []
    cur_start: int | None = None
    cur_name: bytes | None = None
    n = len(raw)
    for start, stop in _lines(raw, 0, n):
        line = raw[start:stop]
        if line in (b"\r\n", b"\n"):
            if cur_start is not None:
                fields.append(HeaderField(cur_name, raw[cur_start:start]))
            return fields, stop
        if line[:1] in (b" ", b"\t") and cur_start is not None:
            continue  # continuation of the current field
        if cur_start is not None:
            fields.append(HeaderField(cur_name, raw[cur_start:start]))
        cur_start = start
        if line[:1] in (b" ", b"\t"):
            cur_name = None  # leading continuation line with nothing to continue
        else:
            colon = line.find(b":")
            cur_name = None if colon < 0 else line[:colon].rstrip(_WSP)
    if cur_start is not None:
        fields.append(HeaderField(cur_name, raw[cur_start:]))
    return fields, n


def is_well_formed(fields: Sequence[HeaderField]) -> bool:
    """§1.5 item 5: every field is ``name:`` with a name of printable ASCII without colon
    (whitespace before the colon already trimmed)."""
    return all(f.name is not None and _FIELD_NAME_RE.fullmatch(f.name) for f in fields)


def field_value(field: HeaderField) -> bytes:
    """The bytes after the colon, continuation lines and line endings included."""
    colon = field.raw.find(b":")
    return field.raw[colon + 1:] if colon >= 0 else b""
