"""Pure rendering of console pages with ``twisted.web.template`` tags.

No string is ever pasted into markup: text and attribute values go through the flattener,
which escapes ``& < > "``. Attacker-controlled text (subjects, senders, names) is wrapped in
``<bdi>`` so a right-to-left override cannot reorder the text around it, and long values are
cut for listings. No inline script or style: the CSP forbids both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from twisted.web.template import Tag, flattenString


class _Tags:
    """``tags.main(…)`` → a new ``<main>`` Tag. twisted.web.template's own ``tags`` only knows
    pre-HTML5 names (no ``main``, ``section``, ``bdi``, ``svg``); Tag itself escapes the same."""

    def __getattr__(self, name: str) -> Tag:
        return Tag(name)


tags = _Tags()

__all__ = [
    "CSP",
    "Page",
    "badge",
    "bidi",
    "chart_svg",
    "clip",
    "flatten",
    "layout",
    "time_left",
    "tags",
    "verdict_badges",
]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

LIST_CHARS = 200

NAV = (("overview", "Overview", ""), ("approvals", "Approvals", "approvals"), ("domains", "Domains", "domains"),
       ("keys", "Keys & secrets", "keys"), ("account", "Account", "account"))


@dataclass
class Page:
    """A console page: ``body`` is a list of tags; ``nav`` the current section."""

    title: str
    body: list[Any]
    status: int = 200
    nav: str = ""
    flash: tuple[str, str] | None = None  # (kind "ok"|"error", text)
    headers: dict[bytes, bytes] = field(default_factory=dict)


async def flatten(tag: Any) -> bytes:
    return await flattenString(None, tag)


def clip(text: str, limit: int = LIST_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def bidi(text: str, limit: int | None = None) -> Tag:
    """Attacker text isolated for bidi (``<bdi>``), optionally cut to ``limit`` characters."""
    return tags.bdi(clip(text, limit) if limit else text, class_="subject")


def badge(text: str, kind: str = "neutral") -> Tag:
    return tags.span(text, class_=f"badge {kind}")


def layout(page: Page, base: str, email: str | None, csrf: str | None) -> Tag:
    """The whole document. ``email``/``csrf`` None: signed out (no navigation)."""
    header: list[Any] = [tags.a("e2a console", href=f"{base}/", class_="brand")]
    if email is not None and csrf is not None:
        links = []
        for key, label, path in NAV:
            link = tags.a(label, href=f"{base}/{path}")
            if key == page.nav:
                link.attributes["aria-current"] = "page"
            links.append(link)
        header.append(tags.nav(*links, **{"aria-label": "Console"}))
        header.append(tags.form(
            tags.input(type="hidden", name="csrf", value=csrf),
            tags.span(email, class_="muted"), " ",
            tags.button("Sign out", type="submit"),
            method="POST", action=f"{base}/signout",
        ))
    main: list[Any] = [tags.h1(page.title)]
    if page.flash is not None:
        kind, text = page.flash
        main.append(tags.p(text, class_=f"flash {kind}", role="status" if kind == "ok" else "alert"))
    main.extend(page.body)
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{page.title} - e2a console"),
            tags.link(rel="stylesheet", href=f"{base}/static/console.css"),
            tags.link(rel="icon", href=f"{base}/static/favicon.svg", type="image/svg+xml"),
            tags.script(src=f"{base}/static/console.js", defer="defer"),
        ),
        tags.body(tags.header(*header, class_="top"), tags.main(*main)),
        lang="en",
    )


async def document(tag: Tag) -> bytes:
    """The page's bytes: doctype + the flattened (escaped) tree."""
    return b"<!DOCTYPE html>\n" + await flatten(tag)


def time_left(deadline: datetime | None, now: datetime) -> str:
    if deadline is None:
        return "no deadline"
    left = deadline - now
    if left <= timedelta(0):
        return "expired"
    seconds = int(left.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h left"
    if hours:
        return f"{hours} h {minutes} min left"
    return f"{max(minutes, 1)} min left" if seconds >= 60 else f"{seconds} s left"


def verdict_badges(auth: dict[str, str]) -> list[Any]:
    """The verdict of an inbound message (mail.md §3): verified or not, the signed sender,
    human/agent, and the ``spf= dkim= dmarc=`` summary — all from its X-E2A-Auth-* values."""
    verified = auth.get("X-E2A-Auth-Verified") == "true"
    out: list[Any] = [badge("verified" if verified else "not verified", "good" if verified else "bad")]
    sender = auth.get("X-E2A-Auth-Sender", "")
    if sender:
        out += [" ", badge(clip(sender, 100), "neutral")]
    entity = auth.get("X-E2A-Auth-Entity-Type", "")
    if entity:
        out += [" ", badge(entity, "neutral")]
    check = auth.get("X-E2A-Auth-Domain-Check", "")
    if check:
        out += [" ", tags.code(clip(check, 120))]
    return out


def chart_svg(days: Sequence[Any], width: int = 560, height: int = 180) -> Tag:
    """Received (blue) and delivered (green) per day as grouped bars, server-rendered SVG with
    presentation attributes only (the CSP forbids inline style). ``days``: DayCount list."""
    svg = Tag("svg")
    top = max([1] + [max(d.received, d.delivered) for d in days])
    pad_l, pad_b, pad_t = 30, 24, 10
    plot_h = height - pad_b - pad_t
    n = max(1, len(days))
    slot = (width - pad_l) / n
    bar = max(2.0, slot * 0.35)
    parts: list[Any] = [
        Tag("title")("Messages received and delivered per day, last 14 days"),
        Tag("line")(x1=str(pad_l), y1=str(pad_t + plot_h), x2=str(width), y2=str(pad_t + plot_h), stroke="#8a93a3"),
        Tag("text")(str(top), x="2", y=str(pad_t + 10), fill="#5a6270", **{"font-size": "11"}),
        Tag("text")("0", x="2", y=str(pad_t + plot_h), fill="#5a6270", **{"font-size": "11"}),
    ]
    for i, d in enumerate(days):
        x = pad_l + i * slot + slot * 0.1
        for j, (value, colour, what) in enumerate(((d.received, "#2b59c3", "received"),
                                                   (d.delivered, "#2e8b57", "delivered"))):
            h = plot_h * value / top
            rect = Tag("rect")(
                Tag("title")(f"{d.day.isoformat()}: {value} {what}"),
                x=f"{x + j * bar:.1f}", y=f"{pad_t + plot_h - h:.1f}", width=f"{bar:.1f}", height=f"{h:.1f}",
                fill=colour,
            )
            parts.append(rect)
        if i % 2 == 0 or n <= 7:
            parts.append(Tag("text")(d.day.strftime("%m-%d"), x=f"{x:.1f}", y=str(height - 6), fill="#5a6270",
                                     **{"font-size": "10"}))
    return svg(*parts, xmlns="http://www.w3.org/2000/svg", viewBox=f"0 0 {width} {height}", role="img",
               **{"aria-label": "Messages received and delivered per day"})
