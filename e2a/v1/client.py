"""High-level clients: typed results, the agent address remembered, webhooks parsed and verified.

``E2AClient`` (sync) and ``AsyncE2AClient`` (asyncio) share their argument handling; only the
asyncio client listens on the WebSocket, because a listener is a long-lived task that belongs
in an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from e2a.v1 import verify as _verify
from e2a.v1.api import AsyncE2AApi, E2AApi, error_from_status, seg
from e2a.v1.errors import E2AApiError, E2AConnectionError, WebhookVerificationError
from e2a.v1.models import (
    AsyncInboundEmail,
    Attachment,
    InboundEmail,
    MessageList,
    MessageSummary,
    SendResult,
    WSNotification,
    load_body,
)

BACKOFF_BASE = 1.0  # seconds; doubled per failed attempt
BACKOFF_CAP = 30.0
HEALTHY_AFTER = 10.0  # a connection open this long (or that delivered a frame) resets the backoff
NO_RETRY_STATUS = (401, 403, 404)


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)] (attempt counts from 0)."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt, 16)))
    return (rng or random).uniform(0, ceiling)


def ws_url(base_url: str, agent_email: str) -> str:
    scheme, rest = base_url.split("://", 1)
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}/api/v1/agents/{seg(agent_email)}/ws"


def _recipients(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _approve_edits(**edits: Any) -> dict[str, Any]:
    for key in ("to", "cc", "bcc"):
        if edits.get(key) is not None:
            edits[key] = _recipients(edits[key])
    return {k: v for k, v in edits.items() if v is not None}


def _message_list(obj: dict[str, Any]) -> MessageList:
    return MessageList([MessageSummary.from_json(m) for m in obj.get("messages", [])], obj.get("next_token"))


class _Base:
    def _init(self, agent_email: str | None) -> None:
        self.agent_email = agent_email or os.environ.get("E2A_AGENT_EMAIL") or None

    def _agent(self, agent_email: str | None) -> str:
        agent = agent_email or self.agent_email
        if not agent:
            raise ValueError("an agent address is required: pass agent_email= or set E2A_AGENT_EMAIL")
        return agent

    def _parse(self, cls: type, body: bytes | str | dict[str, Any]) -> Any:
        return cls(load_body(body), self)

    def _parse_webhook(
        self,
        cls: type,
        body: bytes | str | dict[str, Any],
        secret: str | list[str] | None,
        headers: Mapping[str, str] | None,
    ) -> Any:
        secrets = _verify.resolve_secrets(secret)
        if headers is not None:
            if isinstance(body, dict):
                raise ValueError("Standard Webhooks verification needs the raw body bytes, not a dict")
            _verify.verify_standard_webhook(headers, body, secrets)
        email = cls(load_body(body), self)
        email.check_signature(secrets)
        return email


class E2AClient(_Base):
    """Synchronous high-level client. ``with E2AClient() as c: c.send(...)``."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        agent_email: str | None = None,
        timeout: float = 30,
    ) -> None:
        self.api = E2AApi(api_key, base_url, timeout)
        self._init(agent_email)

    @property
    def base_url(self) -> str:
        return self.api.base_url

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> E2AClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"E2AClient(base_url={self.base_url!r}, agent_email={self.agent_email!r})"

    def send(
        self,
        to: str | Iterable[str],
        subject: str,
        body: str,
        html_body: str | None = None,
        cc: str | Iterable[str] | None = None,
        bcc: str | Iterable[str] | None = None,
        conversation_id: str | None = None,
        attachments: Iterable[Attachment] | None = None,
        agent_email: str | None = None,
    ) -> SendResult:
        return SendResult.from_json(
            self.api.send_email(
                _recipients(to), subject, body, from_email=agent_email or self.agent_email, html_body=html_body,
                cc=_recipients(cc), bcc=_recipients(bcc), conversation_id=conversation_id, attachments=attachments,
            )
        )

    def reply(
        self,
        message_id: str,
        body: str,
        html_body: str | None = None,
        reply_all: bool | None = None,
        cc: str | Iterable[str] | None = None,
        bcc: str | Iterable[str] | None = None,
        conversation_id: str | None = None,
        attachments: Iterable[Attachment] | None = None,
        agent_email: str | None = None,
    ) -> SendResult:
        return SendResult.from_json(
            self.api.reply_to_message(
                self._agent(agent_email), message_id, body, html_body=html_body, reply_all=reply_all,
                cc=_recipients(cc), bcc=_recipients(bcc), conversation_id=conversation_id, attachments=attachments,
            )
        )

    def get_messages(
        self, status: str = "unread", page_size: int = 50, token: str | None = None, agent_email: str | None = None
    ) -> MessageList:
        return _message_list(self.api.list_messages(self._agent(agent_email), status, page_size, token))

    def get_message(self, message_id: str, agent_email: str | None = None, mark_read: bool = True) -> InboundEmail:
        """The full message; trusted because it came over the authenticated API."""
        data = self.api.get_message(self._agent(agent_email), message_id, mark_read=mark_read)
        return InboundEmail(data, self, trusted=True)

    def list_pending(self) -> list[dict[str, Any]]:
        return list(self.api.list_pending_messages().get("messages", []))

    def approve_message(self, message_id: str, **edits: Any) -> SendResult:
        return SendResult.from_json(self.api.approve_message(message_id, **_approve_edits(**edits)))

    def reject_message(self, message_id: str, reason: str = "") -> dict[str, Any]:
        return self.api.reject_message(message_id, reason)

    def parse(self, body: bytes | str | dict[str, Any]) -> InboundEmail:
        """Parse a webhook body without verifying it (claim fields stay locked)."""
        return self._parse(InboundEmail, body)

    def parse_webhook(
        self,
        body: bytes | str | dict[str, Any],
        secret: str | list[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> InboundEmail:
        """Parse and verify; raises :class:`WebhookVerificationError` (a ``PermissionError``).

        With ``headers`` (the request's HTTP headers) the Standard Webhooks signature over the
        whole body is checked too."""
        return self._parse_webhook(InboundEmail, body, secret, headers)


class AsyncE2AClient(_Base):
    """asyncio high-level client, with :meth:`listen` for local-mode agents."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        agent_email: str | None = None,
        timeout: float = 30,
    ) -> None:
        self.api = AsyncE2AApi(api_key, base_url, timeout)
        self._init(agent_email)
        self._ws: Any = None
        self.timeout = timeout

    @property
    def base_url(self) -> str:
        return self.api.base_url

    async def close(self) -> None:
        await self.api.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncE2AClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncE2AClient(base_url={self.base_url!r}, agent_email={self.agent_email!r})"

    async def send(
        self,
        to: str | Iterable[str],
        subject: str,
        body: str,
        html_body: str | None = None,
        cc: str | Iterable[str] | None = None,
        bcc: str | Iterable[str] | None = None,
        conversation_id: str | None = None,
        attachments: Iterable[Attachment] | None = None,
        agent_email: str | None = None,
    ) -> SendResult:
        return SendResult.from_json(
            await self.api.send_email(
                _recipients(to), subject, body, from_email=agent_email or self.agent_email, html_body=html_body,
                cc=_recipients(cc), bcc=_recipients(bcc), conversation_id=conversation_id, attachments=attachments,
            )
        )

    async def reply(
        self,
        message_id: str,
        body: str,
        html_body: str | None = None,
        reply_all: bool | None = None,
        cc: str | Iterable[str] | None = None,
        bcc: str | Iterable[str] | None = None,
        conversation_id: str | None = None,
        attachments: Iterable[Attachment] | None = None,
        agent_email: str | None = None,
    ) -> SendResult:
        return SendResult.from_json(
            await self.api.reply_to_message(
                self._agent(agent_email), message_id, body, html_body=html_body, reply_all=reply_all,
                cc=_recipients(cc), bcc=_recipients(bcc), conversation_id=conversation_id, attachments=attachments,
            )
        )

    async def get_messages(
        self, status: str = "unread", page_size: int = 50, token: str | None = None, agent_email: str | None = None
    ) -> MessageList:
        return _message_list(await self.api.list_messages(self._agent(agent_email), status, page_size, token))

    async def get_message(
        self, message_id: str, agent_email: str | None = None, mark_read: bool = True
    ) -> AsyncInboundEmail:
        data = await self.api.get_message(self._agent(agent_email), message_id, mark_read=mark_read)
        return AsyncInboundEmail(data, self, trusted=True)

    async def list_pending(self) -> list[dict[str, Any]]:
        return list((await self.api.list_pending_messages()).get("messages", []))

    async def approve_message(self, message_id: str, **edits: Any) -> SendResult:
        return SendResult.from_json(await self.api.approve_message(message_id, **_approve_edits(**edits)))

    async def reject_message(self, message_id: str, reason: str = "") -> dict[str, Any]:
        return await self.api.reject_message(message_id, reason)

    def parse(self, body: bytes | str | dict[str, Any]) -> AsyncInboundEmail:
        return self._parse(AsyncInboundEmail, body)

    def parse_webhook(
        self,
        body: bytes | str | dict[str, Any],
        secret: str | list[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncInboundEmail:
        return self._parse_webhook(AsyncInboundEmail, body, secret, headers)

    # ------------------------------------------------------------------------ WebSocket

    async def ack(self, message_id: str) -> bool:
        """Mark a message read over the open listener connection.

        False when no connection is open (it dropped while the caller handled the message): the
        message then stays unread and the next connection sends it again, unless the caller
        marks it read another way (``get_message`` with ``mark_read=True``)."""
        from websockets.exceptions import ConnectionClosed

        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps({"type": "ack", "message_id": message_id}))
        except ConnectionClosed:
            return False
        return True

    async def listen(
        self,
        agent_email: str | None = None,
        reconnect: bool = True,
        *,
        auto_ack: bool = True,
        on_state: Any = None,
    ) -> AsyncIterator[WSNotification]:
        """Yield one notification per message, unread ones first (the server drains them).

        With ``auto_ack`` a message is acknowledged when the caller asks for the next one, i.e.
        after the loop body handled it; a body that raises or a cancelled task leaves it
        unread, so a restart sees it again. Reconnects with full-jitter exponential backoff;
        401, 403 and 404 stop with :class:`E2AApiError` (retrying cannot fix them).
        ``on_state(event, detail)`` (optional) hears ``connected`` / ``retrying`` for progress output.
        """
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        agent = self._agent(agent_email)
        url = ws_url(self.base_url, agent)
        headers = {"Authorization": f"Bearer {self.api.api_key}"}
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            opened_at: float | None = None
            failure: str = "connection closed"
            try:
                async with _normal_close(connect(
                    url,
                    additional_headers=headers,
                    subprotocols=["e2a.v2"],  # type: ignore[list-item]
                    open_timeout=self.timeout,
                    ping_interval=20,
                    ping_timeout=20,
                    user_agent_header="e2a-python",
                )) as ws:
                    self._ws = ws
                    opened_at = loop.time()
                    if on_state:
                        on_state("connected", url)
                    async for frame in ws:
                        if not isinstance(frame, str):
                            continue
                        try:
                            data = json.loads(frame)
                        except ValueError:
                            continue
                        if not isinstance(data, dict) or "message_id" not in data:
                            continue  # control frames (drained, error) carry no message_id
                        attempt = 0
                        note = WSNotification.from_json(data)
                        yield note
                        if auto_ack:
                            await ws.send(json.dumps({"type": "ack", "message_id": note.message_id}))
            except InvalidStatus as exc:
                err = _handshake_error(exc)
                if err.status_code in NO_RETRY_STATUS or not reconnect or _permanent(err.status_code):
                    raise err from None
                failure = f"{err.code}: {err.message}"
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                failure = str(exc) or type(exc).__name__
                if not reconnect:
                    raise E2AConnectionError(url.split("?")[0], failure) from exc
            finally:
                self._ws = None
            if not reconnect:
                return
            if opened_at is not None and loop.time() - opened_at >= HEALTHY_AFTER:
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            if on_state:
                on_state("retrying", f"{failure}; reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)


@contextlib.asynccontextmanager
async def _normal_close(connecting: Any) -> AsyncIterator[Any]:
    """The connection, closed with 1000 however the block ends.

    ``websockets``' own context manager closes with 1011 (internal error) when the block
    raises, which includes a cancelled task and a consumer that stopped iterating: both are
    a normal end of listening, not a failure."""
    ws = await connecting
    try:
        yield ws
    finally:
        await ws.close()


def _permanent(status: int) -> bool:
    """Other handshake answers retrying cannot fix either (400 agent_not_local, 426); 408 and
    429 (too many connections) clear up by themselves."""
    return 400 <= status < 500 and status not in (408, 429)


def _handshake_error(exc: Any) -> E2AApiError:
    response = exc.response
    body = getattr(response, "body", b"") or b""
    headers = getattr(response, "headers", {}) or {}
    return error_from_status(response.status_code, body, headers.get("Retry-After"))


__all__ = ["AsyncE2AClient", "E2AClient", "WebhookVerificationError", "backoff_delay"]
