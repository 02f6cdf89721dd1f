"""An agent's page: settings, deletion, inbox, one message, raw download, redeliver.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.console import render
from e2a.console.pages.common import (
    Ctx,
    Download,
    Redirect,
    _checked,
    _err,
    _message_parts,
    _split_addresses,
)
from e2a.console.render import Page, badge, bidi, clip, tags
from e2a.errors import BadRequest, E2AError, NotFound
from e2a.store import agents as agent_store
from e2a.store import console as console_store
from e2a.store import deliveries, messages


class AgentPages:
    """Console pages: agent page."""

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
                               self.settings_form(ctx, agent, values, webhook_error), self.delete_form(ctx, agent)],
                    status=status, flash=flash)
        return page

    def delete_form(self, ctx: Ctx, agent: Any) -> Any:
        return tags.section(
            tags.h2("Delete this agent"),
            tags.p("This deletes ", bidi(agent.id), " with all its mail (inbound, sent and held), its webhook "
                   "deliveries and queued outbound mail, and revokes its agent-scoped keys. It cannot be undone."),
            self.post_form(
                ctx, f"/agents/{quote(agent.id, safe='@')}/delete",
                tags.label("Type the agent's address to confirm", for_="confirm_address"),
                tags.input(type="text", name="confirm", id="confirm_address", autocomplete="off",
                           required="required"),
                tags.p(tags.button("Delete agent", type="submit", class_="danger"))),
            class_="card")

    async def agent_delete(self, request: Request, ctx: Ctx, address: str) -> Any:
        agent = await self.own_agent(ctx, address)
        if ctx.form.get("confirm", "").strip().lower() != agent.id.lower():
            return await self.agent_page(request, ctx, agent, status=400, flash=_err(
                "Not deleted: type the agent's address exactly to confirm."))
        # the store function of DELETE /api/v1/agents/{email}: same cascade, same key revocation
        if await agent_store.delete_agent(self.db, ctx.user_id, wire.path_agent_key(address)) is None:
            raise NotFound("agent not found")
        return Redirect(f"{self.base}/?done=agent_deleted")

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
