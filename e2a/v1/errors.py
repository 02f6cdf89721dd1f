"""Client-side exceptions of the e2a SDK (no server imports: this package ships to agents)."""

from __future__ import annotations


class E2AApiError(Exception):
    """A non-2xx answer from the e2a API.

    ``code`` is the stable snake_case code of the JSON error body (what callers branch on),
    ``message`` the human text, ``retry_after`` the seconds of ``Retry-After`` (429/503).
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        body: object = None,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body


class E2AConnectionError(ConnectionError):
    """The server could not be reached (refused, DNS, timeout): retrying later may help."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class UnverifiedEmailError(RuntimeError):
    """A claim field of a webhook email was read before its signature was verified.

    Anyone who can POST to a webhook URL can forge the JSON, so the SDK refuses to hand out
    sender, subject, body, … until ``verify_signature`` (or ``parse_webhook``) succeeded.
    ``unverified_payload`` stays available for debugging.
    """


class WebhookVerificationError(PermissionError):
    """A webhook failed verification; ``reason`` says which check (body hash, signature, timestamp)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


__all__ = ["E2AApiError", "E2AConnectionError", "UnverifiedEmailError", "WebhookVerificationError"]
