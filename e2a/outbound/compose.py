"""Outbound message rules of mail.md §7.1-§7.4 and §7.6 (pure: no reactor, no I/O, no clock).

The send, reply, test and approve paths all funnel through these functions, so a request is
validated and a message is built one way only:

* :func:`normalise_recipients` and :func:`validate_content` turn request values into checked,
  normalised values or raise the spec's 400 codes (api.md §0.3) *before* anything is stored or
  held (mail.md §7.1).
* :func:`reply_plan` derives a reply's recipients, subject and threading from the stored raw
  message (api.md §5.3).
* :func:`compose_message` builds the §7.4 message with :class:`email.message.EmailMessage`
  and serialises it with ``email.policy.SMTP`` (CRLF, 76-character lines): headerregistry and
  :mod:`email.header` do RFC 2047, ``set_content``/``add_alternative``/``add_attachment`` the
  MIME tree, transfer encodings (chosen explicitly, §7.4) and RFC 2231 filenames. Boundaries
  come from an injected source, so the bytes are reproducible for DKIM, the stored copy and
  tests. Where the stdlib cannot meet §7.4 (quoted From names, literal ``=?`` text, ASCII
  filenames, msg-id headers, CPython 3.11 folding bugs) the helper concerned says why and
  corrects that one field.
* :func:`smtp_data_bytes` is the only place that prepares DATA (§7.6): CRLF-normalised once
  and dot-stuffed over the whole stream, never per chunk.

Every header-bound value is checked again at composition (control characters → 400
``invalid_header_value``), so a caller that skipped validation still cannot inject headers.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import itertools
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.charset import Charset
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import encode_rfc2231, getaddresses, unquote
from typing import Any

from e2a.errors import BadRequest
from e2a.ids import smtp_message_id
from e2a.mailsyntax.addresses import parse_recipient
from e2a.mailsyntax.headers import split_header_section
from e2a.mailsyntax.text import check_header_text, has_control_chars
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
    dropped_own = False
    for parsed in lists:
        kept = []
        for address in parsed:
            if kind != "test" and address == own:
                dropped_own = True
                continue
            if address in seen:
                continue
            seen.add(address)
            kept.append(address)
        out.append(tuple(kept))
    result = Recipients(*out)
    if not result.to and not result.cc:
        if dropped_own:
            # Say what is wrong: the caller did name a recipient, only it was the sender.
            raise BadRequest(
                f"{own} is the sending agent's own address, and an agent does not mail itself; "
                "name another to or cc recipient",
                code="no_recipients",
            )
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


# ================================================================== header values


# Serialisation policy. max_line_length=76: header lines stay under the 78 octets of §7.4 and
# quoted-printable lines within the 76 characters of RFC 2045 §6.7 (the stdlib uses the one
# limit for both; base64 lines are 76 characters either way). refold_source="none": the few
# values stored with ``set_raw`` (the verbatim ones below) are written exactly as given, while
# header objects (``msg[name] = value``) are still folded by the stdlib.
_POLICY = email.policy.SMTP.clone(max_line_length=FOLD_AT, refold_source="none")
_UTF8 = Charset("utf-8")


def _quote_display(name: str) -> str:
    """RFC 5322 quoted-string: backslash and double quote escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _checked(field: str, value: str) -> str:
    check_header_text(field, value)
    _check_utf8(field, value)
    return value


def _checked_msgids(field: str, value: str) -> list[str]:
    tokens = value.split()
    if has_control_chars(value) or not all(_MSGID_TOKEN_RE.fullmatch(t) for t in tokens):
        raise BadRequest(f"{field} must be <msg-id> tokens", code="invalid_header_value")
    return tokens


def _verbatim(name: str, value: str) -> str:
    """``value`` folded before existing SP/TAB so lines stay within FOLD_AT where a word allows;
    unfolding gives back ``value`` byte for byte (a word longer than a line stays whole).

    For values that must reach the reader unchanged (msg-ids, the conversation id, address
    lists the stdlib would alter): the
    stdlib's unstructured header would decode ``=?…?=`` found in them and turn an over-long
    word into encoded-words, and 3.11 has no msg-id list header for In-Reply-To/References.
    """
    pieces = re.findall(r"[ \t]*[^ \t]+", value)
    lines = [pieces[0]] if pieces else [""]
    room = FOLD_AT - len(name) - 2
    for piece in pieces[1:]:
        if len(lines[-1]) + len(piece) > room:
            lines.append(piece)
            room = FOLD_AT
        else:
            lines[-1] += piece
    return "\r\n".join(lines)


def _encoded_words(name: str, text: str, suffix: str = "") -> str:
    """``text`` entirely as RFC 2047 UTF-8 encoded-words, folded within FOLD_AT, then
    ``suffix`` (`` <address>`` for From) on the last line or the next one.

    :meth:`email.charset.Charset.header_encode_lines` does the encoding (never splitting a
    character); :class:`email.header.Header` is not used because it drops U+0085, U+2028
    and U+2029 (it splits its input with ``str.splitlines``).
    """
    first = FOLD_AT - len(name) - 2
    words = _UTF8.header_encode_lines(text, itertools.chain([first], itertools.repeat(FOLD_AT - 1)))
    value = "\r\n ".join(w for w in words if w is not None)
    if suffix:
        used = len(value) - value.rfind("\n") - 1 + (len(name) + 2 if "\n" not in value else 0)
        value += suffix if used + len(suffix) <= FOLD_AT else "\r\n" + suffix
    return value


def _folded(name: str, msg: EmailMessage) -> list[str]:
    """The lines the policy will write for header ``name`` of ``msg`` (no line ends)."""
    return _POLICY.fold(name, msg[name]).split("\r\n")[:-1]


def _fits(lines: Sequence[str]) -> bool:
    return all(len(line) <= FOLD_AT for line in lines)


def _set_subject(msg: EmailMessage, subject: str) -> None:
    """§7.4 Subject through headerregistry, read back before it is kept.

    Post-processing: the stdlib's unstructured header decodes ``=?…?=`` that is literally in
    the text (the subject would change), and CPython 3.11's folder mangles some long words
    (``"a"*70 + " " + "b"*80`` reads back with an extra leading and inner space). When the
    folded field does not parse back to the subject, or a line is too long, the subject is
    written instead entirely as encoded-words (:func:`_encoded_words`), which always read back.
    """
    # A header object, not a str: the policy refuses str values that str.splitlines() breaks
    # (U+0085, U+2028, U+2029 are header-safe text here), but encodes them fine.
    msg["Subject"] = _POLICY.header_factory("Subject", subject)
    lines = _folded("Subject", msg)
    back = email.message_from_bytes("\r\n".join(lines).encode("ascii") + b"\r\n\r\n", policy=email.policy.default)
    if _fits(lines) and str(back["Subject"]) == subject:
        return
    del msg["Subject"]
    msg.set_raw("Subject", _encoded_words("Subject", subject))


def _set_addresses(msg: EmailMessage, field: str, addresses: Sequence[str]) -> None:
    """§7.4 To/Cc: the addresses joined by ``", "``, folded between addresses by
    headerregistry.

    Post-processing: the stdlib's address parser decodes ``=?…?=`` in a local part
    (``=?utf-8?q?x?=@x.example`` would be written as ``x@x.example``, not the envelope
    recipient); when the folded field does not unfold to the joined list it is written
    verbatim instead.
    """
    joined = ", ".join(_checked(field, a) for a in addresses)
    msg[field] = joined
    if "".join(_folded(field, msg)) == f"{field}: {joined}":
        return
    del msg[field]
    msg.set_raw(field, _verbatim(field, joined))


def _phrase(value: str) -> tuple[str, str]:
    """(decoded display name, angle-addr) of an unfolded ``phrase <addr>`` value, decoding
    RFC 2047 with :mod:`email.header` (headerregistry keeps folding space between adjacent
    encoded-words of a phrase, so it cannot be the judge)."""
    phrase, _, addr = value.rpartition(" <")
    return str(make_header(decode_header(phrase))), "<" + addr


def _set_from(msg: EmailMessage, display: str, address: str) -> None:
    """§7.4 From: ``"display" <address>``, or RFC 2047 when the name is not ASCII.

    Post-processing: :class:`email.headerregistry.Address` quotes a display name only when it
    holds specials (``Bot via e2a <a@b>``), and CPython 3.11 drops the quotes of a
    quoted-string that does not fit on one line, so an ASCII name is written here as the
    quoted-string §7.4 asks for, on one line (≤ 998 octets: names are at most 200
    characters). Non-ASCII names are encoded by headerregistry; when its fold does not decode
    back to the name (or a line is too long) the name is written entirely as encoded-words.
    A name containing ``=?`` takes that path too, since a reader would decode it.
    """
    if display.isascii() and "=?" not in display:
        msg.set_raw("From", f"{_quote_display(display)} <{address}>")
        return
    msg["From"] = _POLICY.header_factory("From", Address(display_name=display, addr_spec=address))
    lines = _folded("From", msg)
    unfolded = "".join(lines)[len("From: "):]
    if _fits(lines) and _phrase(unfolded) == (display, f"<{address}>"):
        return
    del msg["From"]
    msg.set_raw("From", _encoded_words("From", display, f" <{address}>"))


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


def _text_cte(text: str) -> str:
    """§7.4 text/HTML transfer encoding. ``set_content`` splits lines at LF, CR and CRLF
    exactly as :func:`_crlf_text` does, so the judgement is made on the bytes it will write."""
    return "7bit" if _is_7bit(_crlf_text(text)) else "quoted-printable"


def _attachment_params(content_type: str) -> tuple[str, str, dict[str, str]]:
    """(maintype, subtype, parameters) of a :func:`check_content_type` value, parameter
    values unquoted (``set_param`` quotes them again)."""
    m = _CONTENT_TYPE_RE.fullmatch(content_type)
    if m is None:
        raise BadRequest(f"attachment content_type {content_type!r} is not type/subtype[; param=value]",
                         code="invalid_attachment")
    params = {name: unquote(val) if val.startswith('"') else val for name, val in _PARAM_RE.findall(m.group(3))}
    return m.group(1).lower(), m.group(2).lower(), params


def _add_attachment(msg: EmailMessage, att: Attachment) -> None:
    """An attachment part: given type, ``attachment`` disposition with the filename (RFC 2231
    ``filename*=`` when non-ASCII, by the stdlib), base64 in 76-character lines.

    Post-processing, ASCII names only: the stdlib writes every MIME parameter that does not
    fit on a line as RFC 2231 continuations (``filename*0*=us-ascii''…``), where §7.4 wants
    ``filename="<name>"``, so such a name gets that field verbatim on its own line. A name
    holding ``=?`` is written as RFC 2231 ``filename*=`` instead: in a quoted-string readers
    (the stdlib's parser among them) decode it as an encoded-word.
    """
    _checked("attachment content_type", att.content_type)
    filename = _checked("attachment filename", att.filename)
    maintype, subtype, params = _attachment_params(att.content_type)
    msg.add_attachment(att.data, maintype, subtype, cte="base64", filename=filename, params=params)
    part = msg.get_payload()[-1]
    if not filename.isascii():
        return
    if "=?" in filename:
        value = "attachment;\r\n filename*=" + encode_rfc2231(filename, "utf-8")
    elif "filename*" in _POLICY.fold("Content-Disposition", part["Content-Disposition"]):
        value = f"attachment;\r\n filename={_quote_display(filename)}"
    else:
        return
    del part["Content-Disposition"]
    part.set_raw("Content-Disposition", value)


def _set_boundaries(msg: EmailMessage, random_hex: Callable[[], str]) -> None:
    """``e2a_<32 hex>`` on each multipart, innermost first (the generator checks only the
    boundaries it invents itself, so the checks are ours).

    A boundary is drawn again while it occurs in an encoded leaf payload. Nested multiparts
    must not share a boundary (RFC 2046 §5.1.2): a draw that repeats an earlier one (a source
    that repeats itself, as tests pass a constant) is replaced by a value derived from it, so
    the result stays deterministic and valid.
    """
    payloads = [p.get_payload() for p in msg.walk() if not p.is_multipart()]
    drawn: set[str] = set()
    for part in reversed([p for p in msg.walk() if p.is_multipart()]):
        for _ in range(100):
            hex32 = random_hex()
            if not _BOUNDARY_HEX_RE.fullmatch(hex32):
                raise ValueError("random_hex must return 32 lowercase hex digits")
            while hex32 in drawn:
                hex32 = hashlib.sha256(hex32.encode("ascii")).hexdigest()[:32]
            drawn.add(hex32)
            boundary = f"e2a_{hex32}"
            if not any(boundary in payload for payload in payloads):
                break
        else:
            raise RuntimeError("could not draw a boundary absent from the content")
        part.set_boundary(boundary)


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

    Built as an :class:`email.message.EmailMessage` and serialised with ``policy.SMTP``
    (76-character lines), so MIME structure, transfer encodings and RFC 2047/2231 come from
    the stdlib; the few places where it cannot meet §7.4 are corrected in the helpers above,
    each saying why. ``to``/``cc`` are normalised addresses (:func:`normalise_recipients`);
    Bcc is never written. ``random_hex`` supplies the 32 hex digits of each multipart
    boundary (injected so tests get fixed bytes); a boundary that occurs in a part's content
    is drawn again. With ``test_email`` the test message is built instead:
    ``From: "e2a" <noreply@M>``, To the agent, fixed subject, :func:`agent_test_body`, no
    Reply-To; the content arguments are ignored.

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

    msg = EmailMessage(policy=_POLICY)
    _set_from(msg, display, from_address)
    for field, addresses in (("To", to), ("Cc", cc)):
        if addresses:
            _set_addresses(msg, field, addresses)
    if reply_to:
        msg["Reply-To"] = reply_to
    _set_subject(msg, _checked("subject", subject.strip(" \t")))
    msg["Date"] = date.astimezone(UTC)
    msg.set_raw("Message-ID", _checked("message id", smtp_message_id(message_id, mail_domain)))
    if in_reply_to.strip():
        msg.set_raw("In-Reply-To", _verbatim("In-Reply-To", " ".join(_checked_msgids("in_reply_to", in_reply_to))))
    if references.strip():
        msg.set_raw("References", _verbatim("References", " ".join(_checked_msgids("references", references))))
    conv = _checked("conversation_id", conversation_id).strip(" \t")
    if conv:
        msg.set_raw("X-E2A-Conversation-Id", _verbatim("X-E2A-Conversation-Id", conv))
    msg["MIME-Version"] = "1.0"

    text = _check_utf8("body", body_text)
    msg.set_content(text, subtype="plain", charset="utf-8", cte=_text_cte(text))
    if body_html:
        html = _check_utf8("html_body", body_html)
        msg.add_alternative(html, subtype="html", charset="utf-8", cte=_text_cte(html))
    for att in attachments:
        _add_attachment(msg, att)
    # Post-processing: EmailMessage.set_content adds MIME-Version to every part it creates;
    # RFC 2045 §4 needs it at the top level only and §7.4 lists no such part header.
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    _set_boundaries(msg, random_hex)
    return msg.as_bytes()


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
