"""What every console page shares: constants, the request context, redirects and downloads,
form helpers, message rendering helpers and the HTML error pages."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from twisted.logger import Logger
from twisted.web.server import Request

from e2a.api import wire
from e2a.api.magiclink_pages import parse_pairs
from e2a.console import render
from e2a.console.render import Page, tags
from e2a.errors import BadRequest
from e2a.store import sessions

log = Logger()

COOKIE = b"e2a_console"
PRE_COOKIE = b"e2a_console_pre"  # double-submit token of the sign-in forms
SIGNIN_WINDOW_SECONDS = 3600
STATIC = {
    "console.css": b"text/css; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", render.CSP.encode()),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Robots-Tag", b"noindex, nofollow"),
)


@dataclass
class Redirect:
    location: str


@dataclass
class Download:
    body: bytes
    content_type: bytes
    filename: str


@dataclass
class Ctx:
    """What a handler gets: the session (None on public pages) and the POSTed form."""

    session: sessions.ConsoleSession | None
    form: dict[str, str] = field(default_factory=dict)
    token: str = ""

    @property
    def user_id(self) -> str:
        assert self.session is not None
        return self.session.user_id


def _first_form(raw: bytes) -> dict[str, str]:
    """Form pairs, first wins (api.md §0.6), as text (bytes that are not UTF-8 → U+FFFD).

    A NUL anywhere refuses the form (400): no console field can hold one, and PostgreSQL
    refuses it in text, which would be a 500 (as the API's JSON bodies, api.md §0.11)."""
    out: dict[str, str] = {}
    for name, value in parse_pairs(raw):
        if b"\x00" in name or b"\x00" in value:
            raise BadRequest("the form contains a U+0000 character", code="invalid_request_body")
        key = name.decode("utf-8", "replace")
        if key not in out:
            out[key] = value.decode("utf-8", "replace").replace("\r\n", "\n")
    return out


def _split_addresses(text: str) -> list[str]:
    """Entries of a typed recipient list (``"Doe, Jane" <jane@…>`` stays one entry); each
    entry is judged later by the API's own rule (:func:`e2a.api.wire.parse_recipient`)."""
    return wire.split_recipient_text(text)


def _same_recipients(text: str, stored: list[str]) -> bool:
    """Whether a recipient field still says what is stored (the stored list is normalised:
    bare lowercased addresses), so an untouched or merely reformatted field is no edit."""
    try:
        parsed = [wire.parse_recipient(entry) for entry in _split_addresses(text)]
    except BadRequest:
        return False  # an edit: approve reports the bad entry with the API's message
    return [p for p in parsed if p] == list(stored)


def _checked(value: str | None) -> bool:
    return value in ("on", "true", "1")


def _err(text: str) -> tuple[str, str]:
    return ("error", text)


def _message_parts(raw: bytes) -> tuple[list[tuple[str, str]], str, str]:
    """(display headers, text body, HTML part as source text) of stored bytes; robust to
    anything (a parse problem yields what could be read)."""
    import email
    import email.policy

    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:
        return [], raw.decode("utf-8", "replace"), ""
    wanted = ("From", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To")
    headers = []
    for name in wanted:
        for value in msg.get_all(name, []) or []:
            headers.append((name, str(value)))
    text = html_src = ""
    try:
        part = msg.get_body(preferencelist=("plain",))
        if part is not None:
            text = part.get_content()
        hpart = msg.get_body(preferencelist=("html",))
        if hpart is not None:
            html_src = hpart.get_content()
    except Exception:
        text = raw.decode("utf-8", "replace")
    return headers, text, html_src


_CONSOLE_PATH = re.compile(rb"^/console(/|$)")


def is_console_path(path: bytes) -> bool:
    """``/`` (it redirects to the console) and everything under ``/console``: answered in
    HTML with the console's headers, never the API's JSON."""
    return path == b"/" or _CONSOLE_PATH.match(path) is not None


def _error_doc(title: str, text: str) -> Any:
    return render.layout(Page(title, [tags.p(text)]), "/console", None, None)


def _sync_document(tag: Any) -> bytes:
    """A page without Deferreds flattens synchronously: for callers that cannot wait."""
    from twisted.web.template import flattenString

    out: list[bytes] = []

    flattenString(None, tag).addCallback(out.append)
    return b"<!DOCTYPE html>\n" + out[0]


def oversize_response(cap: int) -> bytes:
    """The complete HTTP response for a console form over its cap (written by
    :class:`e2a.api.http.CappedRequest` before routing): a 400 page with the console's headers."""
    body = _sync_document(_error_doc("Request too large", f"The form data exceeds {cap} bytes."))
    head = [b"HTTP/1.1 400 Bad Request", b"Content-Type: text/html; charset=utf-8", b"Cache-Control: no-store"]
    head += [name + b": " + value for name, value in SECURITY_HEADERS]
    head += [b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def error_page(request: Request, status: int, title: str, text: str) -> bytes:
    """An HTML error answer on a console path (unknown method, unknown route)."""
    request.setResponseCode(status)
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    return await render.document(_error_doc(title, text))


def login_link_url(public_url: str, token: str) -> str:
    """The sign-in link ``e2a-admin login-link`` prints (``http.public_url`` + path)."""
    return f"{public_url.rstrip('/')}/console/login?{urlencode({'t': token})}"
