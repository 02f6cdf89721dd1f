"""Outbound message rules of mail.md §7.1-§7.4 and §7.6 (pure: no reactor, no I/O, no clock).

The send, reply, test and approve paths all funnel through these functions, so a request is
validated and a message is built one way only:

* :func:`normalise_recipients` and :func:`validate_content` turn request values into checked,
  normalised values or raise the spec's 400 codes (api.md §0.3) *before* anything is stored or
  held (mail.md §7.1).
* :func:`reply_plan` derives a reply's recipients, subject and threading from the stored raw
  message (api.md §5.3).
* :func:`compose_message` writes the RFC 5322 bytes of the §7.4 table by hand. The standard
  library's generator refolds headers, picks its own transfer encodings and boundaries and
  writes bare LF unless told otherwise; the DKIM signature and the stored copy need the exact
  bytes we decided on, and tests need them reproducible, so each header and part is written
  here and the result is checked by parsing it back with :mod:`email` in the tests.
* :func:`smtp_data_bytes` is the only place that prepares DATA (§7.6): CRLF-normalised once
  and dot-stuffed over the whole stream, never per chunk.

Every header-bound value is checked again at composition (control characters → 400
``invalid_header_value``), so a caller that skipped validation still cannot inject headers.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import getaddresses
from typing import Any

from e2a.api.wire import check_header_text, has_control_chars, parse_recipient
from e2a.errors import BadRequest
from e2a.ids import smtp_message_id
from e2a.mailauth.authheaders import format_rfc5322_date, split_header_section
from e2a.messageview import MessageView

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "MAX_ATTACHMENTS",
    "MAX_CONVERSATION_ID_CHARS",
    "MAX_FILENAME_CHARS",
    "MAX_RECIPIENTS",
    "MAX_SUBJECT_CHARS",
    "RECIPIENT_KINDS",
    "TEST_EMAIL_SUBJECT",
    "Attachment",
    "Content",
    "Recipients",
    "ReplyPlan",
    "compose_message",
    "normalise_recipients",
    "reply_plan",
    "reply_subject",
    "smtp_data_bytes",
    "agent_test_body",
    "validate_content",
]

MAX_RECIPIENTS = 50  # outbound.max_recipients default
MAX_SUBJECT_CHARS = 998
MAX_CONVERSATION_ID_CHARS = 256
MAX_ATTACHMENTS = 100
MAX_FILENAME_CHARS = 255
# Not in the spec: bounds the Content-Type line of an attachment part well under 998 octets.
MAX_CONTENT_TYPE_CHARS = 255
MAX_LINE_OCTETS = 998
FOLD_AT = 76  # header lines are folded to at most this many characters (< 78, RFC 5322 §2.1.1)
B64_LINE = 76
DEFAULT_CONTENT_TYPE = "application/octet-stream"
RECIPIENT_KINDS = ("send", "reply", "test")
TEST_EMAIL_SUBJECT = "Test email from e2a"
REPLY_EMPTY_SUBJECT = "Re: your message"

_CRLF = b"\r\n"
_NEWLINES_RE = re.compile(r"\r\n|\r|\n")
_NEWLINES_B_RE = re.compile(rb"\r\n|\r|\n")
# RFC 2045 token: any ASCII CHAR except SPACE, CTLs and tspecials ()<>@,;:\"/[]?=
_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_QUOTED = r'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e]|\\[\t\x20-\x7e])*"'
_CONTENT_TYPE_RE = re.compile(
    rf"^({_TOKEN})/({_TOKEN})((?:[ \t]*;[ \t]*{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|{_QUOTED}))*)$"
)
_PARAM_RE = re.compile(rf"[ \t]*;[ \t]*({_TOKEN})[ \t]*=[ \t]*({_TOKEN}|{_QUOTED})")
_STRICT_B64_RE = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
# A msg-id token we are willing to copy into In-Reply-To/References: printable ASCII, no
# whitespace, no nested angle brackets.
_MSGID_TOKEN_RE = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")
_EMPTY_GROUP_RE = re.compile(r"^[^:<>\"]*:[\s]*;?\s*$")
_BOUNDARY_HEX_RE = re.compile(r"^[0-9a-f]{32}$")
# RFC 2231 attribute-char: everything else in a filename*= value is percent-encoded.
_ATTR_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$&+-.^_`|~")


# ================================================================== recipients (mail.md §7.2)


@dataclass(frozen=True)
class Recipients:
    """Normalised recipient lists: bare lowercase addresses, deduplicated To > Cc > Bcc."""

    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]

    @property
    def envelope(self) -> tuple[str, ...]:
        """Envelope recipients (mail.md §7.2 item 6): To + Cc + Bcc."""
        return self.to + self.cc + self.bcc


def normalise_recipients(
    to: Sequence[str] | None,
    cc: Sequence[str] | None,
    bcc: Sequence[str] | None,
    sender: str,
    *,
    kind: str = "send",
    max_recipients: int = MAX_RECIPIENTS,
) -> Recipients:
    """mail.md §7.2: parse, drop blanks, lowercase, drop the sender (except ``kind="test"``),
    deduplicate (To > Cc > Bcc), then require a To/Cc recipient and cap the total.

    ``kind`` is the outbound type (``send``, ``reply`` or ``test``). The sender is removed so
    that an agent never mails itself by accident (reply-all to a thread it is on); the test
    email's only recipient is the agent, so there it stays.

    Raises:
        BadRequest: ``invalid_address`` / ``invalid_header_value`` for a bad entry,
            ``no_recipients``, ``too_many_recipients``.
        ValueError: unknown ``kind`` (a programming error, not a client one).
    """
    if kind not in RECIPIENT_KINDS:
        raise ValueError(f"unknown outbound kind {kind!r}")
    lists = []
    for field, values in (("to", to), ("cc", cc), ("bcc", bcc)):
        parsed = []
        for value in values or ():
            address = parse_recipient(value, f"{field} address")
            if address is not None:
                parsed.append(address)
        lists.append(parsed)
    own = sender.strip().lower()
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for parsed in lists:
        kept = []
        for address in parsed:
            if address in seen or (kind != "test" and address == own):
                continue
            seen.add(address)
            kept.append(address)
        out.append(tuple(kept))
    result = Recipients(*out)
    if not result.to and not result.cc:
        raise BadRequest("at least one to or cc recipient is required", code="no_recipients")
    total = len(result.envelope)
    if total > max_recipients:
        raise BadRequest(
            f"{total} recipients; at most {max_recipients} are allowed", code="too_many_recipients"
        )
    return result


# ================================================================== content (api.md §0.11, §2.2)


@dataclass(frozen=True)
class Attachment:
    """A validated attachment: ``data`` is the decoded file bytes."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Content:
    """Validated message content. ``body_html`` and ``conversation_id`` are ``""`` for none."""

    subject: str
    body_text: str
    body_html: str
    conversation_id: str
    attachments: tuple[Attachment, ...]


def _check_utf8(field: str, value: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``) that no mail can; refuse them as 400
    instead of failing with a 500 at encoding time."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{field} is not valid Unicode text", code="invalid_request_body") from None
    return value


def _text_field(field: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", code="invalid_request_body")
    return _check_utf8(field, value)


def check_conversation_id(value: str | None) -> str:
    """api.md §0.11 ``conversation_id``: header-bound, trimmed, then 1-256 printable ASCII;
    empty means none (``""``)."""
    text = _text_field("conversation_id", value)
    check_header_text("conversation_id", text)
    text = text.strip(" \t")
    if not text:
        return ""
    if len(text) > MAX_CONVERSATION_ID_CHARS or not all(0x20 <= ord(c) <= 0x7E for c in text):
        raise BadRequest(
            f"conversation_id must be 1-{MAX_CONVERSATION_ID_CHARS} printable ASCII characters",
            code="invalid_field",
        )
    return text


def check_subject(value: str | None) -> str:
    """api.md §0.11 ``subject``: header-bound text, trimmed, at most 998 characters."""
    text = _text_field("subject", value)
    check_header_text("subject", text)
    text = text.strip(" \t")
    if len(text) > MAX_SUBJECT_CHARS:
        raise BadRequest(f"subject must be at most {MAX_SUBJECT_CHARS} characters", code="invalid_field")
    return text


def check_content_type(value: str | None) -> str:
    """api.md §2.2 ``content_type`` → normalised ``type/subtype[; attr=value]…``.

    Empty → ``application/octet-stream``. Type and subtype are lowercased; parameters are kept
    as given, joined by ``"; "``. ``multipart/*`` is refused: an attachment part is base64 and a
    multipart type on it would make readers look for boundaries inside the file.

    Raises:
        BadRequest: ``invalid_header_value`` (control characters), ``invalid_attachment``.
    """
    text = _text_field("attachment content_type", value)
    check_header_text("attachment content_type", text)
    text = text.strip(" \t")
    if not text:
        return DEFAULT_CONTENT_TYPE
    m = _CONTENT_TYPE_RE.fullmatch(text) if len(text) <= MAX_CONTENT_TYPE_CHARS else None
    if m is None:
        raise BadRequest(f"attachment content_type {text!r} is not type/subtype[; param=value]",
                         code="invalid_attachment")
    major, minor = m.group(1).lower(), m.group(2).lower()
    if major == "multipart":
        raise BadRequest("attachment content_type may not be multipart/*", code="invalid_attachment")
    params = "".join(f"; {name}={val}" for name, val in _PARAM_RE.findall(m.group(3)))
    return f"{major}/{minor}{params}"


def check_filename(value: str | None) -> str:
    """api.md §2.2 ``filename``: 1-255 characters of header-bound text (kept as given)."""
    text = _text_field("attachment filename", value)
    check_header_text("attachment filename", text)
    if not 1 <= len(text) <= MAX_FILENAME_CHARS:
        raise BadRequest(f"attachment filename must be 1-{MAX_FILENAME_CHARS} characters",
                         code="invalid_attachment")
    return text


def decode_attachment_data(value: str | None) -> bytes:
    """api.md §2.2 ``data``: standard base64 with padding, no whitespace, must decode."""
    if value is None:
        raise BadRequest("attachment data is required", code="invalid_attachment")
    if not isinstance(value, str):
        raise BadRequest("attachment data must be a string", code="invalid_request_body")
    if not _STRICT_B64_RE.fullmatch(value):
        raise BadRequest("attachment data is not standard base64 with padding", code="invalid_attachment")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("attachment data is not valid base64", code="invalid_attachment") from None


def check_attachment(item: Any) -> Attachment:
    """One Attachment object of api.md §2.2 (a JSON object) → :class:`Attachment`."""
    if not isinstance(item, Mapping):
        raise BadRequest("each attachment must be an object", code="invalid_request_body")
    filename = check_filename(item.get("filename"))
    content_type = check_content_type(item.get("content_type"))
    data = decode_attachment_data(item.get("data"))
    return Attachment(filename, content_type, data)


def validate_content(
    subject: str | None,
    body_text: str | None,
    body_html: str | None = None,
    conversation_id: str | None = None,
    attachments: Sequence[Any] | None = None,
) -> Content:
    """mail.md §7.1 content rules → normalised :class:`Content`.

    Presence of ``subject``/``body`` (400 ``missing_field``) is the route's check, because a
    reply has no subject in its request; here an empty subject is simply empty.

    Raises:
        BadRequest: ``invalid_header_value``, ``invalid_field`` (subject length,
            conversation_id syntax, more than 100 attachments), ``invalid_attachment``,
            ``invalid_request_body`` (wrong JSON type, lone surrogates).
    """
    subj = check_subject(subject)
    text = _text_field("body", body_text)
    html = _text_field("html_body", body_html)
    conv = check_conversation_id(conversation_id)
    items = attachments or ()
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise BadRequest("attachments must be a list", code="invalid_request_body")
    if len(items) > MAX_ATTACHMENTS:
        raise BadRequest(f"at most {MAX_ATTACHMENTS} attachments are allowed", code="invalid_field")
    return Content(subj, text, html, conv, tuple(check_attachment(item) for item in items))


# ================================================================== replies (api.md §5.3)


@dataclass(frozen=True)
class ReplyPlan:
    """What a reply is built from, before mail.md §7.2 normalisation of the lists."""

    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    subject: str
    in_reply_to: str  # "" when the original had no usable Message-ID
    references: str  # space-separated msg-id tokens, "" for none
    conversation_id: str | None  # request value, else the original's (validate_content checks it)


def reply_subject(original_subject: str) -> str:
    """api.md §5.3: empty → ``Re: your message``; no second ``Re: `` when the subject already
    starts with ``re:`` + space (any case). The stored subject came from someone else's mail,
    so controls are blanked and the result capped at 998 characters rather than refused."""
    subject = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", " ", original_subject or "").strip(" \t")
    if not subject:
        return REPLY_EMPTY_SUBJECT
    if subject[:4].lower() != "re: ":
        subject = "Re: " + subject
    return subject[:MAX_SUBJECT_CHARS].rstrip(" \t")


def _usable(address: str) -> str | None:
    """The address in wire form when parse_recipient accepts it, else None."""
    try:
        return parse_recipient(address)
    except BadRequest:
        return None


def _addresses(values: Sequence[str]) -> list[str] | None:
    """Addresses of header values; None when a non-empty value yields nothing usable."""
    out: list[str] = []
    for value in values:
        if not value.strip() or _EMPTY_GROUP_RE.fullmatch(value.strip()):
            continue  # empty field or "undisclosed-recipients:;"
        try:
            pairs = getaddresses([value])
        except Exception:
            return None
        found = [addr for _name, addr in pairs if addr]
        if not found:
            return None
        for addr in found:
            usable = _usable(addr)
            if usable is None:
                return None
            out.append(usable)
    return out


def _msgid_tokens(value: str) -> list[str]:
    return _MSGID_TOKEN_RE.findall(value)


def reply_plan(
    original_raw: bytes | None,
    original_subject: str,
    original_display_from: str,
    original_conversation_id: str,
    agent_address: str,
    reply_all: bool = False,
    extra_cc: Sequence[str] | None = None,
    bcc: Sequence[str] | None = None,
    conversation_id: str | None = None,
) -> ReplyPlan:
    """api.md §5.3 reply construction from the stored raw message.

    To: the Reply-To addresses, else the From addresses, of ``original_raw``; when none is
    usable, the stored display sender. With ``reply_all`` the original To + Cc go to Cc before
    the request's ``cc``. The agent's own address is left in: :func:`normalise_recipients`
    (kind ``reply``) removes it from every list. ``conversation_id=None`` (absent in the
    request) takes the original's.

    Raises:
        BadRequest: ``reply_all_unavailable`` when ``reply_all`` and the original's header
            section is missing or its To/Cc cannot be parsed.
    """
    del agent_address  # removal happens in normalise_recipients; kept for the call shape
    view: MessageView | None = None
    if original_raw:
        fields, _offset = split_header_section(original_raw)
        if fields:
            view = MessageView.from_fields(fields)

    to: list[str] = []
    if view is not None:
        for values in (view.reply_to_values, view.from_values):
            found = _addresses(values) if values else None
            if found:
                to = found
                break
    if not to and original_display_from.strip():
        to = [original_display_from.strip()]

    cc: list[str] = []
    if reply_all:
        if view is None:
            raise BadRequest("the original message's headers are not available", code="reply_all_unavailable")
        for values in (view.to_values, view.cc_values):
            found = _addresses(values)
            if found is None:
                raise BadRequest("the original message's To/Cc cannot be parsed", code="reply_all_unavailable")
            cc.extend(found)
    cc.extend(extra_cc or ())

    in_reply_to = ""
    references: list[str] = []
    if view is not None:
        mid = _msgid_tokens(view.message_id)
        in_reply_to = mid[0] if mid else ""
        references = _msgid_tokens(view.references)
        if in_reply_to:
            references.append(in_reply_to)

    return ReplyPlan(
        to=tuple(to),
        cc=tuple(cc),
        bcc=tuple(bcc or ()),
        subject=reply_subject(original_subject),
        in_reply_to=in_reply_to,
        references=" ".join(references),
        conversation_id=original_conversation_id if conversation_id is None else conversation_id,
    )


# ================================================================== header writing


def _fold_pieces(name: str, pieces: Sequence[str], sep: str) -> str:
    """``Name: p1<sep>p2…`` folded before a piece when the line would pass FOLD_AT.

    ``sep`` is what joins pieces on one line (``", "`` or ``" "``); at a fold its trailing
    space is replaced by CRLF + one space, so unfolding gives back exactly the joined value.
    """
    line = f"{name}: "
    lines: list[str] = []
    for i, piece in enumerate(pieces):
        if i == 0:
            line += piece
            continue
        if len(line) + len(sep) + len(piece) > FOLD_AT:
            lines.append(line + sep.rstrip(" "))
            line = " " + piece
        else:
            line += sep + piece
    lines.append(line)
    return "\r\n".join(lines)


def _fold_unstructured(name: str, text: str) -> str | None:
    """``Name: text`` folded before whitespace so no line exceeds FOLD_AT; None when some word
    is too long to fit (the caller then uses encoded-words). Folding only inserts CRLF before
    an existing SP/TAB, so unfolding restores the text byte for byte; no line is whitespace
    only."""
    if not text:
        return f"{name}:"
    pieces = re.findall(r"[ \t]*[^ \t]+", text)
    line = f"{name}: " + pieces[0]
    lines: list[str] = []
    for piece in pieces[1:]:
        if len(line) + len(piece) > FOLD_AT:
            lines.append(line)
            line = piece
        else:
            line += piece
    lines.append(line)
    if any(len(x) > FOLD_AT for x in lines):
        return None
    return "\r\n".join(lines)


def _encoded_words(text: str, first_room: int, room: int = FOLD_AT - 1) -> list[str]:
    """RFC 2047 ``=?utf-8?b?…?=`` words for ``text``. The first word fits in ``first_room``
    characters, the others in ``room``; a character's UTF-8 bytes never straddle two words."""
    words: list[str] = []
    chunk = b""
    limit = max(1, (first_room - 12) // 4) * 3
    for ch in text:
        enc = ch.encode("utf-8")
        if chunk and len(chunk) + len(enc) > limit:
            words.append("=?utf-8?b?" + base64.b64encode(chunk).decode("ascii") + "?=")
            chunk = b""
            limit = max(1, (room - 12) // 4) * 3
        chunk += enc
    if chunk:
        words.append("=?utf-8?b?" + base64.b64encode(chunk).decode("ascii") + "?=")
    return words


def _subject_field(subject: str) -> str:
    """§7.4 Subject: plain and folded when ASCII; encoded-words when non-ASCII, when a word is
    too long to fold, or when the text contains ``=?`` (readers would decode it)."""
    if subject.isascii() and "=?" not in subject:
        folded = _fold_unstructured("Subject", subject)
        if folded is not None:
            return folded
    words = _encoded_words(subject, FOLD_AT - len("Subject: "))
    return "Subject: " + "\r\n ".join(words)


def _quote_display(name: str) -> str:
    """RFC 5322 quoted-string: backslash and double quote escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mailbox_field(name: str, display: str, address: str) -> str:
    """``Name: "display" <address>`` or, when non-ASCII, encoded-words then the address."""
    if display.isascii():
        return f"{name}: {_quote_display(display)} <{address}>"
    words = _encoded_words(display, FOLD_AT - len(name) - 2)
    lines = [f"{name}: " + words[0]] + [" " + w for w in words[1:]]
    if len(lines[-1]) + len(address) + 3 <= FOLD_AT:
        lines[-1] += f" <{address}>"
    else:
        lines.append(f" <{address}>")
    return "\r\n".join(lines)


def _checked(field: str, value: str) -> str:
    check_header_text(field, value)
    _check_utf8(field, value)
    return value


def _checked_msgids(field: str, value: str) -> list[str]:
    tokens = value.split()
    if has_control_chars(value) or not all(_MSGID_TOKEN_RE.fullmatch(t) for t in tokens):
        raise BadRequest(f"{field} must be <msg-id> tokens", code="invalid_header_value")
    return tokens


# ================================================================== body parts


def _crlf_text(text: str) -> bytes:
    """UTF-8 of ``text`` with LF, CR and CRLF made CRLF, ending in CRLF when not empty."""
    data = _NEWLINES_RE.sub("\r\n", text).encode("utf-8")
    if data and not data.endswith(_CRLF):
        data += _CRLF
    return data


def _is_7bit(data: bytes) -> bool:
    """Pure ASCII, no NUL, every line ≤ 998 octets (RFC 5322 §2.1.1, RFC 2045 §2.7)."""
    if not data.isascii() or b"\x00" in data:
        return False
    return all(len(line) <= MAX_LINE_OCTETS for line in data.split(_CRLF))


def _qp_encode(data: bytes) -> bytes:
    """RFC 2045 §6.7 quoted-printable of CRLF-lined data: CRLF kept as hard breaks, encoded
    lines ≤ 76 characters with ``=`` soft breaks, trailing SP/TAB encoded."""
    out: list[str] = []
    for line in data.split(_CRLF):
        tokens = []
        last = len(line) - 1
        for i, b in enumerate(line):
            if (33 <= b <= 126 and b != 61) or (b in (9, 32) and i != last):
                tokens.append(chr(b))
            else:
                tokens.append(f"={b:02X}")
        current = ""
        for tok in tokens:
            if len(current) + len(tok) > 75:
                out.append(current + "=")
                current = ""
            current += tok
        out.append(current)
    return "\r\n".join(out).encode("ascii")


def _text_part(subtype: str, text: str) -> tuple[list[str], bytes]:
    data = _crlf_text(text)
    if _is_7bit(data):
        return [f"Content-Type: text/{subtype}; charset=utf-8", "Content-Transfer-Encoding: 7bit"], data
    return (
        [f"Content-Type: text/{subtype}; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"],
        _qp_encode(data),
    )


def _disposition_field(filename: str) -> str:
    """``Content-Disposition: attachment; filename="…"``; RFC 2231 ``filename*=`` (with
    ``*0*``, ``*1*``… continuations when long) for non-ASCII names."""
    if filename.isascii():
        one = f"Content-Disposition: attachment; filename={_quote_display(filename)}"
        if len(one) <= FOLD_AT:
            return one
        return f"Content-Disposition: attachment;\r\n filename={_quote_display(filename)}"
    encoded = "".join(chr(b) if b in _ATTR_CHARS else f"%{b:02X}" for b in filename.encode("utf-8"))
    value = "utf-8''" + encoded
    single = f" filename*={value}"
    if len("Content-Disposition: attachment;") + len(single) <= FOLD_AT:
        return "Content-Disposition: attachment;" + single
    # Continuations: cut between percent-escapes, each segment on its own line.
    segments: list[str] = []
    current = ""
    room = FOLD_AT - len(" filename*99*=;")
    i = 0
    while i < len(value):
        tok = value[i : i + 3] if value[i] == "%" else value[i]
        if current and len(current) + len(tok) > room:
            segments.append(current)
            current = ""
        current += tok
        i += len(tok)
    segments.append(current)
    lines = ["Content-Disposition: attachment;"]
    for n, seg in enumerate(segments):
        lines.append(f" filename*{n}*={seg}" + (";" if n < len(segments) - 1 else ""))
    return "\r\n".join(lines)


def _attachment_part(att: Attachment) -> tuple[list[str], bytes]:
    _checked("attachment content_type", att.content_type)
    _checked("attachment filename", att.filename)
    b64 = base64.b64encode(att.data)
    lines = [b64[i : i + B64_LINE] for i in range(0, len(b64), B64_LINE)]
    body = b"".join(line + _CRLF for line in lines)
    return (
        [f"Content-Type: {att.content_type}", _disposition_field(att.filename),
         "Content-Transfer-Encoding: base64"],
        body,
    )


def _entity(headers: list[str], body: bytes) -> bytes:
    return "".join(h + "\r\n" for h in headers).encode("utf-8") + _CRLF + body


def _multipart(boundary: str, parts: list[bytes]) -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\n".encode("ascii") + part + _CRLF
    return out + f"--{boundary}--\r\n".encode("ascii")


# ================================================================== composition (mail.md §7.4)


def agent_test_body(agent_address: str, agent_name: str = "") -> str:
    """The short plain-text body of the test email (mail.md §7.4), naming the agent."""
    who = f"{agent_name} <{agent_address}>" if agent_name else agent_address
    return (
        f"This is a test email from e2a to the agent {who}.\n"
        "\n"
        "If your agent received it, inbound delivery works.\n"
    )


def compose_message(
    *,
    message_id: str,
    mail_domain: str,
    agent_address: str,
    agent_name: str = "",
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    subject: str = "",
    body_text: str = "",
    body_html: str = "",
    attachments: Sequence[Attachment] = (),
    conversation_id: str = "",
    in_reply_to: str = "",
    references: str = "",
    date: datetime,
    test_email: bool = False,
    random_hex: Callable[[], str] = lambda: secrets.token_hex(16),
) -> bytes:
    """The RFC 5322 message of mail.md §7.4 as CRLF bytes (no bare CR or LF anywhere).

    ``to``/``cc`` are normalised addresses (:func:`normalise_recipients`); Bcc is never
    written. ``random_hex`` supplies the 32 hex digits of each multipart boundary (injected so
    tests get fixed bytes); a boundary that occurs in a part's content is drawn again.
    With ``test_email`` the test message is built instead: ``From: "e2a" <noreply@M>``, To the
    agent, fixed subject, :func:`agent_test_body`, no Reply-To; the content arguments are
    ignored.

    Raises:
        BadRequest: ``invalid_header_value`` for a control character (or a malformed msg-id)
            in any header-bound value.
        ValueError: ``date`` is naive.
    """
    if date.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    _checked("from", agent_address)
    _checked("name", agent_name)
    _checked("mail domain", mail_domain)
    if test_email:
        display, from_address, reply_to = "e2a", f"noreply@{mail_domain}", ""
        to, cc = (agent_address,), ()
        subject = TEST_EMAIL_SUBJECT
        body_text, body_html, attachments = agent_test_body(agent_address, agent_name), "", ()
        conversation_id = in_reply_to = references = ""
    else:
        display, from_address, reply_to = f"{agent_name or agent_address} via e2a", agent_address, agent_address

    headers = [_mailbox_field("From", display, from_address)]
    for field, addresses in (("To", to), ("Cc", cc)):
        if addresses:
            headers.append(_fold_pieces(field, [_checked(field, a) for a in addresses], ", "))
    if reply_to:
        headers.append(f"Reply-To: {reply_to}")
    headers.append(_subject_field(_checked("subject", subject.strip(" \t"))))
    headers.append(f"Date: {format_rfc5322_date(date)}")
    headers.append(f"Message-ID: {_checked('message id', smtp_message_id(message_id, mail_domain))}")
    if in_reply_to.strip():
        headers.append(_fold_pieces("In-Reply-To", _checked_msgids("in_reply_to", in_reply_to), " "))
    if references.strip():
        headers.append(_fold_pieces("References", _checked_msgids("references", references), " "))
    conv = _checked("conversation_id", conversation_id).strip(" \t")
    if conv:
        folded = _fold_unstructured("X-E2A-Conversation-Id", conv)
        headers.append(folded if folded is not None else f"X-E2A-Conversation-Id: {conv}")
    headers.append("MIME-Version: 1.0")

    text_headers, text_body = _text_part("plain", _check_utf8("body", body_text))
    parts_content = [text_body]
    html = None
    if body_html:
        html = _text_part("html", _check_utf8("html_body", body_html))
        parts_content.append(html[1])
    att_parts = [_attachment_part(a) for a in attachments]
    parts_content.extend(body for _h, body in att_parts)

    def boundary() -> str:
        for _ in range(100):
            hex32 = random_hex()
            if not _BOUNDARY_HEX_RE.fullmatch(hex32):
                raise ValueError("random_hex must return 32 lowercase hex digits")
            candidate = f"e2a_{hex32}"
            if not any(candidate.encode("ascii") in content for content in parts_content):
                return candidate
        raise RuntimeError("could not draw a boundary absent from the content")

    if html is None:
        first_headers, first_body = text_headers, text_body
    else:
        alt = boundary()
        first_headers = [f'Content-Type: multipart/alternative; boundary="{alt}"']
        first_body = _multipart(alt, [_entity(text_headers, text_body), _entity(*html)])
    if att_parts:
        mixed = boundary()
        top_headers = [f'Content-Type: multipart/mixed; boundary="{mixed}"']
        body = _multipart(mixed, [_entity(first_headers, first_body)] + [_entity(h, b) for h, b in att_parts])
    else:
        top_headers, body = first_headers, first_body
    return _entity(headers + top_headers, body)


# ================================================================== transmission (mail.md §7.6)


def smtp_data_bytes(message: bytes) -> bytes:
    """The DATA payload for ``message``: CRLF-normalised once, dot-stuffed over the whole
    stream, terminated by ``<CRLF>.<CRLF>``. Working on the whole byte string (never per
    chunk) is what guarantees that a line starting with ``.`` is stuffed wherever it falls
    and that no bare CR or LF is sent."""
    data = _NEWLINES_B_RE.sub(b"\r\n", message)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(_CRLF):
        data += _CRLF
    return data + b".\r\n"
