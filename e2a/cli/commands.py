"""The ``e2a`` commands that are one API call or a few: login, config, agents, inbox, read, reply,
send, pending/approve/reject, domains, keys, secrets, deliveries, redeliver.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import os
import sys
from typing import Any

from e2a.cli import config as cfg
from e2a.cli.common import (
    Ctx,
    UsageError,
    confirm,
    load_attachments,
    output,
    read_body,
    read_text,
    say,
    split_addresses,
    table,
)
from e2a.v1.api import fetch_info
from e2a.v1.client import E2AClient
from e2a.v1.models import InboundEmail


def cmd_login(ctx: Ctx, args: argparse.Namespace) -> int:
    url = (args.url or ctx.settings.url).rstrip("/")
    key = (args.key or os.environ.get("E2A_API_KEY") or "").strip()
    if not key:
        if sys.stdin.isatty():
            key = getpass.getpass("API key (input hidden): ").strip()
        else:
            key = sys.stdin.readline().strip()
    if not key:
        raise UsageError("missing_field", "no API key given")
    info = fetch_info(url)
    with E2AClient(key, url) as client:
        agents = client.api.list_agents().get("agents", [])
    saved = cfg.load()
    saved.update(url=url, api_key=key, shared_domain=info.get("shared_domain", ""))
    known = {a["email"].lower() for a in agents}
    if saved.get("agent_email") and saved["agent_email"].lower() not in known:
        saved.pop("agent_email")
    if not saved.get("agent_email") and len(agents) == 1:
        saved["agent_email"] = agents[0]["email"]
    path = cfg.save(saved)
    result = {
        "url": url, "key_prefix": key[:12], "shared_domain": saved["shared_domain"],
        "agent_email": saved.get("agent_email"), "agents": [a["email"] for a in agents], "config": str(path),
    }

    def human(r: dict[str, Any]) -> None:
        say(f"logged in to {url} with key {cfg.mask_key(key)} ({len(agents)} agent(s))")
        if r["agent_email"]:
            say(f"default agent: {r['agent_email']}")
        elif not agents:
            say("next: e2a agents register <slug> --mode local")
        say(f"saved to {path} (mode 0600)")

    output(args, result, human)
    return 0


def shown_config(saved: dict[str, Any]) -> dict[str, Any]:
    out = {k: saved.get(k) for k in cfg.KEYS if saved.get(k) is not None}
    if "api_key" in out:
        out["api_key"] = cfg.mask_key(out["api_key"])
    return out


def cmd_config(ctx: Ctx, args: argparse.Namespace) -> int:
    saved = cfg.load()
    if args.action in (None, "show"):
        output(args, shown_config(saved), lambda d: [say(f"{k} = {v}") for k, v in d.items()] or None)
        return 0
    if not args.name or args.name not in cfg.KEYS:
        raise UsageError("invalid_field", f"config key must be one of {', '.join(cfg.KEYS)}")
    if args.action == "get":
        value = shown_config(saved).get(args.name)
        output(args, {args.name: value}, lambda d: say("" if value is None else str(value)))
        return 0
    if args.value is None:
        raise UsageError("missing_field", "config set needs a value")
    saved[args.name] = args.value.rstrip("/") if args.name == "url" else args.value
    cfg.save(saved)
    output(args, shown_config(saved), lambda d: say(f"{args.name} saved"))
    return 0


# ---------------------------------------------------------------------------- agents


def agent_rows(agents: list[dict[str, Any]], default: str | None) -> list[list[str]]:
    rows = []
    for a in agents:
        mark = "*" if default and a["email"].lower() == default.lower() else ""
        hitl = "on" if a.get("hitl_enabled") else "off"
        rows.append([mark, a["email"], a.get("agent_mode", ""), a.get("webhook_url") or "-", hitl])
    return rows


def show_agent(a: dict[str, Any]) -> None:
    for key in ("email", "name", "agent_mode", "webhook_url", "webhook_status", "domain_verified", "hitl_enabled",
                "hitl_ttl_seconds", "hitl_expiration_action", "created_at"):
        if key in a:
            say(f"{key:24} {a[key]}")


def cmd_agents(ctx: Ctx, args: argparse.Namespace) -> int:
    action = args.action
    with ctx.client() as client:
        api = client.api
        if action == "list":
            data = api.list_agents()
            output(args, data, lambda d: table(agent_rows(d["agents"], ctx.settings.agent_email),
                                               ["", "AGENT", "MODE", "WEBHOOK", "HITL"]))
        elif action == "get":
            output(args, api.get_agent(args.email or ctx.agent()), show_agent)
        elif action == "register":
            target = args.target
            kwargs: dict[str, Any] = {"name": args.name, "webhook_url": args.webhook, "agent_mode": args.mode}
            if "@" in target:
                kwargs["email"] = target
            else:
                kwargs["slug"] = target
            data = api.register_agent(**kwargs)
            saved = cfg.load()
            made_default = False
            if not saved.get("agent_email") and not os.environ.get("E2A_AGENT_EMAIL"):
                saved["agent_email"] = data["email"]
                cfg.save(saved)
                made_default = True

            def human(d: dict[str, Any]) -> None:
                say(f"registered {d['email']}" + (" (now the default agent)" if made_default else ""))
                if (args.mode or "cloud") == "local":
                    say("next: e2a listen")

            output(args, data, human)
        elif action == "update":
            fields: dict[str, Any] = {}
            if args.webhook is not None:
                fields["webhook_url"] = args.webhook
            if args.mode is not None:
                fields["agent_mode"] = args.mode
            if args.hitl is not None:
                fields["hitl_enabled"] = args.hitl
            if args.hitl_ttl is not None:
                fields["hitl_ttl_seconds"] = args.hitl_ttl
            if args.hitl_expiration is not None:
                fields["hitl_expiration_action"] = args.hitl_expiration
            if args.name is not None:
                fields["name"] = args.name
            if not fields:
                raise UsageError("no_fields", "nothing to update: pass --webhook, --mode, --hitl/--no-hitl, …")
            output(args, api.update_agent(args.email or ctx.agent(), **fields), show_agent)
        elif action == "delete":
            email = args.email or ctx.agent()
            confirm(args, f"delete {email} and all its mail?")
            data = api.delete_agent(email)
            saved = cfg.load()
            if (saved.get("agent_email") or "").lower() == email.lower():
                saved.pop("agent_email")
                cfg.save(saved)
            output(args, data, lambda d: say(f"deleted {email}"))
    return 0


# ---------------------------------------------------------------------------- inbox / read / reply / send


def cmd_inbox(ctx: Ctx, args: argparse.Namespace) -> int:
    status = "read" if args.read else "all" if args.all else "unread"
    with ctx.client() as client:
        data = client.api.list_messages(ctx.agent(), status, args.limit, args.token)

    def human(d: dict[str, Any]) -> None:
        rows = [[m["message_id"], m.get("created_at", ""), m.get("status", ""), m.get("from", ""),
                 m.get("subject", "")[:60]] for m in d.get("messages", [])]
        table(rows, ["ID", "RECEIVED", "STATUS", "FROM", "SUBJECT"])
        if d.get("next_token"):
            say(f"more: e2a inbox --token {d['next_token']}")

    output(args, data, human)
    return 0


def verdict_line(auth: dict[str, Any]) -> str:
    mark = "✓ verified" if str(auth.get("X-E2A-Auth-Verified")) == "true" else "✗ not verified"
    parts = [mark, f"sender={auth.get('X-E2A-Auth-Sender', '')}", f"entity={auth.get('X-E2A-Auth-Entity-Type', '')}",
             f"checks: {auth.get('X-E2A-Auth-Domain-Check', '')}"]
    if auth.get("X-E2A-Auth-Delegation"):
        parts.append(f"delegation: {auth['X-E2A-Auth-Delegation']}")
    return "  ".join(parts)


def cmd_read(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        data = client.api.get_message(ctx.agent(), args.id)
        if args.raw:
            sys.stdout.buffer.write(base64.b64decode(data.get("raw_message", "")))
            sys.stdout.flush()
            return 0
        parsed = InboundEmail(data, client, trusted=True)

        def human(d: dict[str, Any]) -> None:
            say(f"From:     {d.get('from', '')}")
            say(f"To:       {', '.join(d.get('to') or [])}")
            if d.get("cc"):
                say(f"Cc:       {', '.join(d['cc'])}")
            say(f"Subject:  {parsed.subject}")
            say(f"Date:     {d.get('created_at', '')}")
            if d.get("conversation_id"):
                say(f"Thread:   {d['conversation_id']}")
            say(f"Verdict:  {verdict_line(d.get('auth_headers') or {})}")
            for a in parsed.attachments:
                say(f"Attached: {a.filename} ({a.content_type}, {a.size} bytes)")
            say("")
            say(parsed.text_body.rstrip("\n") if parsed.text_body else "(no text body)")

        output(args, data, human)
    return 0


def send_human(d: dict[str, Any]) -> None:
    if d.get("status") == "pending_approval":
        say(f"held for approval: {d['message_id']} (decide before {d.get('approval_expires_at', '?')})")
    else:
        say(f"{d.get('status', '')}: {d.get('message_id', '')} ({d.get('method', '')}, {d.get('delivery_status', '')})")


def cmd_reply(ctx: Ctx, args: argparse.Namespace) -> int:
    body = read_body(args)
    html = read_text(args.html) if args.html else None
    attachments = load_attachments(args.attach, len((body or "").encode()) + len((html or "").encode()))
    with ctx.client() as client:
        data = client.api.reply_to_message(
            ctx.agent(), args.id, body or "", html_body=html, reply_all=True if args.all else None,
            cc=split_addresses(args.cc), bcc=split_addresses(args.bcc), conversation_id=args.conversation_id,
            attachments=attachments,
        )
    output(args, data, send_human)
    return 0


def cmd_send(ctx: Ctx, args: argparse.Namespace) -> int:
    body = read_body(args)
    html = read_text(args.html) if args.html else None
    attachments = load_attachments(args.attach, len((body or "").encode()) + len((html or "").encode()))
    with ctx.client() as client:
        data = client.api.send_email(
            split_addresses(args.to), args.subject, body or "", from_email=ctx.settings.agent_email,
            html_body=html, cc=split_addresses(args.cc), bcc=split_addresses(args.bcc),
            conversation_id=args.conversation_id, attachments=attachments,
        )
    output(args, data, send_human)
    return 0


# ---------------------------------------------------------------------------- HITL


def cmd_pending(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        data = client.api.list_pending_messages()
    rows = [[m["id"], m.get("agent_id", ""), ", ".join(m.get("to") or []), m.get("subject", "")[:50],
             m.get("approval_expires_at", "")] for m in data.get("messages", [])]
    output(args, data, lambda d: table(rows, ["ID", "AGENT", "TO", "SUBJECT", "EXPIRES"]))
    return 0


def cmd_approve(ctx: Ctx, args: argparse.Namespace) -> int:
    edits: dict[str, Any] = {}
    if args.subject is not None:
        edits["subject"] = args.subject
    if args.body_file:
        edits["body_text"] = read_text(args.body_file)
    if args.html:
        edits["body_html"] = read_text(args.html)
    for name in ("to", "cc", "bcc"):
        if getattr(args, name):
            edits[name] = split_addresses(getattr(args, name))
    with ctx.client() as client:
        data = client.api.approve_message(args.id, **edits)
    output(args, data, send_human)
    return 0


def cmd_reject(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        data = client.api.reject_message(args.id, args.reason or "")
    output(args, data, lambda d: say(f"rejected {d.get('message_id', args.id)}"))
    return 0


# ---------------------------------------------------------------------------- domains, keys, secrets, deliveries


def show_domain(d: dict[str, Any]) -> None:
    say(f"{d['domain']}: {'verified' if d.get('verified') else 'NOT verified'}")
    records = d.get("dns_records") or {}
    if not d.get("verified") or records:
        say("publish these DNS records:")
        mx = records.get("mx") or {}
        txt = records.get("txt") or {}
        dkim = records.get("dkim") or {}
        if mx:
            say(f"  MX   {mx.get('host')}  {mx.get('priority', 10)} {mx.get('value')}")
        if txt:
            say(f"  TXT  {txt.get('host')}  \"{txt.get('value')}\"")
        if dkim:
            say(f"  TXT  {dkim.get('host')}  \"{dkim.get('value')}\"")
    if not d.get("verified"):
        say(f"then: e2a domains verify {d['domain']}")


def cmd_domains(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        api = client.api
        if args.action == "list":
            data = api.list_domains()
            rows = [[d["domain"], "yes" if d.get("verified") else "no", d.get("created_at", "")]
                    for d in data.get("domains", [])]
            output(args, data, lambda _d: table(rows, ["DOMAIN", "VERIFIED", "CREATED"]))
        elif args.action == "add":
            output(args, api.register_domain(args.domain), show_domain)
        elif args.action == "verify":
            output(args, api.verify_domain(args.domain), lambda d: say(f"{args.domain} verified"))
        elif args.action == "delete":
            api.delete_domain(args.domain)
            output(args, {"status": "deleted", "domain": args.domain}, lambda d: say(f"deleted {args.domain}"))
    return 0


def cmd_keys(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        api = client.api
        if args.action == "list":
            data = api.list_api_keys()
            rows = [[k["id"], k.get("key_prefix", "") + "…", k.get("scope", ""), k.get("agent") or "-",
                     k.get("name", ""), k.get("last_used_at", "-")] for k in data.get("keys", [])]
            output(args, data, lambda _d: table(rows, ["ID", "PREFIX", "SCOPE", "AGENT", "NAME", "LAST USED"]))
        elif args.action == "create":
            data = api.create_api_key(args.name, getattr(args, "agent", None))  # --agent: agent-scoped key

            def human(d: dict[str, Any]) -> None:
                say(f"created {d['id']} ({d.get('scope')} scope{', ' + d['agent'] if d.get('agent') else ''})")
                say(f"key (shown once, store it now): {d['key']}")

            output(args, data, human)
        elif args.action == "revoke":
            api.revoke_api_key(args.id)
            output(args, {"status": "revoked", "id": args.id}, lambda d: say(f"revoked {args.id}"))
    return 0


def cmd_secrets(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        api = client.api
        if args.action == "list":
            data = api.list_signing_secrets()
            rows = [[s["id"], s.get("secret_prefix", "") + "…", s.get("name", ""), s.get("created_at", ""),
                     s.get("last_signed_at", "-")] for s in data.get("secrets", [])]
            output(args, data, lambda _d: table(rows, ["ID", "PREFIX", "NAME", "CREATED", "LAST SIGNED"]))
        elif args.action == "create":
            data = api.create_signing_secret(args.name)

            def human(d: dict[str, Any]) -> None:
                say(f"created {d['id']}; it signs from the next delivery on")
                say(f"secret (shown once): {d['secret']}")
                say("keep the old secret in E2A_WEBHOOK_SECRET too until every receiver has the new one")

            output(args, data, human)
        elif args.action == "revoke":
            api.delete_signing_secret(args.id)
            output(args, {"status": "deleted", "id": args.id}, lambda d: say(f"revoked {args.id}"))
    return 0


def cmd_deliveries(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        data = client.api.list_deliveries(ctx.agent(), args.status, args.message, args.limit, args.token)
    rows = [[d["id"], d.get("message_id", ""), d.get("status", ""), str(d.get("attempts", 0)),
             str(d.get("last_status_code", "-")), d.get("last_error", "")[:40]] for d in data.get("deliveries", [])]

    def human(_d: dict[str, Any]) -> None:
        table(rows, ["ID", "MESSAGE", "STATUS", "TRIES", "HTTP", "LAST ERROR"])
        if data.get("next_token"):
            say(f"more: e2a deliveries --token {data['next_token']}")

    output(args, data, human)
    return 0


def cmd_redeliver(ctx: Ctx, args: argparse.Namespace) -> int:
    with ctx.client() as client:
        data = client.api.redeliver(ctx.agent(), args.id)
    output(args, data, lambda d: say(f"queued delivery {d.get('delivery_id')} of {d.get('message_id')}"))
    return 0
