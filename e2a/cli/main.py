"""The ``e2a`` command: the agent developer's day-to-day tool over the SDK.

Exit codes: 0 success, 1 the API answered with an error, 2 bad usage or bad input
(before anything was sent), 3 the server could not be reached. Errors are one line,
``error: <code>: <message>`` on stderr; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import mimetypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, NoReturn

from e2a.cli import config as cfg
from e2a.v1.api import fetch_info, resolve_api_key, resolve_base_url
from e2a.v1.client import AsyncE2AClient, E2AClient
from e2a.v1.errors import E2AApiError, E2AConnectionError
from e2a.v1.models import Attachment, InboundEmail

MAX_REQUEST = 25 * 1024 * 1024  # api.md §0.6: send/reply/approve bodies are capped at 25 MiB
REQUEST_SLACK = 64 * 1024  # room for the JSON around the attachments


class UsageError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: usage: {message}", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------- output helpers


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(rows: list[list[str]], headers: list[str]) -> None:
    if not rows:
        say("(none)")
        return
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def output(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    if args.json:
        emit_json(data)
    else:
        human(data)


# ---------------------------------------------------------------------------- context


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = cfg.Settings.resolve(getattr(args, "agent", None))

    def key(self) -> str:
        if not self.settings.api_key:
            raise UsageError("not_logged_in", "no API key: run `e2a login` or set E2A_API_KEY")
        return self.settings.api_key

    def client(self) -> E2AClient:
        return E2AClient(self.key(), self.settings.url, self.settings.agent_email)

    def async_client(self) -> AsyncE2AClient:
        return AsyncE2AClient(self.key(), self.settings.url, self.settings.agent_email)

    def agent(self) -> str:
        if not self.settings.agent_email:
            raise UsageError(
                "no_agent", "no agent selected: pass --agent EMAIL, set E2A_AGENT_EMAIL or `e2a config set agent_email EMAIL`"
            )
        return self.settings.agent_email


# ---------------------------------------------------------------------------- input helpers


def read_body(args: argparse.Namespace, required: bool = True) -> str | None:
    if getattr(args, "body", None) is not None:
        return args.body
    if getattr(args, "body_file", None):
        return read_text(args.body_file)
    if not sys.stdin.isatty():
        return sys.stdin.read()
    if required:
        raise UsageError("missing_field", "no body: pass --body TEXT, --body-file FILE or pipe it on stdin")
    return None


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("invalid_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def load_attachments(paths: Iterable[str] | None, extra: int = 0) -> list[Attachment] | None:
    """Read the files, refusing anything the server would refuse, before a byte is uploaded."""
    paths = list(paths or [])
    if not paths:
        return None
    sizes = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError("invalid_attachment", f"cannot read {path}: {exc.strerror}") from None
        if not os.path.isfile(path):
            raise UsageError("invalid_attachment", f"cannot read {path}: not a regular file")
        sizes.append(st.st_size)
    encoded = sum(4 * ((n + 2) // 3) for n in sizes) + extra + REQUEST_SLACK
    if encoded > MAX_REQUEST:
        biggest = max(range(len(paths)), key=lambda i: sizes[i])
        limit_raw = (MAX_REQUEST - REQUEST_SLACK - extra) * 3 // 4
        raise UsageError(
            "attachment_too_large",
            f"{paths[biggest]} is {sizes[biggest] / 1e6:.1f} MB; a message is limited to 25 MiB after base64"
            f" encoding, i.e. about {limit_raw / 1048576:.1f} MiB of attachments in total",
        )
    out = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError("invalid_attachment", f"cannot read {path}: {exc.strerror}") from None
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        out.append(Attachment(os.path.basename(path), ctype, data))
    return out


def split_addresses(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [a.strip() for v in values for a in v.split(",") if a.strip()]


def confirm(args: argparse.Namespace, question: str) -> None:
    if getattr(args, "yes", False):
        return
    if not sys.stdin.isatty():
        raise UsageError("confirmation_required", f"{question} — pass --yes to confirm")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("cancelled", "nothing was changed")


# ---------------------------------------------------------------------------- login / config


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


# ---------------------------------------------------------------------------- listen


def listen_line(detail: dict[str, Any]) -> str:
    auth = detail.get("auth_headers") or {}
    mark = "✓" if str(auth.get("X-E2A-Auth-Verified")) == "true" else "✗"
    stamp = detail.get("created_at", "")
    return f"{stamp}  {mark}  {detail.get('from', '')}  {detail.get('subject', '')}  [{detail.get('message_id')}]"


async def fetch_detail(client: AsyncE2AClient, agent: str, message_id: str) -> dict[str, Any] | None:
    """The full message without marking it read; transient failures are retried, a vanished
    message (404) is skipped."""
    from e2a.cli.forward import retry_delay

    attempt = 0
    while True:
        try:
            return await client.api.get_message(agent, message_id, mark_read=False)
        except E2AApiError as exc:
            if exc.status_code == 404:
                progress(f"{message_id}: gone ({exc.code}), skipped")
                return None
            if exc.status_code not in (429, 503) and exc.status_code < 500:
                raise
            delay = max(retry_delay(attempt), exc.retry_after or 0)
            failure = exc.code
        except E2AConnectionError as exc:
            delay, failure = retry_delay(attempt), exc.reason
        attempt += 1
        progress(f"{message_id}: fetch failed ({failure}); retry {attempt} in {delay:.1f} s")
        await asyncio.sleep(delay)


async def listen_async(ctx: Ctx, args: argparse.Namespace) -> int:
    from e2a.cli.forward import DEFAULT_MODEL, Forwarder, PermanentFailure

    agent = ctx.agent()
    client = ctx.async_client()
    forwarder = None
    if args.forward:
        model = args.model or os.environ.get("E2A_FORWARD_MODEL") or DEFAULT_MODEL
        forwarder = Forwarder(client, args.forward, args.forward_token, model)

    def on_state(event: str, detail: str) -> None:
        if event == "connected":
            progress(f"listening for {agent} (Ctrl-C to stop)")
        else:
            progress(f"connection lost: {detail}")

    progress(f"connecting to {ctx.settings.url} …")
    try:
        # Fail fast on what retrying cannot fix (server down at start, bad key, unknown agent);
        # once listening, connection losses are retried for as long as the listener runs.
        await client.api.get_agent(agent)
        async for note in client.listen(agent, auto_ack=False, on_state=on_state):
            detail = await fetch_detail(client, agent, note.message_id)
            if detail is None:
                continue
            if forwarder is not None:
                try:
                    outcome = await forwarder.deliver(detail, agent)
                except PermanentFailure as exc:
                    progress(f"{note.message_id}: not forwarded, left unread: {exc}")
                    continue
                progress(f"{note.message_id}: {outcome}")
                if args.json:
                    emit_json(detail)
            elif args.json:
                emit_json(detail)
            else:
                say(listen_line(detail))
            if not await client.ack(note.message_id):
                # the connection dropped while we handled it: mark it read over REST instead,
                # so the reconnect does not hand the same message over twice
                try:
                    await client.api.get_message(agent, note.message_id)
                except (E2AApiError, E2AConnectionError) as exc:
                    progress(f"{note.message_id}: could not mark read ({exc}); it will come again")
    finally:
        if forwarder is not None:
            await forwarder.close()
        await client.close()
    return 0


def cmd_listen(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.key()
    ctx.agent()

    async def main() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await listen_async(ctx, args)
        except asyncio.CancelledError:
            progress("stopped")
            return 0

    return asyncio.run(main())


# ---------------------------------------------------------------------------- doctor


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


# ---------------------------------------------------------------------------- parser


def build_parser() -> Parser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")
    common.add_argument("--agent", metavar="EMAIL", default=argparse.SUPPRESS, help="agent for this command")
    p = Parser(prog="e2a", description="e2a: email for AI agents", parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def cmd(name: str, func: Callable[[Ctx, argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_)
        sp.set_defaults(func=func)
        return sp

    sp = cmd("login", cmd_login, "check and save the server URL and API key")
    sp.add_argument("--url")
    sp.add_argument("--key", help="the API key (prompted without echo when omitted)")

    sp = cmd("config", cmd_config, "show or change the saved config")
    sp.add_argument("action", nargs="?", choices=["show", "get", "set"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("value", nargs="?")

    sp = cmd("agents", cmd_agents, "list, register, update, delete agents")
    ag = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    ag.required = True
    ag.add_parser("list", parents=[common])
    g = ag.add_parser("get", parents=[common])
    g.add_argument("email", nargs="?")
    r = ag.add_parser("register", parents=[common])
    r.add_argument("target", metavar="SLUG-OR-EMAIL")
    r.add_argument("--name")
    r.add_argument("--mode", choices=["local", "cloud"])
    r.add_argument("--webhook")
    u = ag.add_parser("update", parents=[common])
    u.add_argument("email", nargs="?")
    u.add_argument("--webhook")
    u.add_argument("--mode", choices=["local", "cloud"])
    u.add_argument("--name")
    u.add_argument("--hitl", action=argparse.BooleanOptionalAction, default=None)
    u.add_argument("--hitl-ttl", type=int)
    u.add_argument("--hitl-expiration", choices=["approve", "reject"])
    d = ag.add_parser("delete", parents=[common])
    d.add_argument("email", nargs="?")
    d.add_argument("--yes", action="store_true")

    sp = cmd("listen", cmd_listen, "receive mail over the WebSocket")
    sp.add_argument("--forward", metavar="URL")
    sp.add_argument("--forward-token", metavar="T")
    sp.add_argument("--model", help="model for a /v1/responses forward (default gpt-4o-mini)")

    sp = cmd("inbox", cmd_inbox, "list messages")
    grp = sp.add_mutually_exclusive_group()
    grp.add_argument("--unread", action="store_true")
    grp.add_argument("--read", action="store_true")
    grp.add_argument("--all", action="store_true")
    sp.add_argument("--limit", type=int)
    sp.add_argument("--token")

    sp = cmd("read", cmd_read, "show one message")
    sp.add_argument("id")
    sp.add_argument("--raw", action="store_true")

    def body_args(x: argparse.ArgumentParser) -> None:
        bg = x.add_mutually_exclusive_group()
        bg.add_argument("--body")
        bg.add_argument("--body-file")
        x.add_argument("--html", metavar="FILE")
        x.add_argument("--attach", action="append", metavar="FILE")
        x.add_argument("--cc", action="append")
        x.add_argument("--bcc", action="append")
        x.add_argument("--conversation-id")

    sp = cmd("reply", cmd_reply, "reply to a message")
    sp.add_argument("id")
    sp.add_argument("--all", action="store_true", help="reply to all")
    body_args(sp)

    sp = cmd("send", cmd_send, "send a new message")
    sp.add_argument("--to", action="append", required=True)
    sp.add_argument("--subject", required=True)
    body_args(sp)

    cmd("pending", cmd_pending, "held messages awaiting review")
    sp = cmd("approve", cmd_approve, "approve a held message")
    sp.add_argument("id")
    sp.add_argument("--subject")
    sp.add_argument("--body-file")
    sp.add_argument("--html", metavar="FILE")
    sp.add_argument("--to", action="append")
    sp.add_argument("--cc", action="append")
    sp.add_argument("--bcc", action="append")
    sp = cmd("reject", cmd_reject, "reject a held message")
    sp.add_argument("id")
    sp.add_argument("--reason")

    sp = cmd("domains", cmd_domains, "custom domains")
    dg = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    dg.required = True
    dg.add_parser("list", parents=[common])
    for name in ("add", "verify", "delete"):
        dg.add_parser(name, parents=[common]).add_argument("domain")

    sp = cmd("keys", cmd_keys, "API keys")
    kg = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    kg.required = True
    kg.add_parser("list", parents=[common])
    kc = kg.add_parser("create", parents=[common])
    kc.add_argument("--name")
    kg.add_parser("revoke", parents=[common]).add_argument("id")

    sp = cmd("secrets", cmd_secrets, "webhook signing secrets")
    sg = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sg.required = True
    sg.add_parser("list", parents=[common])
    sg.add_parser("create", parents=[common]).add_argument("--name")
    sg.add_parser("revoke", parents=[common]).add_argument("id")

    sp = cmd("deliveries", cmd_deliveries, "webhook delivery log")
    sp.add_argument("--status", choices=["pending", "delivered", "failed", "paused", "all"])
    sp.add_argument("--message")
    sp.add_argument("--limit", type=int)
    sp.add_argument("--token")
    sp = cmd("redeliver", cmd_redeliver, "queue a new webhook delivery")
    sp.add_argument("id")

    cmd("doctor", cmd_doctor, "diagnose the setup")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        ctx = Ctx(args)
        return int(args.func(ctx, args) or 0)
    except UsageError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except E2AApiError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except E2AConnectionError as exc:
        print(f"error: unreachable: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"error: invalid_input: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted: stopped by Ctrl-C", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
