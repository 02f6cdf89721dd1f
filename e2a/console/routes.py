"""Klein routes of the web console (``/console/…``; ``/`` redirects there).

Authentication: a session cookie (``e2a_console``, HttpOnly, SameSite=Lax, Secure when
``http.public_url`` is https, path ``/console``) made by signing in with a user-scoped API key
or a one-time link (printed by ``e2a-admin login-link``, or mailed from the sign-in page when
outbound mail and ``http.public_url`` are configured). Only the token's hash is stored
(:mod:`e2a.store.sessions`); sessions last 7 days under the injected clock.

CSRF: every state-changing form carries the session's CSRF token (sign-in forms, before a
session exists, carry a double-submit token bound to a short-lived cookie); a POST without
the right token answers 403 and changes nothing — the check runs before the form is read
further. SameSite=Lax is a second line, not the only one.

Rules are not repeated here: agents are registered and updated through
:func:`e2a.api.agents.register_agent` / :func:`e2a.api.agents.parse_update` and the same SSRF
check, held mail through :class:`e2a.outbound.hitl.HoldReview`, keys, secrets, domains and the
account through the stores the API routes call. Another user's agent, message or hold is a
404, exactly as in the API.

The pages are in :mod:`e2a.console.pages` (one module per section); this module assembles
:class:`Console` from them, installs the routes and keeps every helper importable from here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from klein import Klein

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from e2a.console.pages.account import AccountPages
from e2a.console.pages.agents import AgentPages
from e2a.console.pages.approvals import ApprovalPages
from e2a.console.pages.common import (  # noqa: F401, E501 - importable from here as before
    _CONSOLE_PATH,
    COOKIE,
    PRE_COOKIE,
    SECURITY_HEADERS,
    SIGNIN_WINDOW_SECONDS,
    STATIC,
    Ctx,
    Download,
    Redirect,
    _checked,
    _err,
    _error_doc,
    _first_form,
    _message_parts,
    _same_recipients,
    _split_addresses,
    _sync_document,
    error_page,
    is_console_path,
    login_link_url,
    oversize_response,
)
from e2a.console.pages.domains import DomainPages
from e2a.console.pages.keys import KeyPages
from e2a.console.pages.overview import OverviewPages
from e2a.console.pages.plumbing import Plumbing
from e2a.console.pages.signin import SignInPages

__all__ = [
    "COOKIE",
    "Console",
    "Ctx",
    "Download",
    "PRE_COOKIE",
    "Redirect",
    "SECURITY_HEADERS",
    "SIGNIN_WINDOW_SECONDS",
    "STATIC",
    "error_page",
    "install",
    "is_console_path",
    "login_link_url",
    "oversize_response",
]

log = Logger()


class Console(AccountPages, DomainPages, KeyPages, ApprovalPages, AgentPages, OverviewPages, SignInPages, Plumbing):
    """The console's pages (:mod:`e2a.console.pages`, one mixin per section)."""

    def __init__(self, deps: Any) -> None:
        self.deps = deps
        self.db = deps.db
        self.config = deps.config
        public_url = deps.config.http.public_url
        self.secure = public_url.startswith("https://")
        self.base = (urlsplit(public_url).path.rstrip("/") if public_url else "") + "/console"
        self._static: dict[str, bytes] = {}
        self._mailing: set[Deferred[None]] = set()  # sign-in mail being queued (kept referenced)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.deps.clock.seconds(), UTC)

    def review(self) -> Any:
        from e2a.api.review import hold_review

        return hold_review(self.deps)


def install(router: Klein, deps: Any) -> None:
    c = Console(deps)

    @router.route("/", methods=["GET"], endpoint="console_root_redirect")
    def root(request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"Location", f"{c.base}/".encode())
        return b""

    @router.route("/console", methods=["GET"], endpoint="console_slashless")
    def slashless(request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"Location", f"{c.base}/".encode())
        return b""

    @router.route("/console/static/<name>", methods=["GET"], endpoint="console_static")
    def static(request: Request, name: str) -> bytes:
        for header, value in SECURITY_HEADERS:
            request.setHeader(header, value)
        if name not in STATIC:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"Content-Type", STATIC[name])
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return c.static(name)

    r = c.route
    r(router, "/console/signin", ["GET"], c.signin_get, auth=False)
    r(router, "/console/signin", ["POST"], c.signin_post, auth=False, pre_csrf=True)
    r(router, "/console/signin/mail", ["POST"], c.signin_mail, auth=False, pre_csrf=True)
    r(router, "/console/login", ["GET"], c.link_get, auth=False)
    r(router, "/console/login", ["POST"], c.link_post, auth=False, pre_csrf=True)
    r(router, "/console/signout", ["POST"], c.signout)
    r(router, "/console/", ["GET"], c.overview_get)
    r(router, "/console/agents", ["POST"], c.agent_create)
    r(router, "/console/agents/<address>", ["GET"], c.agent_get)
    r(router, "/console/agents/<address>/settings", ["POST"], c.agent_settings)
    r(router, "/console/agents/<address>/delete", ["POST"], c.agent_delete)
    r(router, "/console/agents/<address>/messages/<message_id>", ["GET"], c.message_get)
    r(router, "/console/agents/<address>/messages/<message_id>/raw", ["GET"], c.message_raw)
    r(router, "/console/agents/<address>/messages/<message_id>/redeliver", ["POST"], c.redeliver)
    r(router, "/console/approvals", ["GET"], c.approvals_get)
    r(router, "/console/approvals/<message_id>", ["GET"], c.held_get)
    r(router, "/console/approvals/<message_id>/approve", ["POST"], c.held_approve)
    r(router, "/console/approvals/<message_id>/reject", ["POST"], c.held_reject)
    r(router, "/console/keys", ["GET"], c.keys_get)
    r(router, "/console/keys", ["POST"], c.key_create)
    r(router, "/console/keys/<key_id>/revoke", ["POST"], c.key_revoke)
    r(router, "/console/secrets", ["POST"], c.secret_create)
    r(router, "/console/secrets/<secret_id>/revoke", ["POST"], c.secret_revoke)
    r(router, "/console/domains", ["GET"], c.domains_get)
    r(router, "/console/domains", ["POST"], c.domain_add)
    r(router, "/console/domains/<domain>/verify", ["POST"], c.domain_verify)
    r(router, "/console/domains/<domain>/delete", ["POST"], c.domain_delete)
    r(router, "/console/account", ["GET"], c.account_get)
    r(router, "/console/account/export", ["GET"], c.account_export)
    r(router, "/console/account/delete", ["POST"], c.account_delete)
    r(router, "/console/<path:rest>", ["GET"], c.not_found)

