"""Custom domains: add, DNS records to publish, verify, delete.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from e2a.api import wire
from e2a.console.pages.common import (
    Ctx,
    Redirect,
    _err,
)
from e2a.console.render import Page, badge, tags
from e2a.errors import E2AError, NotFound
from e2a.store import domains as domain_store


class DomainPages:
    """Console pages: domains."""

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
