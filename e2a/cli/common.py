"""What every ``e2a`` command shares: usage errors, output (JSON or human), the context (client,
saved config), input helpers (bodies, attachments, confirmations).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from e2a.cli import config as cfg
from e2a.v1.client import AsyncE2AClient, E2AClient
from e2a.v1.models import Attachment

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
