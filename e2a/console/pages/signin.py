"""Sign-in: API key, one-time link (printed or mailed), sign-out.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate_key
from e2a.console.pages.common import (
    COOKIE,
    SIGNIN_WINDOW_SECONDS,
    Ctx,
    Redirect,
    _err,
    login_link_url,
)
from e2a.console.render import Page, tags
from e2a.errors import BadRequest, NotFound, RateLimited, Unauthorized
from e2a.store import accounts, ratelimits, sessions

log = Logger()


class SignInPages:
    """Console pages: sign-in."""

    def client_ip(self, request: Request) -> str:
        from e2a.api.agents import request_client_ip

        return request_client_ip(request, self.deps)

    @property
    def mails_links(self) -> bool:
        """Whether the sign-in page offers a mailed link: it needs the public URL the link
        points to and an outbound route (upstream relay or direct MX)."""
        c = self.config
        return bool(c.http.public_url and (c.outbound_smtp.host or c.outbound.direct_mx)
                    and (c.shared_domain or c.smtp.domain))

    def signin_page(self, request: Request, flash: tuple[str, str] | None = None, status: int = 200) -> Page:
        pre = self.pre_token(request)
        form = tags.form(
            tags.input(type="hidden", name="csrf", value=pre),
            tags.label("User-scoped API key", for_="key"),
            tags.input(type="password", name="key", id="key", autocomplete="off", required="required"),
            tags.p("Agent-scoped keys cannot sign in.", class_="muted"),
            tags.button("Sign in", type="submit"),
            method="POST", action=f"{self.base}/signin",
        )
        if self.mails_links:
            link: Any = tags.section(tags.h2("No key at hand?"), tags.form(
                tags.input(type="hidden", name="csrf", value=pre),
                tags.label("Your account's email address", for_="signin_email"),
                tags.input(type="email", name="email", id="signin_email", autocomplete="email",
                           required="required"),
                tags.p("We mail a one-time link to the address if it belongs to an account. It works once, "
                       f"within {int(sessions.LOGIN_LINK_TTL.total_seconds() // 60)} minutes.", class_="muted"),
                tags.button("Mail me a sign-in link", type="submit"),
                method="POST", action=f"{self.base}/signin/mail",
            ), class_="card")
        else:
            link = tags.section(tags.p(
                "No key at hand? Ask the operator for a one-time sign-in link (",
                tags.code("e2a-admin login-link --email …"), ").", class_="muted"), class_="card")
        return Page("Sign in", [tags.section(form, class_="card"), link], status=status, flash=flash)

    async def signin_mail(self, request: Request, ctx: Ctx) -> Any:
        """Mail a one-time link. The answer is the same page whether or not an account uses
        the address (no enumeration), and the lookup and mail happen after answering, so the
        time taken does not tell either. Every request counts in the per-IP sign-in failure
        budget, and in a per-address budget so nobody can flood one mailbox from many IPs."""
        if not self.mails_links:
            raise NotFound("sign-in mail is not offered here")
        limited = await self.signin_limited(request)
        if limited is None:
            return self.signin_page(request, _err("Too many sign-in attempts from your address; try again later."),
                                    429)
        await self.signin_failed(*limited)
        try:
            address = wire.parse_recipient(ctx.form.get("email", ""), "email address")
        except BadRequest as err:
            return self.signin_page(request, _err(err.message), 400)
        if address is None:
            return self.signin_page(request, _err("Type your account's email address."), 400)
        bucket = "console_signin_mail:" + sessions.token_hash(address)[:32]
        limit = self.config.rate_limits.register_per_hour
        try:
            await ratelimits.hit(self.db, bucket, limit, SIGNIN_WINDOW_SECONDS, self.deps.clock.seconds())
        except RateLimited:
            pass  # the same answer: this budget is the mailbox's, not the requester's
        else:
            d = Deferred.fromCoroutine(self.send_signin_mail(address))
            self._mailing.add(d)
            d.addBoth(lambda result: (self._mailing.discard(d), result)[1])
        minutes = int(sessions.LOGIN_LINK_TTL.total_seconds() // 60)
        return Page("Check your mail", [tags.section(tags.p(
            "If an account uses ", tags.strong(address), ", a one-time sign-in link is on its way to it. "
            f"It works once, within {minutes} minutes."), tags.p(
            tags.a("Back to sign-in", href=f"{self.base}/signin")), class_="card")])

    async def send_signin_mail(self, address: str) -> None:
        """Compose, sign and queue the link's mail for the account using ``address``; nothing
        when there is none. Failures are logged: the requester has had their answer."""
        from e2a.console.mail import SENDER_LOCAL_PART, SUBJECT, compose_signin_mail

        try:
            user = await accounts.get_user_by_email(self.db, address)
            if user is None or not user.email:
                return
            config = self.config
            domain = config.shared_domain or config.smtp.domain
            now = self.now()
            token = sessions.new_link_token()
            message_id = ids.new_message_id()
            composed = compose_signin_mail(
                message_id=message_id, domain=domain, recipient=user.email.lower(),
                url=login_link_url(config.http.public_url, token),
                minutes=int(sessions.LOGIN_LINK_TTL.total_seconds() // 60), date=now)
            mail = sessions.SigninMail(message_id, user.id, f"{SENDER_LOCAL_PART}@{domain}", user.email.lower(),
                                       SUBJECT, ids.smtp_message_id(message_id, domain),
                                       await self.dkim_sign(composed, domain, now))
            await sessions.queue_signin_mail(self.db, token, mail, now)
        except Exception:
            log.failure("console sign-in mail not queued")

    async def dkim_sign(self, composed: bytes, domain: str, now: datetime) -> bytes:
        """DKIM-signed with the deployment key of ``domain`` (as reviewer notifications);
        unsigned, with a warning, when no key can be had."""
        from e2a.outbound import dkimsign

        config = self.config

        def thd_sign() -> bytes:
            selector, pem = dkimsign.thd_load_deployment_key(config.data_dir, domain, config.dkim.keys,
                                                              config.dkim.selector)
            return dkimsign.thd_dkim_sign(composed, domain, selector, pem, int(now.timestamp()))

        reactor = self.deps.clock
        try:
            if hasattr(reactor, "getThreadPool"):
                return await threads.deferToThreadPool(reactor, reactor.getThreadPool(), thd_sign)
            return await threads.deferToThread(thd_sign)
        except Exception as exc:
            log.warn("no DKIM key for {domain} ({why}): console sign-in mail sent unsigned", domain=domain,
                     why=str(exc))
            return composed

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
