"""The overview page: agents with unread and held counts, webhook health, the chart.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.web.server import Request

from e2a.console import render
from e2a.console.pages.common import (
    Ctx,
    Redirect,
    _err,
)
from e2a.console.render import Page, badge, bidi, clip, tags
from e2a.errors import BadRequest, E2AError
from e2a.store import agents as agent_store
from e2a.store import console as console_store
from e2a.store import ratelimits


class OverviewPages:
    """Console pages: overview."""

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
        flash = {b"agent": ("ok", "Agent created."), b"agent_deleted": ("ok", "Agent deleted.")}.get(done)
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
