"""Klein routes of the web console (``/console/…``; ``/`` redirects there).

Authentication: a session cookie (``e2a_console``, HttpOnly, SameSite=Lax, Secure when
``http.public_url`` is https, path ``/console``) made by signing in with a user-scoped API key
or a one-time link from ``e2a-admin login-link``. Only the token's hash is stored
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
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from klein import Klein

from twisted.internet import threads
from twisted.logger import Logger
from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate_key
from e2a.api.http import JSON_CAP, encode_json, read_body
from e2a.api.magiclink_pages import parse_pairs
from e2a.console import render
from e2a.console.render import Page, badge, bidi, clip, tags
from e2a.errors import BadRequest, E2AError, NotFound, RateLimited, Unauthorized
from e2a.store import accounts, deliveries, messages, ratelimits, sessions
from e2a.store import agents as agent_store
from e2a.store import console as console_store
from e2a.store import domains as domain_store

__all__ = ["COOKIE", "Console", "install"]

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
    return [part.strip() for part in re.split(r"[,\n]", text) if part.strip()]


def _checked(value: str | None) -> bool:
    return value in ("on", "true", "1")


def _err(text: str) -> tuple[str, str]:
    return ("error", text)


class Console:
    def __init__(self, deps: Any) -> None:
        self.deps = deps
        self.db = deps.db
        self.config = deps.config
        public_url = deps.config.http.public_url
        self.secure = public_url.startswith("https://")
        self.base = (urlsplit(public_url).path.rstrip("/") if public_url else "") + "/console"
        self._static: dict[str, bytes] = {}

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.deps.clock.seconds(), UTC)

    def review(self) -> Any:
        from e2a.api.review import hold_review

        return hold_review(self.deps)

    # ---- plumbing -------------------------------------------------------------------------

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
                    ctx.form = _first_form(read_body(request, JSON_CAP))
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

    # ---- sign-in --------------------------------------------------------------------------

    def client_ip(self, request: Request) -> str:
        from e2a.api.agents import request_client_ip

        return request_client_ip(request, self.deps)

    def signin_page(self, request: Request, flash: tuple[str, str] | None = None, status: int = 200) -> Page:
        pre = self.pre_token(request)
        form = tags.form(
            tags.input(type="hidden", name="csrf", value=pre),
            tags.label("User-scoped API key", for_="key"),
            tags.input(type="password", name="key", id="key", autocomplete="off", required="required"),
            tags.p("Agent-scoped keys cannot sign in. Operators can also print a one-time link with ",
                   tags.code("e2a-admin login-link --email …"), ".", class_="muted"),
            tags.button("Sign in", type="submit"),
            method="POST", action=f"{self.base}/signin",
        )
        return Page("Sign in", [tags.section(form, class_="card")], status=status, flash=flash)

    async def signin_get(self, request: Request, ctx: Ctx) -> Any:
        if ctx.session is not None:
            return Redirect(f"{self.base}/")
        return self.signin_page(request)

    async def signin_limited(self, request: Request) -> tuple[str, int] | None:
        """(bucket, limit) while failures are below the limit; None when refused now."""
        limit = self.config.rate_limits.register_per_hour
        bucket = f"console_signin:{self.client_ip(request)}"
        if limit > 0:
            start = ratelimits.window_start(self.deps.clock.seconds(), SIGNIN_WINDOW_SECONDS)
            if await sessions.rate_count(self.db, bucket, start) >= limit:
                return None
        return bucket, limit

    async def signin_failed(self, bucket: str, limit: int) -> None:
        try:
            await ratelimits.hit(self.db, bucket, limit, SIGNIN_WINDOW_SECONDS, self.deps.clock.seconds())
        except RateLimited:
            pass

    async def start_session(self, request: Request, user_id: str) -> Redirect:
        token, _csrf = await sessions.create_session(self.db, user_id, self.now())
        self.set_cookie(request, COOKIE, token, int(sessions.SESSION_TTL.total_seconds()))
        return Redirect(f"{self.base}/")

    async def signin_post(self, request: Request, ctx: Ctx) -> Any:
        limited = await self.signin_limited(request)
        if limited is None:
            return self.signin_page(request, _err("Too many failed sign-ins from your address; try again later."),
                                    429)
        key = ctx.form.get("key", "").strip()
        try:
            principal = await authenticate_key(self.db, key)
        except Unauthorized:
            await self.signin_failed(*limited)
            return self.signin_page(request, _err("That key is not valid (unknown, revoked or mistyped)."), 401)
        if not principal.is_user_scoped:
            await self.signin_failed(*limited)
            return self.signin_page(request, _err("Agent-scoped keys cannot sign in: use a user-scoped key."), 403)
        return await self.start_session(request, principal.user_id)

    async def link_get(self, request: Request, ctx: Ctx) -> Any:
        token = (request.args.get(b"t") or [b""])[0].decode("ascii", "replace")
        pre = self.pre_token(request)
        form = tags.form(
            tags.input(type="hidden", name="csrf", value=pre),
            tags.input(type="hidden", name="t", value=token),
            tags.p("This one-time link signs you in to the e2a console. It works once."),
            tags.button("Sign in", type="submit"),
            method="POST", action=f"{self.base}/login",
        )
        # GET only shows the form: mail scanners fetch every link, and must not use it up.
        return Page("Sign in with a link", [tags.section(form, class_="card")])

    async def link_post(self, request: Request, ctx: Ctx) -> Any:
        limited = await self.signin_limited(request)
        if limited is None:
            return self.signin_page(request, _err("Too many failed sign-ins from your address; try again later."),
                                    429)
        user_id = await sessions.consume_login_link(self.db, ctx.form.get("t", ""), self.now())
        if user_id is None:
            await self.signin_failed(*limited)
            return self.signin_page(request, _err("That sign-in link is invalid, expired or already used."), 400)
        return await self.start_session(request, user_id)

    async def signout(self, request: Request, ctx: Ctx) -> Any:
        await sessions.revoke_session(self.db, ctx.token, self.now())
        self.set_cookie(request, COOKIE, "", 0)
        return Redirect(f"{self.base}/signin")

    # ---- overview -------------------------------------------------------------------------

    def webhook_health(self, agent: Any, stats: console_store.AgentStats | None) -> list[Any]:
        if agent.agent_mode != "cloud":
            return [badge("local (no webhook)")]
        if agent.webhook_status == "disabled":
            return [badge("disabled", "bad")]
        if stats is None or not stats.last_status:
            return [badge("no deliveries yet")]
        if stats.last_status == "delivered":
            out = [badge("ok", "good")]
        elif stats.last_status == "paused":
            out = [badge("paused", "bad")]
        elif stats.last_status == "failed" or stats.last_error:
            out = [badge("failing", "bad")]
        else:
            out = [badge("pending")]
        if stats.last_error and stats.last_status != "delivered":
            out += [" ", tags.span(clip(stats.last_error, 120), class_="muted")]
        return out

    async def overview(self, request: Request, ctx: Ctx, flash: tuple[str, str] | None = None,
                       status: int = 200, values: dict[str, str] | None = None) -> Page:
        agents = await agent_store.list_agents(self.db, ctx.user_id)
        stats = await console_store.agent_stats(self.db, ctx.user_id)
        rows = []
        for a in agents:
            s = stats.get(a.id)
            rows.append(tags.tr(
                tags.td(tags.a(bidi(a.id), href=f"{self.base}/agents/{quote(a.id, safe='@')}")),
                tags.td(bidi(a.name, 80)),
                tags.td(a.agent_mode),
                tags.td(str(s.unread if s else 0)),
                tags.td(str(s.held if s else 0)),
                tags.td(*self.webhook_health(a, s)),
            ))
        table: Any = tags.div(tags.table(
            tags.thead(tags.tr(*(tags.th(h, scope="col") for h in
                                 ("Address", "Name", "Mode", "Unread", "Held", "Webhook")))),
            tags.tbody(*rows)), class_="table-wrap") if rows else tags.p("No agents yet.", class_="muted")
        days = await console_store.daily_counts(self.db, ctx.user_id, self.now().date())
        chart = tags.section(
            tags.h2("Last 14 days"),
            tags.div(render.chart_svg(days), class_="chart"),
            tags.p(tags.span("■ received", class_="swatch-r"), tags.span("■ delivered to webhooks",
                                                                        class_="swatch-d"), class_="legend"),
            class_="card",
        )
        return Page("Overview", [tags.section(tags.h2("Agents"), table, class_="card"), chart,
                                 self.new_agent_form(ctx, values or {})], nav="overview", flash=flash,
                    status=status)

    def new_agent_form(self, ctx: Ctx, values: dict[str, str]) -> Any:
        shared = self.config.shared_domain
        mode = values.get("agent_mode", "local")
        return tags.section(
            tags.h2("New agent"),
            self.post_form(
                ctx, "/agents",
                tags.label(f"Slug (address on {shared})" if shared else "Slug", for_="slug"),
                tags.input(type="text", name="slug", id="slug", value=values.get("slug", "")),
                tags.label("Or full address on one of your verified domains", for_="email"),
                tags.input(type="email", name="email", id="email", value=values.get("email", "")),
                tags.label("Name", for_="name"),
                tags.input(type="text", name="name", id="name", value=values.get("name", "")),
                tags.label("Mode", for_="agent_mode"),
                self.select("agent_mode", (("local", "local (poll the API)"), ("cloud", "cloud (webhook)")), mode),
                tags.label("Webhook URL (cloud mode)", for_="webhook_url"),
                tags.input(type="url", name="webhook_url", id="webhook_url", value=values.get("webhook_url", "")),
                tags.button("Create agent", type="submit"),
            ),
            class_="card",
        )

    @staticmethod
    def select(name: str, options: Any, current: str) -> Any:
        opts = []
        for value, label in options:
            opt = tags.option(label, value=value)
            if value == current:
                opt.attributes["selected"] = "selected"
            opts.append(opt)
        return tags.select(*opts, name=name, id=name)

    async def overview_get(self, request: Request, ctx: Ctx) -> Any:
        done = (request.args.get(b"done") or [b""])[0]
        flash = {b"agent": ("ok", "Agent created.")}.get(done)
        return await self.overview(request, ctx, flash)

    async def agent_create(self, request: Request, ctx: Ctx) -> Any:
        from e2a.api.agents import REGISTER_WINDOW_SECONDS, register_agent

        f = ctx.form
        try:
            # the API's register limit, per client IP, every attempt (api.md §4.2 #1)
            await ratelimits.hit(self.db, f"register:{self.client_ip(request)}",
                                 self.config.rate_limits.register_per_hour, REGISTER_WINDOW_SECONDS,
                                 self.deps.clock.seconds())
            agent = await register_agent(
                self.deps, ctx.user_id, slug=f.get("slug", "").strip(), email=f.get("email", "").strip(),
                name=f.get("name", ""), webhook_url=f.get("webhook_url", "").strip(),
                agent_mode=f.get("agent_mode", ""),
            )
        except (BadRequest, E2AError) as err:
            if err.status >= 500:
                raise
            return await self.overview(request, ctx, _err(f"Agent not created: {err.message}"), 400, f)
        return Redirect(f"{self.base}/agents/{quote(agent.id, safe='@')}?done=created")

    # ---- agent page -----------------------------------------------------------------------

    async def own_agent(self, ctx: Ctx, address: str) -> Any:
        agent = await agent_store.get_agent(self.db, ctx.user_id, wire.path_agent_key(address))
        if agent is None:
            raise NotFound("agent not found")
        return agent

    def agent_url(self, agent: Any) -> str:
        return f"{self.base}/agents/{quote(agent.id, safe='@')}"

    def settings_form(self, ctx: Ctx, agent: Any, values: dict[str, str] | None, webhook_error: str) -> Any:
        v = values or {}
        hitl = _checked(v.get("hitl_enabled")) if values is not None else agent.hitl_enabled
        webhook: list[Any] = [
            tags.label("Webhook URL", for_="webhook_url"),
            tags.input(type="url", name="webhook_url", id="webhook_url",
                       value=v.get("webhook_url", agent.webhook_url), **{"aria-describedby": "webhook-error"}),
        ]
        if webhook_error:
            webhook.append(tags.p(webhook_error, class_="field-error", id="webhook-error", role="alert"))
        hitl_box = tags.input(type="checkbox", name="hitl_enabled", id="hitl_enabled", value="on")
        if hitl:
            hitl_box.attributes["checked"] = "checked"
        return tags.section(
            tags.h2("Settings"),
            self.post_form(
                ctx, f"/agents/{quote(agent.id, safe='@')}/settings",
                tags.label("Name", for_="name"),
                tags.input(type="text", name="name", id="name", value=v.get("name", agent.name)),
                tags.label("Mode", for_="agent_mode"),
                self.select("agent_mode", (("local", "local"), ("cloud", "cloud")),
                            v.get("agent_mode", agent.agent_mode)),
                *webhook,
                tags.p(hitl_box, " ", tags.label("Hold outbound mail for human review (HITL)", for_="hitl_enabled",
                                                 class_="inline")),
                tags.label("Review window (seconds)", for_="hitl_ttl_seconds"),
                tags.input(type="number", name="hitl_ttl_seconds", id="hitl_ttl_seconds", min="1",
                           max=str(wire.HITL_TTL_MAX), value=v.get("hitl_ttl_seconds", str(agent.hitl_ttl_seconds))),
                tags.label("When the window closes", for_="hitl_expiration_action"),
                self.select("hitl_expiration_action", (("reject", "reject"), ("approve", "approve")),
                            v.get("hitl_expiration_action", agent.hitl_expiration_action)),
                tags.label("Reviewers (one address per line)", for_="hitl_reviewers"),
                tags.textarea(v.get("hitl_reviewers", "\n".join(agent.hitl_reviewers)), name="hitl_reviewers",
                              id="hitl_reviewers", rows="3"),
                tags.button("Save settings", type="submit"),
            ),
            class_="card",
        )

    async def agent_page(self, request: Request, ctx: Ctx, agent: Any, *, flash: tuple[str, str] | None = None,
                         status: int = 200, values: dict[str, str] | None = None, webhook_error: str = "") -> Page:
        inbox = await console_store.recent_inbox(self.db, agent.id, 100)
        url = self.agent_url(agent)
        rows = [tags.tr(
            tags.td(tags.a(bidi(m.subject or "(no subject)", 120), href=f"{url}/messages/{m.id}")),
            tags.td(bidi(m.display_from, 80)),
            tags.td(*render.verdict_badges(m.auth_headers)),
            tags.td(m.status),
            tags.td(m.created_at.strftime("%Y-%m-%d %H:%M")),
        ) for m in inbox]
        inbox_card = tags.section(
            tags.h2("Inbox"),
            tags.div(tags.table(tags.thead(tags.tr(*(tags.th(h, scope="col") for h in
                                                     ("Subject", "From", "Verdict", "Status", "Received")))),
                                tags.tbody(*rows)), class_="table-wrap")
            if rows else tags.p("No mail yet.", class_="muted"),
            class_="card")
        dlv, _ = await deliveries.list_deliveries(self.db, agent.id, "all", None, 50, None)
        drows = []
        for d in dlv:
            redeliver = self.post_form(ctx, f"/agents/{quote(agent.id, safe='@')}/messages/{d.message_id}/redeliver",
                                       tags.button("Redeliver", type="submit", class_="secondary"), class_="inline")
            drows.append(tags.tr(
                tags.td(tags.a(d.message_id[:16] + "…", href=f"{url}/messages/{d.message_id}")),
                tags.td(badge("retrying", "bad") if d.status == "pending" and d.last_error else
                        badge(d.status, {"delivered": "good", "failed": "bad", "paused": "bad"}.get(d.status,
                                                                                                  "neutral"))),
                tags.td(str(d.attempts)),
                tags.td(str(d.last_status_code) if d.last_status_code is not None else "-"),
                tags.td(clip(d.last_error, 200) or "-"),
                tags.td(redeliver if agent.agent_mode == "cloud" else "-"),
            ))
        delivery_card = tags.section(
            tags.h2("Webhook deliveries"),
            tags.div(tags.table(tags.thead(tags.tr(*(tags.th(h, scope="col") for h in (
                "Message", "Status", "Attempts", "Last HTTP status", "Last error", "")))), tags.tbody(*drows)),
                class_="table-wrap") if drows else tags.p("No deliveries.", class_="muted"),
            class_="card")
        out = await console_store.list_outbound(self.db, agent.id, 30)
        orows = [tags.tr(
            tags.td(bidi(o.subject or "(no subject)", 120)),
            tags.td(clip(", ".join(o.to), 120)),
            tags.td(badge(o.status, "bad" if o.status.startswith(("rejected", "expired")) else "neutral"),
                    " ", tags.span(f"delivery {o.delivery_status}", class_="muted") if o.delivery_status else "",
                    " ", badge("edited") if o.edited else ""),
            tags.td(o.created_at.strftime("%Y-%m-%d %H:%M")),
        ) for o in out]
        outbound_card = tags.section(
            tags.h2("Sent and held mail"),
            tags.div(tags.table(tags.thead(tags.tr(*(tags.th(h, scope="col") for h in (
                "Subject", "To", "Status", "Created")))), tags.tbody(*orows)), class_="table-wrap")
            if orows else tags.p("Nothing sent yet.", class_="muted"),
            class_="card")
        summary = tags.p("Mode ", tags.strong(agent.agent_mode), " · domain ",
                         badge("verified", "good") if agent.domain_verified else badge("not verified", "bad"))
        page = Page(agent.id, [summary, inbox_card, delivery_card, outbound_card,
                               self.settings_form(ctx, agent, values, webhook_error)],
                    status=status, flash=flash)
        return page

    async def agent_get(self, request: Request, ctx: Ctx, address: str) -> Any:
        agent = await self.own_agent(ctx, address)
        done = (request.args.get(b"done") or [b""])[0]
        flash = {b"created": ("ok", "Agent created."), b"saved": ("ok", "Settings saved."),
                 b"redeliver": ("ok", "Redelivery queued.")}.get(done)
        return await self.agent_page(request, ctx, agent, flash=flash)

    async def agent_settings(self, request: Request, ctx: Ctx, address: str) -> Any:
        from e2a.api.agents import check_webhook_url, parse_update

        agent = await self.own_agent(ctx, address)
        f = ctx.form
        body: dict[str, Any] = {
            "name": f.get("name", ""),
            "agent_mode": f.get("agent_mode", agent.agent_mode),
            "webhook_url": f.get("webhook_url", "").strip(),
            "hitl_enabled": _checked(f.get("hitl_enabled")),
            "hitl_expiration_action": f.get("hitl_expiration_action", agent.hitl_expiration_action),
            "hitl_reviewers": _split_addresses(f.get("hitl_reviewers", "")),
        }
        try:
            body["hitl_ttl_seconds"] = int(f.get("hitl_ttl_seconds", "").strip())
        except ValueError:
            return await self.agent_page(request, ctx, agent, flash=_err("The review window must be a number."),
                                         status=400, values=f)
        try:
            update = parse_update(body)
            if update.webhook_url:
                try:
                    await check_webhook_url(self.deps, update.webhook_url)
                except BadRequest as err:
                    return await self.agent_page(request, ctx, agent, flash=_err("Settings not saved."),
                                                 status=400, values=f, webhook_error=err.message)
            saved = await agent_store.update_agent(self.db, ctx.user_id, agent.id.lower(), update)
        except BadRequest as err:
            return await self.agent_page(request, ctx, agent, flash=_err(f"Settings not saved: {err.message}"),
                                         status=400, values=f)
        if saved is None:
            raise NotFound("agent not found")
        return Redirect(f"{self.agent_url(saved)}?done=saved")

    async def message_get(self, request: Request, ctx: Ctx, address: str, message_id: str) -> Any:
        agent = await self.own_agent(ctx, address)
        record = await self.own_message(agent, message_id)
        headers, body_text, html_part = _message_parts(record.raw_message)
        rows = [tags.tr(tags.th(name, scope="row"), tags.td(bidi(clip(value, 2000)))) for name, value in headers]
        parts: list[Any] = [
            tags.section(tags.h2("Verdict"), tags.p(*render.verdict_badges(record.auth_headers)),
                         tags.div(tags.table(*[tags.tr(tags.th(k, scope="row"), tags.td(clip(v, 500)))
                                              for k, v in sorted(record.auth_headers.items())]),
                                  class_="table-wrap"), class_="card"),
            tags.section(tags.h2("Headers"), tags.div(tags.table(*rows), class_="table-wrap"), class_="card"),
            tags.section(
                tags.h2("Text"),
                tags.pre(body_text) if body_text else tags.p("No text part.", class_="muted"),
                tags.p("This message has an HTML part; it is shown as source text, never rendered.",
                       class_="muted") if html_part else "",
                tags.pre(html_part) if html_part and not body_text else "",
                tags.p(tags.a("Download the raw message (.eml)",
                              href=f"{self.agent_url(agent)}/messages/{record.id}/raw", class_="button")),
                class_="card"),
        ]
        return Page(record.subject or "(no subject)", parts)

    async def own_message(self, agent: Any, message_id: str) -> Any:
        if not ids.MESSAGE_ID_RE.fullmatch(message_id):
            raise NotFound("message not found")
        record = await messages.read_inbound(self.db, agent.id, message_id, mark_read=False)
        if record is None:
            raise NotFound("message not found")
        return record

    async def message_raw(self, request: Request, ctx: Ctx, address: str, message_id: str) -> Any:
        agent = await self.own_agent(ctx, address)
        record = await self.own_message(agent, message_id)
        # application/octet-stream: a browser must not render it (it may hold attacker HTML).
        return Download(record.raw_message, b"application/octet-stream", f"{record.id}.eml")

    async def redeliver(self, request: Request, ctx: Ctx, address: str, message_id: str) -> Any:
        agent = await self.own_agent(ctx, address)
        if not ids.MESSAGE_ID_RE.fullmatch(message_id):
            raise NotFound("message not found")
        try:
            await deliveries.redeliver(self.db, agent.id, message_id)
        except E2AError as err:
            if err.status == 404:
                raise
            return await self.agent_page(request, ctx, agent, flash=_err(f"Not redelivered: {err.message}"),
                                         status=err.status)
        return Redirect(f"{self.agent_url(agent)}?done=redeliver")

    # ---- approvals ------------------------------------------------------------------------

    async def approvals_get(self, request: Request, ctx: Ctx, flash: tuple[str, str] | None = None,
                            status: int = 200) -> Any:
        done = (request.args.get(b"done") or [b""])[0]
        flash = flash or {b"approved": ("ok", "Approved: the message was released for delivery."),
                          b"rejected": ("ok", "Rejected: the message will not be sent.")}.get(done)
        now = self.now()
        held = await console_store.held_queue(self.db, ctx.user_id)
        rows = [tags.tr(
            tags.td(tags.a(bidi(h.subject or "(no subject)", 120), href=f"{self.base}/approvals/{h.id}")),
            tags.td(bidi(h.agent_id)),
            tags.td(clip(", ".join(h.to), 120)),
            tags.td(render.time_left(h.approval_expires_at, now)),
        ) for h in held]
        body = tags.div(tags.table(tags.thead(tags.tr(*(tags.th(x, scope="col") for x in (
            "Subject", "Agent", "To", "Time left")))), tags.tbody(*rows)), class_="table-wrap") if rows \
            else tags.p("Nothing is waiting for review.", class_="muted")
        return Page("Approvals", [tags.section(body, class_="card")], nav="approvals", flash=flash, status=status)

    async def held_detail(self, request: Request, ctx: Ctx, message_id: str, *,
                          flash: tuple[str, str] | None = None, status: int = 200,
                          values: dict[str, str] | None = None) -> Any:
        from e2a.store import approvals

        if not ids.MESSAGE_ID_RE.fullmatch(message_id):
            raise NotFound("message not found")
        held = await approvals.get_held(self.db, message_id)
        if held is None or held.user_id != ctx.user_id:
            raise NotFound("message not found")
        if not held.is_pending:
            return await self.approvals_get(request, ctx, _err(
                f"This message is no longer waiting for approval (status {held.status})."), 409)
        v = values or {}
        path = f"/approvals/{held.id}"
        edit = self.post_form(
            ctx, f"{path}/approve",
            tags.label("Subject", for_="subject"),
            tags.input(type="text", name="subject", id="subject", value=v.get("subject", held.subject)),
            tags.label("To (comma or line separated)", for_="to"),
            tags.textarea(v.get("to", ", ".join(held.to)), name="to", id="to", rows="2"),
            tags.label("Cc", for_="cc"),
            tags.textarea(v.get("cc", ", ".join(held.cc)), name="cc", id="cc", rows="1"),
            tags.label("Bcc", for_="bcc"),
            tags.textarea(v.get("bcc", ", ".join(held.bcc)), name="bcc", id="bcc", rows="1"),
            tags.label("Text body", for_="body_text"),
            tags.textarea(v.get("body_text", held.body_text or ""), name="body_text", id="body_text", rows="10"),
            tags.label("HTML body (source; never rendered here)", for_="body_html"),
            tags.textarea(v.get("body_html", held.body_html or ""), name="body_html", id="body_html", rows="6"),
            tags.button("Approve and send", type="submit"),
        )
        reject = self.post_form(
            ctx, f"{path}/reject",
            tags.label("Reason (optional)", for_="reason"),
            tags.input(type="text", name="reason", id="reason", maxlength="1000"),
            tags.button("Reject", type="submit", class_="danger"),
        )
        info = tags.p("Agent ", bidi(held.agent_id), " · ", render.time_left(held.approval_expires_at, self.now()),
                      " · attachments: ", str(len(held.attachments)))
        return Page("Review: " + clip(held.subject or "(no subject)", 150),
                    [info, tags.section(tags.h2("Edit and approve"), edit, class_="card"),
                     tags.section(tags.h2("Reject"), reject, class_="card")],
                    nav="approvals", flash=flash, status=status)

    async def held_get(self, request: Request, ctx: Ctx, message_id: str) -> Any:
        return await self.held_detail(request, ctx, message_id)

    async def held_approve(self, request: Request, ctx: Ctx, message_id: str) -> Any:
        from e2a.store import approvals

        if ids.MESSAGE_ID_RE.fullmatch(message_id) is None:
            raise NotFound("message not found")  # never reaches SQL (a NUL there would be a 500)
        f = ctx.form
        held = await approvals.get_held(self.db, message_id)
        edits: dict[str, Any] = {}
        if held is not None and held.user_id == ctx.user_id:
            # Only fields that differ are edits: an untouched form approves the message as held
            # (a held test email cannot be edited, api.md §7.3).
            for name in ("subject", "body_text", "body_html"):
                if name in f and f[name] != (getattr(held, name) or ""):
                    edits[name] = f[name]
            for name in ("to", "cc", "bcc"):
                if name in f and _split_addresses(f[name]) != list(getattr(held, name)):
                    edits[name] = _split_addresses(f[name])
        try:
            await self.review().approve(message_id, user_id=ctx.user_id, edits=edits, via="console")
        except E2AError as err:
            if err.status == 404:
                raise
            if err.status == 409:
                return await self.approvals_get(request, ctx, _err(f"Not approved: {err.message}."), 409)
            return await self.held_detail(request, ctx, message_id, flash=_err(f"Not approved: {err.message}"),
                                          status=err.status, values=f)
        return Redirect(f"{self.base}/approvals?done=approved")

    async def held_reject(self, request: Request, ctx: Ctx, message_id: str) -> Any:
        from e2a.outbound.hitl import MAX_REASON_CHARS

        if ids.MESSAGE_ID_RE.fullmatch(message_id) is None:
            raise NotFound("message not found")  # never reaches SQL (a NUL there would be a 500)
        reason = ctx.form.get("reason", "").strip()
        if len(reason) > MAX_REASON_CHARS or "\x00" in reason:
            return await self.held_detail(request, ctx, message_id, status=400,
                                          flash=_err(f"The reason must be at most {MAX_REASON_CHARS} characters."))
        try:
            await self.review().reject(message_id, user_id=ctx.user_id, reason=reason, via="console")
        except E2AError as err:
            if err.status == 404:
                raise
            if err.status == 409:
                return await self.approvals_get(request, ctx, _err(f"Not rejected: {err.message}."), 409)
            return await self.held_detail(request, ctx, message_id, flash=_err(f"Not rejected: {err.message}"),
                                          status=err.status)
        return Redirect(f"{self.base}/approvals?done=rejected")

    # ---- keys and secrets -----------------------------------------------------------------

    async def keys_page(self, request: Request, ctx: Ctx, shown: Any = None,
                        flash: tuple[str, str] | None = None, status: int = 200) -> Page:
        keys = [k for k in await accounts.list_api_keys(self.db, ctx.user_id) if k.revoked_at is None]
        secrets_ = await accounts.list_signing_secrets(self.db, ctx.user_id)
        agents = await agent_store.list_agents(self.db, ctx.user_id)
        krows = [tags.tr(
            tags.td(bidi(k.name or "-", 80)), tags.td(tags.code(k.key_prefix + "…")),
            tags.td(k.scope + (f" ({k.agent_id})" if k.agent_id else "")),
            tags.td(k.created_at.strftime("%Y-%m-%d")),
            tags.td(self.post_form(ctx, f"/keys/{k.id}/revoke", tags.button(
                "Revoke", type="submit", class_="danger", **{"aria-label": f"Revoke key {k.key_prefix}"}),
                class_="inline")),
        ) for k in keys]
        srows = [tags.tr(
            tags.td(bidi(s.name, 80)), tags.td(tags.code(s.secret_prefix + "…")),
            tags.td(s.created_at.strftime("%Y-%m-%d")),
            tags.td(self.post_form(ctx, f"/secrets/{s.id}/revoke", tags.button(
                "Revoke", type="submit", class_="danger", **{"aria-label": f"Revoke secret {s.name}"}),
                class_="inline")),
        ) for s in secrets_]
        body: list[Any] = []
        if shown is not None:
            what, value = shown
            body.append(tags.section(
                tags.h2(f"Your new {what}"),
                tags.p("Copy it now: it is shown only this once and cannot be recovered."),
                tags.p(value, class_="secret", id="new-value"),
                tags.button("Copy", type="button", hidden="hidden", **{"data-copy": "new-value"}),
                class_="card"))
        body.append(tags.section(
            tags.h2("API keys"),
            tags.div(tags.table(tags.thead(tags.tr(*(tags.th(h, scope="col") for h in (
                "Name", "Prefix", "Scope", "Created", "")))), tags.tbody(*krows)), class_="table-wrap"),
            self.post_form(
                ctx, "/keys",
                tags.label("New key name", for_="key_name"),
                tags.input(type="text", name="name", id="key_name", maxlength="100"),
                tags.label("Scope", for_="agent"),
                self.select("agent", [("", "user (everything)")] + [(a.id, f"agent {a.id}") for a in agents], ""),
                tags.button("Create key", type="submit")),
            class_="card"))
        body.append(tags.section(
            tags.h2("Webhook signing secrets"),
            tags.div(tags.table(tags.thead(tags.tr(*(tags.th(h, scope="col") for h in (
                "Name", "Prefix", "Created", "")))), tags.tbody(*srows)), class_="table-wrap")
            if srows else tags.p("No signing secret.", class_="muted"),
            self.post_form(
                ctx, "/secrets",
                tags.label("New secret name", for_="secret_name"),
                tags.input(type="text", name="name", id="secret_name", maxlength="100"),
                tags.button("Create secret", type="submit")),
            class_="card"))
        return Page("Keys & secrets", body, nav="keys", flash=flash, status=status)

    async def keys_get(self, request: Request, ctx: Ctx) -> Any:
        done = (request.args.get(b"done") or [b""])[0]
        flash = {b"key": ("ok", "Key revoked."), b"secret": ("ok", "Secret revoked.")}.get(done)
        return await self.keys_page(request, ctx, flash=flash)

    async def key_create(self, request: Request, ctx: Ctx) -> Any:
        from e2a.api.account import key_agent, key_name

        try:
            body = {"name": ctx.form.get("name", ""), "agent": ctx.form.get("agent", "")}
            _key, plaintext = await accounts.create_api_key(self.db, ctx.user_id, key_name(body), key_agent(body))
        except E2AError as err:
            if err.status >= 500:
                raise
            return await self.keys_page(request, ctx, flash=_err(f"Key not created: {err.message}"),
                                        status=err.status)
        return await self.keys_page(request, ctx, shown=("API key", plaintext), flash=("ok", "Key created."))

    async def key_revoke(self, request: Request, ctx: Ctx, key_id: str) -> Any:
        if not ids.KEY_ID_RE.fullmatch(key_id):
            raise NotFound("key not found")
        await accounts.revoke_api_key(self.db, ctx.user_id, key_id)
        return Redirect(f"{self.base}/keys?done=key")

    async def secret_create(self, request: Request, ctx: Ctx) -> Any:
        from e2a.api.account import secret_name

        try:
            name = secret_name({"name": ctx.form.get("name", "")})
            _meta, plaintext = await accounts.create_signing_secret(self.db, self.deps.master_key, ctx.user_id, name)
        except E2AError as err:
            if err.status >= 500:
                raise
            return await self.keys_page(request, ctx, flash=_err(f"Secret not created: {err.message}"),
                                        status=err.status)
        return await self.keys_page(request, ctx, shown=("signing secret", plaintext),
                                    flash=("ok", "Secret created."))

    async def secret_revoke(self, request: Request, ctx: Ctx, secret_id: str) -> Any:
        if not ids.SECRET_ID_RE.fullmatch(secret_id):
            raise NotFound("secret not found")
        try:
            await accounts.delete_signing_secret(self.db, ctx.user_id, secret_id)
        except E2AError as err:
            if err.status == 404:
                raise
            return await self.keys_page(request, ctx, flash=_err(f"Secret not revoked: {err.message}"),
                                        status=err.status)
        return Redirect(f"{self.base}/keys?done=secret")

    # ---- domains --------------------------------------------------------------------------

    async def domains_page(self, request: Request, ctx: Ctx, flash: tuple[str, str] | None = None,
                           status: int = 200) -> Page:
        found = await domain_store.list_domains(self.db, ctx.user_id)
        cards: list[Any] = []
        from e2a.admin import custom_domain_records  # the records e2a-admin check-config --domain prints

        for i, d in enumerate(found):
            rows = []
            for j, rec in enumerate(custom_domain_records(self.config, d)):
                vid = f"rec-{i}-{j}"
                value = f"{rec['priority']} {rec['value']}" if rec["type"] == "MX" else rec["value"]
                rows.append(tags.tr(tags.td(rec["name"]), tags.td(rec["type"]),
                                    tags.td(tags.code(value, id=vid),
                                            tags.br(), tags.span(rec["note"], class_="muted") if rec.get("note") else ""),
                                    tags.td(tags.button("Copy", type="button", hidden="hidden",
                                                        **{"data-copy": vid,
                                                           "aria-label": f"Copy {rec['type']} {rec['name']}"}))))
            state = badge("verified", "good") if d.verified else badge("not verified", "bad")
            actions = [self.post_form(ctx, f"/domains/{d.domain}/delete",
                                      tags.button("Delete", type="submit", class_="danger"), class_="inline")]
            if not d.verified:
                actions.insert(0, self.post_form(ctx, f"/domains/{d.domain}/verify",
                                                 tags.button("Verify now", type="submit"), class_="inline"))
            cards.append(tags.section(
                tags.h2(d.domain, " ", state),
                tags.div(tags.table(tags.thead(tags.tr(*(tags.th(h, scope="col") for h in (
                    "Name", "Type", "Value", "")))), tags.tbody(*rows)), class_="table-wrap"),
                *actions, class_="card"))
        add = tags.section(tags.h2("Add a domain"), self.post_form(
            ctx, "/domains",
            tags.label("Domain", for_="domain"),
            tags.input(type="text", name="domain", id="domain", required="required"),
            tags.button("Add domain", type="submit")), class_="card")
        return Page("Domains", [*cards, add] if cards else [tags.p("No custom domains.", class_="muted"), add],
                    nav="domains", flash=flash, status=status)

    async def domains_get(self, request: Request, ctx: Ctx) -> Any:
        done = (request.args.get(b"done") or [b""])[0]
        flash = {b"added": ("ok", "Domain added: publish the records below."),
                 b"verified": ("ok", "Domain verified."), b"deleted": ("ok", "Domain deleted.")}.get(done)
        return await self.domains_page(request, ctx, flash)

    async def domain_add(self, request: Request, ctx: Ctx) -> Any:
        from e2a.api.domains import add_user_domain

        try:
            await add_user_domain(self.deps, ctx.user_id, ctx.form.get("domain", ""))
        except E2AError as err:
            if err.status >= 500:
                raise
            return await self.domains_page(request, ctx, _err(f"Domain not added: {err.message}"), err.status)
        return Redirect(f"{self.base}/domains?done=added")

    async def domain_verify(self, request: Request, ctx: Ctx, domain: str) -> Any:
        from e2a.api.domains import verify_user_domain

        try:
            await verify_user_domain(self.deps, ctx.user_id, domain)
        except E2AError as err:
            if err.status == 404 or err.status >= 500:
                raise
            return await self.domains_page(request, ctx, _err(f"Not verified: {err.message}"), err.status)
        return Redirect(f"{self.base}/domains?done=verified")

    async def domain_delete(self, request: Request, ctx: Ctx, domain: str) -> Any:
        name = wire.path_domain(domain)
        if name is None:
            raise NotFound("domain not found")
        try:
            await domain_store.delete_domain(self.db, ctx.user_id, name)
        except E2AError as err:
            if err.status == 404:
                raise
            return await self.domains_page(request, ctx, _err(f"Not deleted: {err.message}"), err.status)
        return Redirect(f"{self.base}/domains?done=deleted")

    # ---- account --------------------------------------------------------------------------

    async def account_get(self, request: Request, ctx: Ctx, flash: tuple[str, str] | None = None,
                          status: int = 200) -> Any:
        assert ctx.session is not None
        export = tags.section(tags.h2("Export"), tags.p("Everything stored for your account, as JSON."),
                              tags.a("Download export", href=f"{self.base}/account/export", class_="button"),
                              class_="card")
        delete = tags.section(
            tags.h2("Delete the account"),
            tags.p("This deletes every agent, message, key, secret and domain of ", tags.strong(ctx.session.email),
                   " and signs out every browser. It cannot be undone."),
            self.post_form(ctx, "/account/delete",
                           tags.label("Type DELETE to confirm", for_="confirm"),
                           tags.input(type="text", name="confirm", id="confirm", autocomplete="off"),
                           tags.button("Delete my account", type="submit", class_="danger")),
            class_="card")
        return Page("Account", [export, delete], nav="account", flash=flash, status=status)

    async def account_export(self, request: Request, ctx: Ctx) -> Any:
        doc = await accounts.export_user(self.db, ctx.user_id)
        if doc is None:
            raise NotFound("user not found")
        reactor = self.deps.clock
        payload = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), encode_json, doc)
        return Download(payload, b"application/json", f"e2a-export-{ctx.user_id}.json")

    async def account_delete(self, request: Request, ctx: Ctx) -> Any:
        if ctx.form.get("confirm", "") != "DELETE":
            return await self.account_get(request, ctx, _err("Type DELETE (in capitals) to delete the account."),
                                          400)
        await accounts.delete_user(self.db, ctx.user_id)  # its sessions go with it (ON DELETE CASCADE)
        self.set_cookie(request, COOKIE, "", 0)
        return Redirect(f"{self.base}/signin")

    async def not_found(self, request: Request, ctx: Ctx, rest: str = "") -> Any:
        raise NotFound("no such page")


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
    r(router, "/console/login", ["GET"], c.link_get, auth=False)
    r(router, "/console/login", ["POST"], c.link_post, auth=False, pre_csrf=True)
    r(router, "/console/signout", ["POST"], c.signout)
    r(router, "/console/", ["GET"], c.overview_get)
    r(router, "/console/agents", ["POST"], c.agent_create)
    r(router, "/console/agents/<address>", ["GET"], c.agent_get)
    r(router, "/console/agents/<address>/settings", ["POST"], c.agent_settings)
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


def login_link_url(public_url: str, token: str) -> str:
    """The sign-in link ``e2a-admin login-link`` prints (``http.public_url`` + path)."""
    return f"{public_url.rstrip('/')}/console/login?{urlencode({'t': token})}"
