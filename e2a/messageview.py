"""What e2a reads out of a message's top-level header section, parsed once (mail.md §1.7).

Pure functions over :func:`e2a.mailsyntax.headers.split_header_section` output. Values are
for display, listing and threading; none of them is trusted for authentication (the verdict
comes from SPF/DKIM/DMARC).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from functools import cached_property

from e2a.mailsyntax.headers import HeaderField, field_value

MAX_LISTED_ADDRESSES = 100
MAX_THREAD_CANDIDATES = 50
# The cost bound of parsing one address field (issue 15.3): only the part of the value up to
# the MAX_PARSED_ADDRESSES-th top-level comma, and at most MAX_PARSED_CHARS of it, goes to
# the (slow, pure-Python) RFC 5322 parser. Twice the stored list, so invalid entries among the
# first hundred still leave room for valid ones.
MAX_PARSED_ADDRESSES = 2 * MAX_LISTED_ADDRESSES
MAX_PARSED_CHARS = 8 * 1024
_MSGID_RE = re.compile(r"<[^<>\s]+>")
_ADDR_RE = re.compile(r"^[\x21-\x7e]+@[\x21-\x7e]+$")


def _unfold(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    return re.sub(r"\r?\n(?=[ \t])", "", text).strip().rstrip("\r\n")


@dataclass(frozen=True)
class MessageView:
    subject: str
    message_id: str
    in_reply_to: str
    references: str
    from_values: tuple[str, ...]
    reply_to_values: tuple[str, ...]
    to_values: tuple[str, ...]
    cc_values: tuple[str, ...]

    @classmethod
    def from_fields(cls, fields: Sequence[HeaderField]) -> MessageView:
        values: dict[str, list[str]] = {}
        for f in fields:
            if f.name is None:
                continue
            values.setdefault(f.name.decode("ascii", "replace").lower(), []).append(_unfold(field_value(f)))

        def first(name: str) -> str:
            return values.get(name, [""])[0]

        return cls(
            subject=first("subject"),
            message_id=first("message-id"),
            in_reply_to=first("in-reply-to"),
            references=first("references"),
            from_values=tuple(values.get("from", [])),
            reply_to_values=tuple(values.get("reply-to", [])),
            to_values=tuple(values.get("to", [])),
            cc_values=tuple(values.get("cc", [])),
        )

    @property
    def message_id_token(self) -> str:
        m = _MSGID_RE.search(self.message_id)
        return m.group(0) if m else self.message_id.strip()

    # Parsed once per message and cached: the accept asks for them once per recipient copy
    # (issue 15.3: re-parsing per copy on the reactor made one message cost seconds).

    def to_addresses(self) -> list[str] | None:
        """Parsed ``To`` addresses (≤ 100); None when absent or unparseable."""
        return self._to

    def cc_addresses(self) -> list[str]:
        return self._cc

    def single_from(self) -> str | None:
        """The From address when there is exactly one From field with one usable mailbox."""
        return self._single_from

    def display_sender(self) -> str:
        """api.md §2.3 ``from``: the single parseable Reply-To address, else the From address."""
        return self._display_sender

    def parse(self) -> MessageView:
        """Parse every address field now (e.g. in a worker thread, before the view is used on
        the reactor); returns self."""
        _ = (self._to, self._cc, self._display_sender)
        return self

    @cached_property
    def _to(self) -> list[str] | None:
        return parse_address_list(self.to_values)

    @cached_property
    def _cc(self) -> list[str]:
        return parse_address_list(self.cc_values) or []

    @cached_property
    def _single_from(self) -> str | None:
        if len(self.from_values) != 1:
            return None
        addrs = parse_address_list(self.from_values)
        return addrs[0] if addrs and len(addrs) == 1 else None

    @cached_property
    def _display_sender(self) -> str:
        if len(self.reply_to_values) == 1:
            addrs = parse_address_list(self.reply_to_values)
            if addrs and len(addrs) == 1:
                return addrs[0]
        return self._single_from or ""

    def thread_candidates(self) -> list[str]:
        """mail.md §6: msg-id tokens of In-Reply-To, then References last to first; ≤ 50."""
        out: list[str] = []
        for token in _MSGID_RE.findall(self.in_reply_to) + list(reversed(_MSGID_RE.findall(self.references))):
            if token not in out:
                out.append(token)
            if len(out) >= MAX_THREAD_CANDIDATES:
                break
        return out


_LIST_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[^",<>()\\]+|.', re.S)


def bounded_prefix(value: str, max_addresses: int = MAX_PARSED_ADDRESSES, max_chars: int = MAX_PARSED_CHARS) -> str:
    """The start of an address-list value holding at most ``max_addresses`` entries (cut at
    the top-level comma after them) and at most ``max_chars`` characters.

    Linear and cheap (a regex tokenizer over quoted strings, comments, angle addresses), so
    the RFC 5322 parser behind it only ever sees a bounded input.
    """
    value = value[:max_chars]
    if value.count(",") < max_addresses:
        return value
    depth = 0  # comment nesting
    angle = False
    commas = 0
    for m in _LIST_TOKEN.finditer(value):
        tok = m.group(0)
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth = max(0, depth - 1)
        elif depth or tok[0] == '"' or tok[0] == "\\":
            continue
        elif tok == "<":
            angle = True
        elif tok == ">":
            angle = False
        elif tok == "," and not angle:
            commas += 1
            if commas >= max_addresses:
                return value[: m.start()]
    return value


def parse_address_list(values: Sequence[str]) -> list[str] | None:
    """Addresses of one or more header values, at most ``MAX_LISTED_ADDRESSES``; the parse
    cost is bounded per field, not per value (:func:`bounded_prefix` with one budget shared by
    all the values): ``getaddresses`` joins its values into one string and its cost grows
    faster than linearly with that string, so twelve 8 KiB ``To:`` lines of ``@`` cost 0.85 s
    of CPU with a per-value bound, 30 ms with this one."""
    if not values:
        return None
    chars, entries = MAX_PARSED_CHARS, MAX_PARSED_ADDRESSES
    parts: list[str] = []
    for value in values[:MAX_PARSED_ADDRESSES]:
        if chars <= 0 or entries <= 0:
            break
        part = bounded_prefix(value, max_addresses=entries, max_chars=chars)
        parts.append(part)
        chars -= len(part) + 2  # getaddresses joins the values with ", "
        entries -= part.count(",") + 1
    try:
        pairs = getaddresses(parts)
    except Exception:  # malformed input, or RecursionError for deeply nested comments
        return None
    addrs = [addr for _name, addr in pairs if addr and _ADDR_RE.match(addr)]
    if not addrs:
        return None
    return addrs[:MAX_LISTED_ADDRESSES]
