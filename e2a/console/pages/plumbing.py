"""Routing, sessions, CSRF, forms and responses shared by every console page.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

import hmac
import re
import secrets
from importlib import resources
from typing import Any

from klein import Klein

from twisted.logger import Logger
from twisted.web.server import Request

from e2a.api.http import body_cap_for_path, read_body
from e2a.console import render
from e2a.console.pages.common import (
    COOKIE,
    PRE_COOKIE,
    SECURITY_HEADERS,
    Ctx,
    Download,
    Redirect,
    _first_form,
)
from e2a.console.render import Page, tags
from e2a.errors import E2AError, NotFound
from e2a.store import sessions

log = Logger()


class Plumbing:
    """Console pages: plumbing."""

    def static(self, name: str) -> bytes:
        if name not in self._static:
            self._static[name] = resources.files("e2a.console").joinpath("static", name).read_bytes()
        return self._static[name]

    async def session_of(self, request: Request) -> tuple[sessions.ConsoleSession | None, str]:
        token = (request.getCookie(COOKIE) or b"").decode("ascii", "replace")
        if not token or len(token) > 100:
            return None, ""
        return await sessions.get_session(self.db, token, self.now()), token

    def set_cookie(self, request: Request, name: bytes, value: str, max_age: int) -> None:
        request.addCookie(
            name, value.encode("ascii"), path=self.base.encode(), max_age=str(max_age), httpOnly=True,
            secure=self.secure or None, sameSite="lax",
        )

    def pre_token(self, request: Request) -> str:
        """The sign-in forms' double-submit token: the cookie's value, or a new one."""
        current = (request.getCookie(PRE_COOKIE) or b"").decode("ascii", "replace")
        if re.fullmatch(r"[A-Za-z0-9_\-]{20,64}", current):
            return current
        token = secrets.token_urlsafe(24)
        self.set_cookie(request, PRE_COOKIE, token, 3600)
        return token

    def csrf_hidden(self, ctx: Ctx) -> Any:
        assert ctx.session is not None
        return tags.input(type="hidden", name="csrf", value=ctx.session.csrf_token)

    def post_form(self, ctx: Ctx, action: str, *children: Any, **attrs: Any) -> Any:
        return tags.form(self.csrf_hidden(ctx), *children, method="POST", action=f"{self.base}{action}", **attrs)

    def route(self, router: Klein, path: str, methods: list[str], fn: Any, *, auth: bool = True,
              pre_csrf: bool = False) -> None:
        console = self

        async def handler(request: Request, **kw: Any) -> bytes:
            for name, value in SECURITY_HEADERS:
                request.setHeader(name, value)
            request.setHeader(b"Cache-Control", b"no-store")
            session = None
            ctx = Ctx(None)
            try:
                session, token = await console.session_of(request)
                ctx = Ctx(session, token=token)
                if auth and session is None:
                    if request.method == b"POST":
                        return await console.write(request, Page("Signed out", [tags.p(
                            "Your session has ended. ", tags.a("Sign in again", href=f"{console.base}/signin"),
                            ".")], status=403), None)
                    request.setResponseCode(303)
                    request.setHeader(b"Location", f"{console.base}/signin".encode())
                    return b""
                if request.method == b"POST":
                    ctx.form = _first_form(read_body(request, body_cap_for_path(request.path)))
                    expected = (request.getCookie(PRE_COOKIE) or b"").decode("ascii", "replace") if pre_csrf \
                        else (session.csrf_token if session is not None else "")
                    given = ctx.form.get("csrf", "")
                    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
                        return await console.write(request, Page("Forbidden", [tags.p(
                            "The form was missing its security token or it did not match. Reload the page and "
                            "try again.")], status=403), session)
                result = await fn(request, ctx, **kw)
            except NotFound:
                result = Page("Not found", [tags.p("There is nothing here, or it is not yours.")], status=404)
            except E2AError as err:
                result = Page("Request refused", [tags.p(err.message)], status=err.status)
            except Exception:
                log.failure("console {method} {path} failed", method=request.method, path=request.path)
                result = Page("Something went wrong", [tags.p("An unexpected error occurred (details in the "
                                                             "server log).")], status=500)
            if isinstance(result, Redirect):
                request.setResponseCode(303)
                request.setHeader(b"Location", result.location.encode())
                return b""
            if isinstance(result, Download):
                request.setHeader(b"Content-Type", result.content_type)
                request.setHeader(b"Content-Disposition", f'attachment; filename="{result.filename}"'.encode())
                return result.body
            return await console.write(request, result, ctx.session)

        handler.__name__ = "console_" + re.sub(r"\W", "_", path + "_" + "_".join(methods))
        router.route(path, methods=methods, endpoint=handler.__name__)(handler)

    async def write(self, request: Request, page: Page, session: sessions.ConsoleSession | None) -> bytes:
        request.setResponseCode(page.status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        for name, value in page.headers.items():
            request.setHeader(name, value)
        doc = render.layout(page, self.base, session.email if session else None,
                            session.csrf_token if session else None)
        return await render.document(doc)
