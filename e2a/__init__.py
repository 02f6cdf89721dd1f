"""e2a: an authenticated email gateway for AI agents, on Twisted and PostgreSQL."""

__version__ = "0.1.0"

# The SDK names (``from e2a import E2AClient``) resolve lazily (PEP 562): the server imports
# this package too and must not pay for the HTTP/WebSocket client libraries.
_SDK_NAMES = frozenset(
    (
        "AsyncE2AApi", "AsyncE2AClient", "AsyncInboundEmail", "Attachment", "AuthHeaders", "E2AApi",
        "E2AApiError", "E2AClient", "E2AConnectionError", "InboundEmail", "MessageList", "MessageSummary",
        "SendResult", "UnverifiedEmailError", "WSNotification", "WebhookVerificationError", "fetch_info",
        "fetch_info_async",
    )
)
__all__ = sorted(_SDK_NAMES)


def __getattr__(name: str) -> object:
    if name in _SDK_NAMES:
        from e2a import v1

        return getattr(v1, name)
    raise AttributeError(f"module 'e2a' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SDK_NAMES])
