"""Header-bound text (api.md §0.11): values that end up in mail headers (pure)."""

from __future__ import annotations

import re

from e2a.errors import BadRequest

__all__ = ["check_header_text", "has_control_chars"]

# C0 controls and DEL, except TAB (api.md §0.11 header-bound text).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def has_control_chars(text: str) -> bool:
    """True when ``text`` holds CR, LF, NUL or any other C0 control or DEL (TAB is fine)."""
    return _CONTROL_RE.search(text) is not None


def check_header_text(field: str, value: str) -> str:
    """Header-bound text rule (api.md §0.11): returns ``value`` or raises 400
    ``invalid_header_value``. Such values end up in mail headers, where a CR/LF would let a
    caller inject headers of their own."""
    if has_control_chars(value):
        raise BadRequest(f"{field} contains a control character", code="invalid_header_value")
    return value
