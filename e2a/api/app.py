"""The Klein application: route modules mounted on one router, one JSON error handler.

Each :class:`ApiApp` owns its own ``Klein`` instance (not a module-global one), so two e2a
services can run in one process — the cross-process tests rely on that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from klein import Klein
from werkzeug.exceptions import MethodNotAllowed as WzMethodNotAllowed
from werkzeug.exceptions import NotFound as WzNotFound
from werkzeug.routing import RequestRedirect as WzRequestRedirect

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from e2a import __version__, metrics
from e2a.api.http import CappedRequest, write_json
from e2a.config import Config
from e2a.errors import E2AError, TransientError, Unavailable
from e2a.store.database import Database

if TYPE_CHECKING:  # annotations only: the composition root imports the real classes
    from e2a.delivery.websocket import WebSocketService
    from e2a.mailauth.dkimkeys import DkimKeyPair
    from e2a.mailauth.dns import DnsClient
    from e2a.metrics import E2AMetrics
    from e2a.outbound.hitl import HoldReview
    from e2a.outbound.magiclink import ApprovalTokens
    from e2a.outbound.send import SendService

log = Logger()


@dataclass(frozen=True)
class ApiServices:
    """The services the routes call, built once by the composition root (e2a.service).

    Typed fields rather than a string-keyed dict, so a route that needs one more service says so
    here and the root must build it; nothing is constructed lazily behind a route.
    """

    send: SendService
    hold_review: HoldReview  # shared with the magic-link pages and the expiry worker
    metrics: E2AMetrics
    # Magic-link tokens; None only for a test API without ``signing.hmac_secret``.
    approval_tokens: ApprovalTokens | None = None
    # DKIM key generation for new domains on the blocking pool; None: generate inline.
    dkim_keygen: Callable[[], Awaitable[DkimKeyPair]] | None = None
    # The /ws endpoint's service; None: no WebSocket endpoint (404).
    websocket: WebSocketService | None = None


@dataclass
class ApiDeps:
    """What routes may use. Built by the composition root (e2a/service.py)."""

    config: Config
    db: Database
    clock: Any
    services: ApiServices
    dns: DnsClient | None = None
    master_key: bytes = b""

    def __post_init__(self) -> None:
        # validated by config.validate(); parsed once here rather than per request
        self.trusted_proxies: list[ipaddress._BaseNetwork] = [
            ipaddress.ip_network(p, strict=False) for p in self.config.http.trusted_proxies
        ]


class ApiApp:
    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self.router = Klein()
        # werkzeug would answer '//' in a path (or a %2F that decodes next to a '/') with a
        # redirect exception that Klein does not handle: a 500 and a critical log line for any
        # unauthenticated client. Without merging, such a path simply matches no route (404).
        self.router.url_map.merge_slashes = False
        self._install_error_handlers()
        from e2a.api import (
            account,
            agents,
            deliveries,
            domains,
            feedback,
            magiclink_pages,
            messages,
            review,
            send,
            service_routes,
            ws,
        )

        for module in (service_routes, agents, domains, account, messages, feedback, deliveries, ws, send, review,
                       magiclink_pages):
            module.install(self.router, deps)
        metrics.install(self.router, deps)  # GET /metrics (e2a.metrics)
        from e2a.console import routes as console_routes  # the web console (HTML, not API)

        console_routes.install(self.router, deps)

    def _install_error_handlers(self) -> None:
        # ``request: Any``: Klein's handler Protocol types it IRequest, while the handlers need the
        # twisted.web Request it actually passes (headers, path, write_json).
        router = self.router

        @router.handle_errors(E2AError)
        def e2a_error(request: Any, failure: Any) -> bytes:
            err: E2AError = failure.value
            for name, value in err.headers.items():
                request.setHeader(name, value)
            return write_json(request, err.status, err.to_json())

        @router.handle_errors(WzNotFound, WzRequestRedirect)
        def not_found(request: Any, failure: Any) -> Any:
            if is_console_path(request.path):  # the console answers HTML (e2a.console.routes)
                return error_page(request, 404, "Not found", "There is nothing here.")
            return write_json(request, 404, {"error": {"code": "not_found", "message": "no such route"}})

        @router.handle_errors(WzMethodNotAllowed)
        def method_not_allowed(request: Any, failure: Any) -> bytes:
            allowed = allowed_without_head(request.path, failure.value.valid_methods or [])
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            if is_console_path(request.path):
                return error_page(request, 405, "Method not allowed", "This page does not answer that method.")
            return write_json(
                request, 405, {"error": {"code": "method_not_allowed", "message": "method not allowed"}}
            )

        @router.handle_errors(TransientError)
        def unavailable(request: Any, failure: Any) -> bytes:
            log.warn("{method} {path}: {why}", method=request.method, path=request.path, why=failure.getErrorMessage())
            err = Unavailable()
            request.setHeader(b"Retry-After", b"5")
            return write_json(request, err.status, err.to_json())

        @router.handle_errors(Exception)
        def internal(request: Any, failure: Any) -> bytes:
            # The failure's text stays in the log, in every mode: it can be a database error
            # quoting SQL, parameters or schema, which a client must never see.
            log.failure("unhandled error in {method} {path}", failure, method=request.method, path=request.path)
            return write_json(
                request, 500, {"error": {"code": "internal_error", "message": "internal error (details in the server log)"}}
            )

    def resource(self) -> Any:
        return _Utf8UrlResource(self.router.resource(), self.router.url_map)

    def site(self) -> Site:
        site = Site(self.resource(), logFormatter=redacting_log_formatter)
        site.requestFactory = CappedRequest
        site.displayTracebacks = False
        site.noisy = False
        return site


class _Utf8UrlResource(Resource):
    """Klein answers a URL that is not UTF-8 after percent-decoding with a text/plain 400; the
    API answers every error in its JSON shape (api.md §0.3), so such URLs are caught first. No
    route can match them: 404 ``not_found``."""

    isLeaf = True

    def __init__(self, inner: Any, url_map: Any) -> None:
        super().__init__()
        self.inner = inner
        self.url_map = url_map

    def render(self, request: Request) -> Any:
        from urllib.parse import unquote_to_bytes

        try:
            # A magic-link query holds only the token, which its page judges (400 invalid link).
            target = request.path if request.path in MAGIC_LINK_PATHS else request.uri
            unquote_to_bytes(target).decode("utf-8")
        except UnicodeDecodeError:
            return write_json(request, 404, {"error": {"code": "not_found", "message": "URL is not valid UTF-8"}})
        if request.method == b"HEAD" and request.path not in HEAD_PATHS and not is_console_path(request.path):
            # werkzeug adds HEAD to every GET rule; api.md §0.6 allows it only where listed.
            allowed = self.url_map.bind("e2a").allowed_methods(request.path.decode("utf-8", "replace"))
            if allowed:
                request.setHeader(b"Allow", ", ".join(allowed_without_head(request.path, allowed)).encode())
                return write_json(
                    request, 405, {"error": {"code": "method_not_allowed", "message": "method not allowed"}}
                )
        return self.inner.render(request)


MAGIC_LINK_PATHS = frozenset({b"/api/v1/approve", b"/api/v1/reject"})

# api.md §1: the only paths that answer HEAD.
HEAD_PATHS = frozenset({b"/api/health", b"/api/v1/approve", b"/api/v1/reject"})


def allowed_without_head(path: bytes, methods: Any) -> list[str]:
    # console pages are HTML pages: HEAD answers as GET without the body (e2a.console.routes)
    return sorted(m for m in set(methods) if m != "HEAD" or path in HEAD_PATHS or is_console_path(path))


def redacting_log_formatter(timestamp: str, request: Any) -> str:
    """The combined access-log line with ``token=`` query values written as ``***``, for every
    route (a wrong-method request to the WebSocket path never reaches its handler)."""
    from twisted.web.http import combinedLogFormatter

    original = request.uri
    request.uri = redact_query(original)
    try:
        return combinedLogFormatter(timestamp, request)
    finally:
        request.uri = original


_SECRET_PARAMS = {"token", "t"}


def redact_query(uri: bytes) -> bytes:
    """The URI with the values of ``token`` and ``t`` (API keys, magic-link tokens) as ``***``,
    matching parameter names after percent-decoding so ``%74oken=`` is caught too; and any value
    that carries an e2a API key (``e2a_…``) under another name, since a client may put its key
    in a query parameter e2a never reads."""
    from urllib.parse import unquote_to_bytes

    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    parts = []
    for item in query.split(b"&"):
        name, eq, value = item.partition(b"=")
        decoded = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
        secret = decoded in _SECRET_PARAMS or b"e2a_" in unquote_to_bytes(value).lower()
        parts.append(name + b"=***" if secret and eq else item)
    return path + b"?" + b"&".join(parts)


def version_string() -> str:
    return __version__


def is_console_path(path: bytes) -> bool:
    from e2a.console import routes as console_routes  # imported late: the console imports the API's modules

    return console_routes.is_console_path(path)


def error_page(request: Request, status: int, title: str, text: str) -> Any:
    from twisted.internet.defer import Deferred

    from e2a.console import routes as console_routes

    return Deferred.fromCoroutine(console_routes.error_page(request, status, title, text))
