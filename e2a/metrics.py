"""Prometheus metrics (``GET /metrics``, api.md §3.3) and usage events (``usage.tracking``).

Why one object per process, injected: the composition root (e2a/service.py) builds one
:class:`E2AMetrics` and hands it to the SMTP factory, the inbound pipeline, the send service,
the reviewer notifier and the two workers as their ``metrics`` attribute; their call sites are one line each
(``metrics_of(self).…``). Nothing uses ``prometheus_client``'s global default registry, so two
services in one test process (the cross-process tests) never share counters, and an object
built without a service (unit tests) counts into :data:`NO_METRICS`, which nobody scrapes.

Label values come only from the fixed sets below; an unexpected value is mapped to ``other``
(never passed through), so no address, domain, URL, id or subject can become a label.

With ``processes: N`` a scrape reaches whichever process accepts the connection (they share
one listening socket), so per-process targets are impossible: counters go through
``prometheus_client``'s multiprocess mode instead, one memory-mapped file per process in
``<data_dir>/metrics`` (emptied by the parent at start), and every process's ``/metrics``
aggregates all files. The database gauges (queue depths, holds) are read at scrape time
and are the same from every process.
"""

from __future__ import annotations

import hmac
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily

from e2a.store.gauges import QueueDepths

__all__ = [
    "HTTP_METHODS",
    "NO_METRICS",
    "OTHER",
    "E2AMetrics",
    "MetricsResource",
    "metrics_of",
    "route_template",
    "status_class",
    "webhook_outcome",
]

OTHER = "other"
SMTP_CONNECTION_RESULTS = ("accepted", "refused")
SMTP_MESSAGE_RESULTS = ("accepted", "rejected", "tempfail")
INBOUND_ROUTES = ("smtp", "internal")
WEBHOOK_OUTCOMES = ("success", "http_error", "timeout", "connect_error", "blocked")
OUTBOUND_ROUTES = ("smtp", "internal")
OUTBOUND_OUTCOMES = ("sent", "deferred", "failed")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"

#: Sub-directory of ``data_dir`` holding the per-process files of ``processes: N``.
MULTIPROCESS_DIR = "metrics"

# HTTP latency buckets: API calls are milliseconds; sends with attachments and long polls more.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# ---- pure label rules ------------------------------------------------------------------------


def status_class(code: int | None) -> str:
    """``200`` → ``2xx``; anything outside 100–599 → ``other``."""
    if code is None or not 100 <= int(code) <= 599:
        return OTHER
    return f"{int(code) // 100}xx"


def smtp_message_result(code: int) -> str:
    """The reply to end of DATA: 2xx accepted, 4xx tempfail, 5xx rejected."""
    return {2: "accepted", 4: "tempfail", 5: "rejected"}.get(int(code) // 100, OTHER)


def webhook_outcome(status: int | None, error: str) -> str:
    """An attempt's outcome label from what the client reported (e2a.delivery.webhook.AttemptResult).

    A response of any status: 2xx success, else http_error. No response: ``timeout``; refused by
    the SSRF rules (blocked address or a URL that is not allowed) ``blocked``; everything else
    (DNS failure, refused or reset connection, TLS) ``connect_error``.
    """
    if status is not None:
        return "success" if 200 <= status <= 299 else "http_error"
    text = error.lower()
    if text == "timeout":
        return "timeout"
    if "blocked" in text or "invalid webhook url" in text:
        return "blocked"
    return "connect_error"


def _pick(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def route_template(url_map: Any, path: bytes, method: bytes) -> str:
    """The matched route as a template (``/api/v1/agents/{email}``), ``unmatched`` when none
    matches: a bounded set, whatever the client sends."""
    from werkzeug.exceptions import HTTPException, MethodNotAllowed

    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        return UNMATCHED_ROUTE
    adapter = url_map.bind("e2a")
    try:
        rule, _ = adapter.match(text, method=method.decode("latin-1"), return_rule=True)
    except MethodNotAllowed as e:
        methods = sorted(e.valid_methods or [])
        if not methods:
            return UNMATCHED_ROUTE
        try:
            rule, _ = adapter.match(text, method=methods[0], return_rule=True)
        except HTTPException:
            return UNMATCHED_ROUTE
    except HTTPException:
        return UNMATCHED_ROUTE
    return _CONVERTER.sub(r"{\1}", rule.rule)


# ---- the metrics object ----------------------------------------------------------------------


class _DepthCollector:
    """The database gauges, from the reading taken just before the exposition is generated."""

    def __init__(self) -> None:
        self.depths = QueueDepths()

    def collect(self) -> Iterable[Any]:
        d = self.depths
        webhook = GaugeMetricFamily(
            "e2a_webhook_queue_depth", "Webhook delivery jobs waiting, by status.", labels=["status"]
        )
        webhook.add_metric(["pending"], d.webhook_pending)
        webhook.add_metric(["paused"], d.webhook_paused)
        yield webhook
        yield GaugeMetricFamily("e2a_outbound_queue_depth", "Relay recipients queued or deferred.", value=d.outbound)
        yield GaugeMetricFamily("e2a_hitl_pending", "Outbound messages held for review.", value=d.hitl_pending)


class E2AMetrics:
    """One process's counters, plus the ``usage.tracking`` switch the same call sites need.

    Args:
        usage_tracking: record usage events (e2a.store.usage) in the transactions that store
            inbound copies and release outbound messages.
        multiprocess_dir: ``processes: N`` only — the shared directory of per-process files
            (see the module docstring). The caller has switched ``prometheus_client`` to
            multiprocess mode (:func:`enable_multiprocess`) before building this.
    """

    def __init__(self, *, usage_tracking: bool = False, multiprocess_dir: str | None = None) -> None:
        self.usage_tracking = usage_tracking
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.smtp_connections = Counter(
            "e2a_smtp_connections_total", "SMTP connections, by admission.", ["result"], registry=r
        )
        self.smtp_messages = Counter(
            "e2a_smtp_messages_total", "Messages at end of DATA, by reply class.", ["result"], registry=r
        )
        self.inbound_stored = Counter(
            "e2a_inbound_stored_total", "Inbound copies committed, by route.", ["route"], registry=r
        )
        self.webhook_attempts = Counter(
            "e2a_webhook_attempts_total", "Webhook POST attempts, by outcome.", ["outcome"], registry=r
        )
        self.outbound_recipients = Counter(
            "e2a_outbound_recipients_total", "Outbound recipient outcomes.", ["route", "outcome"], registry=r
        )
        self.http_requests = Counter(
            "e2a_http_requests_total", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "e2a_http_request_seconds", "HTTP request duration.", ["route", "method"], buckets=_HTTP_BUCKETS,
            registry=r,
        )
        # Sampled (see sample_websockets); "livesum" adds up the processes that are alive.
        self.websockets = Gauge(
            "e2a_websocket_connections", "Open agent WebSockets.", registry=r, multiprocess_mode="livesum"
        )
        # Every fixed label value starts at 0, so a series exists (and can "move") from the start.
        for v in SMTP_CONNECTION_RESULTS:
            self.smtp_connections.labels(v)
        for v in SMTP_MESSAGE_RESULTS:
            self.smtp_messages.labels(v)
        for v in INBOUND_ROUTES:
            self.inbound_stored.labels(v)
        for v in WEBHOOK_OUTCOMES:
            self.webhook_attempts.labels(v)
        for route in OUTBOUND_ROUTES:
            for v in OUTBOUND_OUTCOMES:
                self.outbound_recipients.labels(route, v)
        self._depths = _DepthCollector()
        self._websocket_count: Callable[[], int] | None = None
        if multiprocess_dir is None:
            self.registry.register(self._depths)

    # -- call sites (one line each in the code they observe) ------------------------------------

    def smtp_connection(self, accepted: bool) -> None:
        self.smtp_connections.labels("accepted" if accepted else "refused").inc()

    def smtp_message(self, code: int) -> None:
        self.smtp_messages.labels(smtp_message_result(code)).inc()

    def webhook_attempt(self, result: Any) -> None:
        """``result``: an e2a.delivery.webhook.AttemptResult."""
        self.webhook_attempts.labels(webhook_outcome(result.status, result.error or "")).inc()

    def outbound_recipient(self, route: str, outcome: str) -> None:
        self.outbound_recipients.labels(_pick(route, OUTBOUND_ROUTES), _pick(outcome, OUTBOUND_OUTCOMES)).inc()

    async def stored_copy_txn(self, txn: Any, route: str, agent_id: str) -> None:
        """An inbound copy for ``agent_id`` was inserted in ``txn``: count it once committed and
        record its usage event in the same transaction."""
        counter = self.inbound_stored.labels(_pick(route, INBOUND_ROUTES))
        txn.call_after(counter.inc)
        if self.usage_tracking:
            from e2a.store import usage

            await usage.record_txn(txn, agent_id, "inbound")

    async def internal_copy_txn(self, txn: Any, agent_id: str) -> None:
        """One internal-route recipient of a release: an outbound recipient sent at once and the
        inbound copy it became."""
        txn.call_after(self.outbound_recipients.labels("internal", "sent").inc)
        await self.stored_copy_txn(txn, "internal", agent_id)

    async def released_txn(self, txn: Any, agent_id: str) -> None:
        """An outbound message of ``agent_id`` was released (sent now or approved) in ``txn``."""
        if self.usage_tracking:
            from e2a.store import usage

            await usage.record_txn(txn, agent_id, "outbound")

    def observe_http(self, route: str, method: bytes, code: int | None, seconds: float) -> None:
        m = method.decode("latin-1", "replace")
        m = m if m in HTTP_METHODS else OTHER
        self.http_requests.labels(route, m, status_class(code)).inc()
        self.http_seconds.labels(route, m).observe(seconds)

    # -- gauges --------------------------------------------------------------------------------

    def watch_websockets(self, count: Callable[[], int]) -> None:
        """Where this process's open WebSocket count comes from (sampled, never pushed)."""
        self._websocket_count = count

    def sample_websockets(self) -> None:
        if self._websocket_count is not None:
            self.websockets.set(self._websocket_count())

    # -- exposition ----------------------------------------------------------------------------

    async def exposition(self, db: Any) -> bytes:
        """The text exposition of this process, or of all processes with ``processes: N``."""
        from e2a.store.gauges import queue_depths

        self._depths.depths = await queue_depths(db) if db is not None else QueueDepths()
        self.sample_websockets()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        _forget_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(self._depths)
        return generate_latest(registry)


class _NoMetrics(E2AMetrics):
    """What objects built outside the composition root count into (never exposed)."""


#: The fallback of :func:`metrics_of`.
NO_METRICS: E2AMetrics = _NoMetrics()


def metrics_of(obj: Any) -> E2AMetrics:
    """``obj.metrics`` when the composition root set one, else :data:`NO_METRICS`."""
    return getattr(obj, "metrics", None) or NO_METRICS


# ---- processes: N ----------------------------------------------------------------------------


def multiprocess_dir(data_dir: str | os.PathLike[str]) -> str:
    return str(Path(data_dir).resolve() / MULTIPROCESS_DIR)


def enable_multiprocess(path: str, *, reset: bool) -> None:
    """Switch this process's ``prometheus_client`` to multiprocess mode writing into ``path``.

    Must run before any metric is built (values pick their storage when created). ``reset``
    (the parent, before it starts the children): remove the files of an earlier run, so counters
    start at zero with the service as they do with one process.
    """
    from prometheus_client import values

    if reset:
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()


_LIVE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")


def _forget_dead_processes(path: str) -> None:
    """Drop the "live" gauge files of processes that are gone (a restarted child), so their last
    WebSocket count is not added forever. Counter files stay: counts are never lost."""
    from prometheus_client import multiprocess

    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        m = _LIVE_FILE.match(name)
        if m and not _alive(int(m.group(1))):
            multiprocess.mark_process_dead(int(m.group(1)), path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- HTTP ------------------------------------------------------------------------------------


class MetricsResource:
    """Wraps the API's root resource: times each request and counts it when it finishes.

    Twisted calls ``render`` on the (leaf) root for every request; the outcome is read when the
    response is finished (or the connection is lost), so errors written by any handler count.
    """

    isLeaf = True

    def __init__(self, inner: Any, url_map: Any, metrics: E2AMetrics) -> None:
        self.inner = inner
        self.url_map = url_map
        self.metrics = metrics

    def render(self, request: Any) -> Any:
        started = time.perf_counter()
        route = route_template(self.url_map, request.path, request.method)

        def done(_: Any) -> None:
            self.metrics.observe_http(route, request.method, request.code, time.perf_counter() - started)

        request.notifyFinish().addBoth(done)
        return self.inner.render(request)

    # twisted.web.resource.IResource, for Site
    def getChildWithDefault(self, path: bytes, request: Any) -> Any:  # noqa: N802 - Twisted API
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # noqa: N802 - Twisted API
        raise NotImplementedError


def instrument_site(site: Any, url_map: Any, metrics: E2AMetrics) -> Any:
    """``site`` with its resource wrapped by :class:`MetricsResource` (returns ``site``)."""
    site.resource = MetricsResource(site.resource, url_map, metrics)
    return site


# ---- the route -------------------------------------------------------------------------------


def bearer_ok(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>`` with exactly ``token`` (constant-time comparison)."""
    if not token:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def install(router: Any, deps: Any) -> None:
    """``GET /metrics`` (api.md §3.3) on the API router; not routed at all (404) when
    ``metrics.enabled`` is false."""
    config = deps.config.metrics
    if not config.enabled:
        return
    metrics = deps.services.metrics

    @router.route("/metrics", methods=["GET"])
    async def scrape(request: Any) -> bytes:
        from e2a.api.http import header_str

        if not bearer_ok(header_str(request, "Authorization"), config.token):
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="metrics"')
            return b"unauthorized\n"
        body = await metrics.exposition(deps.db)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return body
