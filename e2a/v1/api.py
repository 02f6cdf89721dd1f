"""The raw layer: one method per endpoint of the HTTP API, returning the decoded JSON.

The endpoint methods are written once (:class:`_Endpoints`) and only ``_call`` differs: the
sync class returns the JSON, the async class returns a coroutine of it. That keeps the sync
and asyncio clients identical by construction instead of by discipline.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from e2a.v1.errors import E2AApiError, E2AConnectionError
from e2a.v1.models import Attachment

DEFAULT_URL = "http://localhost:8080"
USER_AGENT = "e2a-python"


def config_path() -> Path:
    """Where the CLI keeps its settings: ``~/.e2a/config.json``, or ``E2A_CLI_CONFIG``.

    (Not ``E2A_CONFIG``: that names the server's YAML file.)"""
    override = os.environ.get("E2A_CLI_CONFIG")
    return Path(override) if override else Path.home() / ".e2a" / "config.json"


def saved_config() -> dict[str, Any]:
    try:
        data = json.loads(config_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_base_url(base_url: str | None) -> str:
    """The server URL, checked here: an unusable one is bad input (``ValueError``), not a
    connection failure, and must not surface later as an httpx traceback."""
    url = str(base_url or os.environ.get("E2A_URL") or saved_config().get("url") or DEFAULT_URL).rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid server URL {url!r}: {exc}; expected http(s)://host[:port]") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid server URL {url!r}: expected http(s)://host[:port]")
    return url


def resolve_api_key(api_key: str | None) -> str:
    """The key, with surrounding whitespace (a pasted line break) removed.

    A key with any other character outside printable ASCII cannot go into a header; httpx
    would report it in an error message that repeats the whole header, key included, so it
    is refused here without echoing it."""
    key = (api_key or os.environ.get("E2A_API_KEY") or "").strip()
    if not key:
        raise ValueError("an API key is required: pass api_key= or set E2A_API_KEY")
    if not all("!" <= ch <= "~" for ch in key):
        raise ValueError("the API key contains a space, control or non-ASCII character: copy it again")
    return key


def seg(value: str) -> str:
    """One percent-encoded path segment (``@`` and ``/`` included)."""
    return quote(str(value), safe="")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_status(status: int, content: bytes, retry_after: str | None = None) -> E2AApiError:
    """An :class:`E2AApiError` from a status and a JSON error body (api.md §0.3 shape)."""
    code, message, body = f"http_{status}", "HTTP error", None
    try:
        body = json.loads(content)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
    except ValueError:
        text = content.decode("utf-8", "replace").strip()
        if text:
            message = text[:200]
    return E2AApiError(status, code, message, parse_retry_after(retry_after), body)


def error_from_response(resp: httpx.Response) -> E2AApiError:
    return error_from_status(resp.status_code, resp.content, resp.headers.get("Retry-After"))


def decode(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise error_from_response(resp)
    if resp.status_code == 204 or not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        return resp.content


def wire_attachments(attachments: Iterable[Attachment | dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if attachments is None:
        return None
    return [a.to_wire() if isinstance(a, Attachment) else dict(a) for a in attachments]


def _body(**fields: Any) -> dict[str, Any]:
    """Request body without the unset (None) fields: the server treats null as absent anyway."""
    return {k: v for k, v in fields.items() if v is not None}


class _Endpoints:
    """Every endpoint, expressed through ``self._call(method, path, params=, json=)``."""

    def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None) -> Any:
        raise NotImplementedError

    # service
    def health(self) -> Any:
        return self._call("GET", "/api/health")

    def ready(self) -> Any:
        return self._call("GET", "/api/ready")

    def get_info(self) -> Any:
        return self._call("GET", "/api/v1/info")

    def send_feedback(self, message: str, category: str | None = None, email: str | None = None) -> Any:
        return self._call("POST", "/api/feedback", json=_body(message=message, category=category, email=email))

    # agents
    def list_agents(self) -> Any:
        return self._call("GET", "/api/v1/agents")

    def register_agent(
        self,
        email: str | None = None,
        webhook_url: str | None = None,
        agent_mode: str | None = None,
        *,
        slug: str | None = None,
        name: str | None = None,
    ) -> Any:
        body = _body(email=email, slug=slug, name=name, webhook_url=webhook_url, agent_mode=agent_mode)
        return self._call("POST", "/api/v1/agents", json=body)

    def get_agent(self, email: str) -> Any:
        return self._call("GET", f"/api/v1/agents/{seg(email)}")

    def update_agent(self, email: str, **fields: Any) -> Any:
        return self._call("PUT", f"/api/v1/agents/{seg(email)}", json=_body(**fields))

    def delete_agent(self, email: str) -> Any:
        return self._call("DELETE", f"/api/v1/agents/{seg(email)}")

    def send_test_email(self, email: str) -> Any:
        return self._call("POST", f"/api/v1/agents/{seg(email)}/test")

    # inbox and deliveries
    def list_messages(
        self, email: str, status: str = "unread", page_size: int | None = None, token: str | None = None
    ) -> Any:
        params = _body(status=status, page_size=page_size, token=token)
        return self._call("GET", f"/api/v1/agents/{seg(email)}/messages", params=params)

    def get_message(self, email: str, message_id: str, mark_read: bool = True) -> Any:
        params = None if mark_read else {"mark_read": "false"}
        return self._call("GET", f"/api/v1/agents/{seg(email)}/messages/{seg(message_id)}", params=params)

    def reply_to_message(
        self,
        email: str,
        message_id: str,
        body: str,
        html_body: str | None = None,
        reply_all: bool | None = None,
        cc: list[str] | None = None,
        bcc: list[str] | None = None,
        conversation_id: str | None = None,
        attachments: Iterable[Attachment | dict[str, Any]] | None = None,
    ) -> Any:
        payload = _body(
            body=body, html_body=html_body, reply_all=reply_all, cc=cc, bcc=bcc,
            conversation_id=conversation_id, attachments=wire_attachments(attachments),
        )
        return self._call("POST", f"/api/v1/agents/{seg(email)}/messages/{seg(message_id)}/reply", json=payload)

    def redeliver(self, email: str, message_id: str) -> Any:
        return self._call("POST", f"/api/v1/agents/{seg(email)}/messages/{seg(message_id)}/redeliver")

    def list_deliveries(
        self,
        email: str,
        status: str | None = None,
        message_id: str | None = None,
        page_size: int | None = None,
        token: str | None = None,
    ) -> Any:
        params = _body(status=status, message_id=message_id, page_size=page_size, token=token)
        return self._call("GET", f"/api/v1/agents/{seg(email)}/deliveries", params=params)

    # send and HITL
    def send_email(
        self,
        to: list[str] | None,
        subject: str,
        body: str,
        from_email: str | None = None,
        html_body: str | None = None,
        cc: list[str] | None = None,
        bcc: list[str] | None = None,
        conversation_id: str | None = None,
        attachments: Iterable[Attachment | dict[str, Any]] | None = None,
    ) -> Any:
        payload = _body(
            to=to, cc=cc, bcc=bcc, subject=subject, body=body, html_body=html_body,
            conversation_id=conversation_id, attachments=wire_attachments(attachments),
        )
        payload["from"] = from_email
        return self._call("POST", "/api/v1/send", json=_body(**payload))

    def list_pending_messages(self) -> Any:
        return self._call("GET", "/api/v1/messages", params={"status": "pending_approval"})

    def get_pending_message(self, message_id: str) -> Any:
        return self._call("GET", f"/api/v1/messages/{seg(message_id)}")

    get_outbound_message = get_pending_message

    def approve_message(self, message_id: str, **edits: Any) -> Any:
        if "attachments" in edits and edits["attachments"] is not None:
            edits["attachments"] = wire_attachments(edits["attachments"])
        return self._call("POST", f"/api/v1/messages/{seg(message_id)}/approve", json=_body(**edits))

    def reject_message(self, message_id: str, reason: str = "") -> Any:
        return self._call("POST", f"/api/v1/messages/{seg(message_id)}/reject", json={"reason": reason})

    # domains
    def list_domains(self) -> Any:
        return self._call("GET", "/api/v1/domains")

    def register_domain(self, domain: str) -> Any:
        return self._call("POST", "/api/v1/domains", json={"domain": domain})

    def verify_domain(self, domain: str) -> Any:
        return self._call("POST", f"/api/v1/domains/{seg(domain)}/verify")

    def delete_domain(self, domain: str) -> Any:
        return self._call("DELETE", f"/api/v1/domains/{seg(domain)}")

    # signing secrets, keys, user data
    def list_signing_secrets(self) -> Any:
        return self._call("GET", "/api/v1/users/me/signing-secrets")

    def create_signing_secret(self, name: str | None = None) -> Any:
        return self._call("POST", "/api/v1/users/me/signing-secrets", json=_body(name=name))

    def delete_signing_secret(self, secret_id: str) -> Any:
        return self._call("DELETE", f"/api/v1/users/me/signing-secrets/{seg(secret_id)}")

    def list_api_keys(self) -> Any:
        return self._call("GET", "/api/v1/keys")

    def create_api_key(self, name: str | None = None, agent: str | None = None) -> Any:
        return self._call("POST", "/api/v1/keys", json=_body(name=name, agent=agent))

    def revoke_api_key(self, key_id: str) -> Any:
        return self._call("DELETE", f"/api/v1/keys/{seg(key_id)}")

    def export_user_data(self) -> Any:
        return self._call("GET", "/api/v1/users/me/export")

    def delete_user(self, confirm: str) -> Any:
        return self._call("DELETE", "/api/v1/users/me", params={"confirm": confirm})


class E2AApi(_Endpoints):
    """Synchronous raw API client (HTTP/1.1 keep-alive through one ``httpx.Client``)."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 30) -> None:
        self.api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT},
        )

    def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, params=params, json=json)
        except httpx.TransportError as exc:
            raise E2AConnectionError(self.base_url, str(exc) or type(exc).__name__) from exc
        return decode(resp)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> E2AApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never show the key
        return f"E2AApi(base_url={self.base_url!r})"


class AsyncE2AApi(_Endpoints):
    """asyncio raw API client: the same methods as :class:`E2AApi`, each a coroutine."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 30) -> None:
        self.api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT},
        )

    async def _call(  # type: ignore[override]
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> Any:
        try:
            resp = await self._http.request(method, path, params=params, json=json)
        except httpx.TransportError as exc:
            raise E2AConnectionError(self.base_url, str(exc) or type(exc).__name__) from exc
        return decode(resp)

    async def aclose(self) -> None:
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncE2AApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncE2AApi(base_url={self.base_url!r})"


def fetch_info(base_url: str | None = None, timeout: float = 10) -> dict[str, Any]:
    """``GET /api/v1/info`` without a key (the CLI's first contact with a server)."""
    url = resolve_base_url(base_url)
    try:
        resp = httpx.get(url + "/api/v1/info", timeout=timeout)
    except httpx.TransportError as exc:
        raise E2AConnectionError(url, str(exc) or type(exc).__name__) from exc
    return _info(resp)


def _info(resp: httpx.Response) -> dict[str, Any]:
    """The info object, or an error saying the URL is not an e2a server (an HTML page, a proxy)."""
    data = decode(resp)
    if not isinstance(data, dict):
        raise E2AApiError(resp.status_code, "unexpected_response", "this URL does not answer as an e2a server")
    return data


async def fetch_info_async(base_url: str | None = None, timeout: float = 10) -> dict[str, Any]:
    url = resolve_base_url(base_url)
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            resp = await http.get(url + "/api/v1/info")
    except httpx.TransportError as exc:
        raise E2AConnectionError(url, str(exc) or type(exc).__name__) from exc
    return _info(resp)


__all__ = ["AsyncE2AApi", "E2AApi", "config_path", "fetch_info", "fetch_info_async", "saved_config"]
