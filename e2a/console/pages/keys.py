"""API keys and webhook signing secrets.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from e2a import ids
from e2a.console.pages.common import (
    Ctx,
    Redirect,
    _err,
)
from e2a.console.render import Page, bidi, tags
from e2a.errors import E2AError, NotFound
from e2a.store import accounts
from e2a.store import agents as agent_store


class KeyPages:
    """Console pages: keys and secrets."""

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
