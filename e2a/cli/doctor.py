"""``e2a doctor``: check the configuration, the server and the agent's delivery path, one line each.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from email.utils import parsedate_to_datetime
from typing import Any

from e2a.cli import config as cfg
from e2a.cli.common import (
    Ctx,
    output,
    say,
)
from e2a.v1.api import resolve_api_key, resolve_base_url
from e2a.v1.client import E2AClient
from e2a.v1.errors import E2AApiError


def cmd_doctor(ctx: Ctx, args: argparse.Namespace) -> int:
    import httpx

    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str, fix: str = "") -> bool:
        checks.append({"check": name, "ok": ok, "detail": detail, **({"fix": fix} if not ok and fix else {})})
        return ok

    s = ctx.settings
    agent_row: dict[str, Any] | None = None
    reachable = False
    try:
        resolve_base_url(s.url)  # an unusable URL is a ✗ here, not a traceback
        t0 = time.time()
        resp = httpx.get(s.url + "/api/v1/info", timeout=10)
        t1 = time.time()
        info = resp.json()
        reachable = check("server reachable", resp.status_code == 200,
                          f"{s.url} (version {info.get('version', '?')})", "check `e2a config get url`")
        date = resp.headers.get("Date")
        if date:
            skew = parsedate_to_datetime(date).timestamp() - (t0 + t1) / 2
            check("clock skew", abs(skew) < 30, f"{skew:+.0f} s against the server",
                  "sync this machine's clock (NTP); webhook signatures allow −30…+300 s")
    except (httpx.HTTPError, ValueError) as exc:
        check("server reachable", False, f"{s.url}: {exc or type(exc).__name__}",
              "start the server or fix the URL: e2a config set url URL")
    usable_key = False
    if reachable and not s.api_key:
        check("API key", False, "no key configured", "run `e2a login`")
    elif reachable:
        try:
            usable_key = bool(resolve_api_key(s.api_key))
        except ValueError as exc:
            check("API key", False, str(exc), "run `e2a login` again")
    if usable_key:
        with E2AClient(s.api_key, s.url) as client:
            try:
                agents = client.api.list_agents().get("agents", [])
                try:
                    client.api.list_api_keys()
                    scope = "user-scoped"
                except E2AApiError as exc:
                    scope = "agent-scoped" if exc.code == "insufficient_scope" else f"scope unknown ({exc.code})"
                check("API key", True, f"{cfg.mask_key(s.api_key)} valid, {scope}, {len(agents)} agent(s)")
                if not s.agent_email:
                    check("agent", False, "no default agent",
                          "e2a agents register <slug> --mode local, or e2a config set agent_email EMAIL")
                else:
                    try:
                        agent_row = client.api.get_agent(s.agent_email)
                        check("agent", True, f"{s.agent_email} exists")
                    except E2AApiError as exc:
                        check("agent", False, f"{s.agent_email}: {exc.code}",
                              "e2a agents list, then e2a config set agent_email EMAIL")
            except E2AApiError as exc:
                check("API key", False, f"{exc.code}: {exc.message}", "create a key and run `e2a login` again")
    if agent_row is not None:
        mode = agent_row.get("agent_mode")
        if mode == "cloud":
            status = agent_row.get("webhook_status")
            check("mode", True, f"cloud: mail is POSTed to {agent_row.get('webhook_url')}")
            check("webhook URL accepted", status == "active", f"webhook_status={status}",
                  f"fix the receiver, then e2a agents update {s.agent_email} --webhook URL (re-enables it)")
        else:
            check("mode", True, "local: run `e2a listen` to receive mail")
            check("WebSocket", *_ws_probe(ctx))
    failed = [c for c in checks if not c["ok"]]

    def human(_d: Any) -> None:
        for c in checks:
            say(f"{'✓' if c['ok'] else '✗'} {c['check']}: {c['detail']}")
            if not c["ok"] and c.get("fix"):
                say(f"    fix: {c['fix']}")

    output(args, {"ok": not failed, "checks": checks}, human)
    return 0 if not failed else (3 if not reachable else 1)


def _ws_probe(ctx: Ctx) -> tuple[bool, str, str]:
    from websockets.asyncio.client import connect

    from e2a.v1.client import ws_url

    url = ws_url(ctx.settings.url, ctx.settings.agent_email or "")

    async def probe() -> tuple[bool, str, str]:
        try:
            async with connect(url, additional_headers={"Authorization": f"Bearer {ctx.settings.api_key}"},
                               subprotocols=["e2a.v2"], open_timeout=10):  # type: ignore[list-item]
                return True, "opens", ""
        except Exception as exc:  # noqa: BLE001 - any failure is the diagnosis
            return False, str(exc) or type(exc).__name__, "check a proxy allows WebSocket upgrades on this URL"

    return asyncio.run(probe())
