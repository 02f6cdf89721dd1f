"""The e2a Python SDK, version 1 of the client contract (``from e2a.v1 import E2AClient``).

Pure client code: it imports neither Twisted nor any server module, so an agent installs
and imports it without pulling in the gateway's runtime.
"""

from __future__ import annotations

from e2a.v1.api import AsyncE2AApi, E2AApi, fetch_info, fetch_info_async
from e2a.v1.client import AsyncE2AClient, E2AClient
from e2a.v1.errors import E2AApiError, E2AConnectionError, UnverifiedEmailError, WebhookVerificationError
from e2a.v1.models import (
    AsyncInboundEmail,
    Attachment,
    AuthHeaders,
    InboundEmail,
    MessageList,
    MessageSummary,
    SendResult,
    WSNotification,
)
from e2a.v1.verify import verify_auth_headers, verify_standard_webhook

__all__ = [
    "AsyncE2AApi",
    "AsyncE2AClient",
    "AsyncInboundEmail",
    "Attachment",
    "AuthHeaders",
    "E2AApi",
    "E2AApiError",
    "E2AClient",
    "E2AConnectionError",
    "InboundEmail",
    "MessageList",
    "MessageSummary",
    "SendResult",
    "UnverifiedEmailError",
    "WSNotification",
    "WebhookVerificationError",
    "fetch_info",
    "fetch_info_async",
    "verify_auth_headers",
    "verify_standard_webhook",
]
