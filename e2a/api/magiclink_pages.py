"""Magic-link pages ``/api/v1/approve`` and ``/api/v1/reject`` (api.md §8, mail.md §8.4-§8.5).

The token is the only credential. ``GET``/``HEAD`` only ever show a confirmation page, because
mail scanners and link previewers fetch every URL in a message; the state changes only on the
``POST`` of that page's form. Both run the same checks in the same order (the outcome table),
so a page never offers a button that would then fail for a reason already known.

The HITL rules themselves (state checks, release, reject) live in
:class:`e2a.outbound.hitl.HoldReview`; this module only maps its outcomes to pages. Every answer
— whatever the status, including 405 and the 500 fallback — is an HTML page with the same
security headers, no scripts and no external resources; every dynamic value is escaped.
Tokens are never logged (the access log redacts ``t=``/``token=`` in the URL; the POST body is
never logged).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from klein import Klein

from twisted.logger import Logger
from twisted.web.server import Request

from e2a.api.http import FORM_CAP, read_body
from e2a.errors import E2AError
from e2a.outbound.hitl import HoldReview
from e2a.outbound.magiclink import ApprovalTokens, ExpiredToken, InvalidToken
from e2a.outbound.notify import rfc5322_utc

__all__ = [
    "PAGE_HEADERS",
    "PREVIEW_CHARS",
    "Page",
    "confirmation_page",
    "form_action",
    "install",
    "oversize_response",
    "render_page",
]

log = Logger()

ACTIONS = ("approve", "reject")
METHODS = (b"GET", b"HEAD", b"POST")
PREVIEW_CHARS = 2000
MAX_REASON_CHARS = 1000
MAGIC_LINK_REJECT_REASON = "magic-link rejection"

#: api.md §8: on every magic-link page, whatever the status.
PAGE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Type", b"text/html; charset=utf-8"),
    (b"Cache-Control", b"no-store"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Robots-Tag", b"noindex, nofollow"),
    (b"X-Content-Type-Options", b"nosniff"),
    (
        b"Content-Security-Policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
)

_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;background:#f6f7f9;color:#1d2330;margin:0}"
    "main{max-width:42rem;margin:3rem auto;background:#fff;border:1px solid #dde1e7;border-radius:8px;"
    "padding:1.5rem 2rem}"
    "h1{font-size:1.4rem;margin:0 0 1rem}"
    "table{border-collapse:collapse;margin:0 0 1rem}"
    "th{text-align:left;vertical-align:top;padding:.2rem 1rem .2rem 0;color:#5a6270;font-weight:600}"
    "td{padding:.2rem 0;word-break:break-word}"
    "pre{white-space:pre-wrap;word-break:break-word;background:#f1f3f6;padding:.75rem;border-radius:4px;"
    "max-height:24rem;overflow:auto}"
    "button{font-size:1rem;padding:.5rem 1.25rem;border-radius:4px;border:1px solid #2b59c3;background:#2b59c3;"
    "color:#fff;cursor:pointer}"
    "button.reject{border-color:#b3261e;background:#b3261e}"
    "input[type=text]{font-size:1rem;padding:.4rem;width:100%;box-sizing:border-box;margin:.25rem 0 .75rem}"
    ".note{color:#5a6270}"
)


# ------------------------------------------------------------------------------ pure rendering


@dataclass(frozen=True)
class Page:
    status: int
    title: str
    body: str  # inner HTML, already escaped


def render_page(page: Page) -> bytes:
    """The whole document: one inline stylesheet, no scripts, no external resource (not even
    a favicon: ``data:`` is refused by ``default-src 'none'`` as well, so none is linked)."""
    e = html.escape
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n'
        "<head>\n"
        '<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(page.title)} - e2a</title>\n"
        f"<style>{_CSS}</style>\n"
        "</head>\n"
        "<body>\n"
        "<main>\n"
        f"{page.body}"
        "</main>\n"
        "</body>\n"
        "</html>\n"
    ).encode()


def message_page(status: int, title: str, text: str) -> Page:
    e = html.escape
    return Page(status, title, f"<h1>{e(title)}</h1>\n<p>{e(text)}</p>\n")


def form_action(public_url: str, action: str) -> str:
    """The form's ``action``: the path prefix of ``http.public_url`` + ``/api/v1/<action>``
    (a proxy serving e2a under ``/mail`` needs ``/mail/api/v1/approve``)."""
    prefix = urlsplit(public_url).path.rstrip("/") if public_url else ""
    return f"{prefix}/api/v1/{action}"


def _list(values: Any) -> str:
    return ", ".join(values) if values else "-"


def confirmation_page(held: Any, action: str, token: str, public_url: str) -> Page:
    """The GET/HEAD page: what would be approved or rejected, and the one form that does it."""
    e = html.escape
    expires = held.approval_expires_at
    rows = [
        ("Agent", held.agent_id),
        ("To", _list(held.to)),
        ("Cc", _list(held.cc)),
        ("Bcc", _list(held.bcc)),
        ("Subject", held.subject),
        ("Expires", rfc5322_utc(expires) if expires is not None else "-"),
    ]
    table = "".join(f"<tr><th>{name}</th><td>{e(value)}</td></tr>\n" for name, value in rows)
    if held.body_text:
        preview = held.body_text[:PREVIEW_CHARS]
        more = " (first 2000 characters)" if len(held.body_text) > PREVIEW_CHARS else ""
        body = f'<p class="note">Text body{more}:</p>\n<pre>{e(preview)}</pre>\n'
    else:
        body = '<p class="note">This message has only an HTML body; it is not shown here.</p>\n'
    target = e(form_action(public_url, action))
    hidden = f'<input type="hidden" name="t" value="{e(token)}">\n'
    if action == "approve":
        title = "Approve outbound email"
        form = (
            f'<form method="POST" action="{target}">\n{hidden}'
            '<button type="submit">Approve and send</button>\n</form>\n'
        )
    else:
        title = "Reject outbound email"
        form = (
            f'<form method="POST" action="{target}">\n{hidden}'
            # The input exactly as api.md §8 writes it (no id): the label wraps it instead.
            '<label>Reason (optional)\n<input type="text" name="reason" maxlength="200"></label>\n'
            '<button type="submit" class="reject">Reject</button>\n</form>\n'
        )
    return Page(200, title, f"<h1>{e(title)}</h1>\n<table>\n{table}</table>\n{body}{form}")


def _already_resolved(status: str) -> Page:
    e = html.escape
    return Page(
        409, "Already resolved",
        f"<h1>Already resolved</h1>\n<p>This message is no longer waiting for approval. "
        f"Current status: <strong>{e(status)}</strong>.</p>\n",
    )


def error_page(err: E2AError, action: str) -> Page:
    """The page for an error raised by the HITL review (api.md §8 outcome table)."""
    code, status = err.code, err.status
    if status == 404:
        return message_page(404, "Not found", "This message no longer exists.")
    if code == "not_pending":
        return _already_resolved(str(getattr(err, "current_status", "") or "unknown"))
    if code == "expired":
        return message_page(409, "Approval window closed",
                            "The approval window of this message has closed; it can no longer be approved.")
    if code == "domain_not_verified":
        return message_page(403, "Domain not verified",
                            "The agent's domain is not verified, so this message cannot be sent.")
    if code == "outbound_not_configured":
        return message_page(503, "Cannot be sent",
                            "No outbound mail route is configured for a recipient. The message stays pending.")
    if status == 400:
        return message_page(400, "Cannot be sent",
                            f"The message failed validation: {err.message} The message stays pending.")
    raise err


def oversize_response(cap: int) -> bytes:
    """The complete HTTP response for a form post over its cap (written by
    :class:`e2a.api.http.CappedRequest` before routing): the 400 page with every page header."""
    body = render_page(message_page(400, "Request too large", f"The form data exceeds {cap} bytes."))
    head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in PAGE_HEADERS)
    return head + b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


# ------------------------------------------------------------------------------ request helpers


def _first(pairs: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """api.md §0.6: repeated parameters, first wins."""
    for key, value in pairs:
        if key == name:
            return value
    return None


def token_from(pairs: list[tuple[bytes, bytes]]) -> str | None:
    """``t``, else ``token`` (``t`` wins if both); None when absent or empty. Bytes that are
    not UTF-8 stay in (as U+FFFD) so the token is reported invalid, not missing."""
    for name in (b"t", b"token"):
        value = _first(pairs, name)
        if value:
            return value.decode("utf-8", "replace")
    return None


def parse_pairs(raw: bytes) -> list[tuple[bytes, bytes]]:
    """``a=1&b=2`` (query or form body) as byte pairs, percent- and ``+``-decoded. Not
    ``parse_qsl``: given bytes it decodes escapes as ASCII and raises on any non-ASCII value."""
    pairs = []
    for part in raw.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            pairs.append((unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))))
    return pairs


def _query_pairs(request: Request) -> list[tuple[bytes, bytes]]:
    return parse_pairs(urlsplit(request.uri).query)


# ------------------------------------------------------------------------------ routes


def install(router: Klein, deps: Any) -> None:
    pages = MagicLinkPages(deps)
    for action in ACTIONS:
        # No ``methods``: every method reaches the handler, which answers 405 as an HTML page.
        router.route(f"/api/v1/{action}", endpoint=f"magic_link_{action}")(pages.handler(action))


class MagicLinkPages:
    def __init__(self, deps: Any) -> None:
        self.deps = deps
        self.public_url: str = deps.config.http.public_url

    def tokens(self) -> ApprovalTokens | None:
        """The deployment's approval tokens (built by e2a/service.py from the resolved secret)."""
        tokens: ApprovalTokens | None = self.deps.services.approval_tokens
        return tokens

    def review(self) -> HoldReview:
        """The shared :class:`~e2a.outbound.hitl.HoldReview` (the one the API routes use)."""
        review: HoldReview = self.deps.services.hold_review
        return review

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.deps.clock.seconds(), UTC)

    def handler(self, action: str) -> Any:
        async def magic_link(request: Request) -> bytes:
            for name, value in PAGE_HEADERS:
                request.setHeader(name, value)
            try:
                page = await self.outcome(request, action)
            except Exception:
                # Only the path: the query (or form) holds the token.
                log.failure("magic-link {action} page failed", action=action)
                page = message_page(500, "Something went wrong", "An unexpected error occurred. Please try again later.")
            request.setResponseCode(page.status)
            if page.status == 405:
                request.setHeader(b"Allow", b"GET, HEAD, POST")
            return render_page(page)

        magic_link.__name__ = f"magic_link_{action}"
        return magic_link

    async def outcome(self, request: Request, action: str) -> Page:
        if request.method not in METHODS:
            return message_page(405, "Method not allowed", "Open the link from the notification email.")
        post = request.method == b"POST"
        if post:
            try:
                pairs = parse_pairs(read_body(request, FORM_CAP))
            except E2AError:
                return message_page(400, "Request too large", f"The form data exceeds {FORM_CAP} bytes.")
        else:
            pairs = _query_pairs(request)

        # 1. token present, 2. authentic and for this endpoint, 3. not past exp (mail.md §8.4)
        token = token_from(pairs)
        if token is None:
            return message_page(400, "Missing link token", "This link is incomplete: it carries no token.")
        tokens = self.tokens()
        now = self.now()
        try:
            if tokens is None:
                raise InvalidToken()
            claims = tokens.verify(token, action, now)
        except InvalidToken:
            return message_page(400, "Invalid link", "This link is not valid. Use the link from the email exactly.")
        except ExpiredToken:
            return message_page(410, "Link expired", "This link has expired.")

        # 4. the message's state, in the order of the outcome table (HoldReview.check)
        review = self.review()
        try:
            held = await review.check(claims.message_id, action, now=now)
        except E2AError as err:
            return error_page(err, action)
        if not post:
            return confirmation_page(held, action, token, self.public_url)

        try:
            if action == "approve":
                await review.approve(claims.message_id, user_id=None, edits=None, via="magic_link")
                return message_page(200, "Approved", "The message was approved and released for delivery.")
            raw_reason = _first(pairs, b"reason") or b""
            try:
                reason = raw_reason.decode("utf-8").strip()
            except UnicodeDecodeError:
                return message_page(400, "Invalid reason", "The reason is not valid text.")
            if len(reason) > MAX_REASON_CHARS or "\x00" in reason:
                return message_page(400, "Invalid reason", f"The reason must be at most {MAX_REASON_CHARS} characters.")
            await review.reject(
                claims.message_id, user_id=None, reason=reason or MAGIC_LINK_REJECT_REASON, via="magic_link"
            )
            return message_page(200, "Rejected", "The message was rejected; it will not be sent.")
        except E2AError as err:
            return error_page(err, action)
