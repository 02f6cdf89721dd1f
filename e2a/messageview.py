"""What e2a reads out of a message's top-level header section, parsed once (mail.md §1.7).

Pure functions over :func:`e2a.mailauth.authheaders.split_header_section` output. Values are
for display, listing and threading; none of them is trusted for authentication (the verdict
comes from SPF/DKIM/DMARC).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from e2a.mailauth.authheaders import HeaderField, field_value

MAX_LISTED_ADDRESSES = 100
MAX_THREAD_CANDIDATES = 50
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

    def to_addresses(self) -> list[str] | None:
        """Parsed ``To`` addresses (≤ 100); None when absent or unparseable."""
        return parse_address_list(self.to_values)

    def cc_addresses(self) -> list[str]:
        return parse_address_list(self.cc_values) or []

    def single_from(self) -> str | None:
        """The From address when there is exactly one From field with one usable mailbox."""
        if len(self.from_values) != 1:
            return None
        addrs = parse_address_list(self.from_values)
        return addrs[0] if addrs and len(addrs) == 1 else None

    def display_sender(self) -> str:
        """api.md §2.3 ``from``: the single parseable Reply-To address, else the From address."""
        if len(self.reply_to_values) == 1:
            addrs = parse_address_list(self.reply_to_values)
            if addrs and len(addrs) == 1:
                return addrs[0]
        return self.single_from() or ""

    def thread_candidates(self) -> list[str]:
        """mail.md §6: msg-id tokens of In-Reply-To, then References last to first; ≤ 50."""
        out: list[str] = []
        for token in _MSGID_RE.findall(self.in_reply_to) + list(reversed(_MSGID_RE.findall(self.references))):
            if token not in out:
                out.append(token)
            if len(out) >= MAX_THREAD_CANDIDATES:
                break
        return out


def parse_address_list(values: Sequence[str]) -> list[str] | None:
    if not values:
        return None
    try:
        pairs = getaddresses(list(values))
    except Exception:
        return None
    addrs = [addr for _name, addr in pairs if addr and _ADDR_RE.match(addr)]
    if not addrs:
        return None
    return addrs[:MAX_LISTED_ADDRESSES]
