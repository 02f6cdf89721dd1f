"""The account: export and deletion (and the catch-all 404).

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from typing import Any

from twisted.internet import threads
from twisted.web.server import Request

from e2a.api.export import export_document
from e2a.api.http import encode_json
from e2a.console.pages.common import (
    COOKIE,
    Ctx,
    Download,
    Redirect,
    _err,
)
from e2a.console.render import Page, tags
from e2a.errors import NotFound
from e2a.store import accounts


class AccountPages:
    """Console pages: account."""

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
        snapshot = await accounts.export_user(self.db, ctx.user_id)
        if snapshot is None:
            raise NotFound("user not found")
        doc = export_document(snapshot)
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
