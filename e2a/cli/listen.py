"""``e2a listen``: follow an agent's mail over the WebSocket (reconnecting with back-off).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from e2a.cli.common import (
    Ctx,
    emit_json,
    progress,
    say,
)
from e2a.v1.client import AsyncE2AClient
from e2a.v1.errors import E2AApiError, E2AConnectionError


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
