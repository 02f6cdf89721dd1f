"""The approval queue: held messages, edit, approve, reject.

A mixin of :class:`e2a.console.routes.Console` (``self`` is the console: ``deps``, ``db``,
``base``, ``route`` …)."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from e2a import ids
from e2a.console import render
from e2a.console.pages.common import (
    Ctx,
    Redirect,
    _err,
    _same_recipients,
    _split_addresses,
)
from e2a.console.render import Page, bidi, clip, tags
from e2a.errors import E2AError, NotFound
from e2a.store import console as console_store


class ApprovalPages:
    """Console pages: approvals."""

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
                if name in f and not _same_recipients(f[name], list(getattr(held, name))):
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
