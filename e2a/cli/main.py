"""The ``e2a`` command: the agent developer's day-to-day tool over the SDK.

Exit codes: 0 success, 1 the API answered with an error, 2 bad usage or bad input
(before anything was sent), 3 the server could not be reached. Errors are one line,
``error: <code>: <message>`` on stderr; progress goes to stderr, results to stdout.

This module holds the argument parser and the entry point; the commands are in
:mod:`e2a.cli.commands`, :mod:`e2a.cli.listen` and :mod:`e2a.cli.doctor`, what they share in
:mod:`e2a.cli.common` (every name stays importable from here).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from e2a.cli.commands import (
    agent_rows,
    cmd_agents,
    cmd_approve,
    cmd_config,
    cmd_deliveries,
    cmd_domains,
    cmd_inbox,
    cmd_keys,
    cmd_login,
    cmd_pending,
    cmd_read,
    cmd_redeliver,
    cmd_reject,
    cmd_reply,
    cmd_secrets,
    cmd_send,
    send_human,
    show_agent,
    show_domain,
    shown_config,
    verdict_line,
)
from e2a.cli.common import (
    MAX_REQUEST,
    REQUEST_SLACK,
    Ctx,
    Parser,
    UsageError,
    confirm,
    emit_json,
    load_attachments,
    output,
    progress,
    read_body,
    read_text,
    say,
    split_addresses,
    table,
)
from e2a.cli.doctor import (
    cmd_doctor,
)
from e2a.cli.listen import (
    cmd_listen,
    fetch_detail,
    listen_async,
    listen_line,
)
from e2a.v1.errors import E2AApiError, E2AConnectionError

__all__ = [
    "Ctx",
    "MAX_REQUEST",
    "Parser",
    "REQUEST_SLACK",
    "UsageError",
    "agent_rows",
    "build_parser",
    "cmd_agents",
    "cmd_approve",
    "cmd_config",
    "cmd_deliveries",
    "cmd_doctor",
    "cmd_domains",
    "cmd_inbox",
    "cmd_keys",
    "cmd_listen",
    "cmd_login",
    "cmd_pending",
    "cmd_read",
    "cmd_redeliver",
    "cmd_reject",
    "cmd_reply",
    "cmd_secrets",
    "cmd_send",
    "confirm",
    "emit_json",
    "fetch_detail",
    "listen_async",
    "listen_line",
    "load_attachments",
    "main",
    "output",
    "progress",
    "read_body",
    "read_text",
    "run",
    "say",
    "send_human",
    "show_agent",
    "show_domain",
    "shown_config",
    "split_addresses",
    "table",
    "verdict_line",
]


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
