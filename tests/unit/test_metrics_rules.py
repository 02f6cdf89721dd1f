"""The label rules of e2a.metrics: every value comes from a fixed set (api.md §3.3)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2a.metrics import (
    E2AMetrics,
    bearer_ok,
    route_template,
    smtp_message_result,
    status_class,
    webhook_outcome,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(101, "1xx"), (200, "2xx"), (204, "2xx"), (302, "3xx"), (404, "4xx"), (503, "5xx"), (None, "other"), (99, "other"),
     (600, "other")],
)
def test_status_class_maps_codes_to_classes(code, expected):
    """HTTP status → its class; anything else → other."""
    assert status_class(code) == expected


@pytest.mark.parametrize(("code", "expected"), [(250, "accepted"), (451, "tempfail"), (421, "tempfail"), (550, "rejected"),
                                                (554, "rejected")])
def test_smtp_message_result_follows_reply_class(code, expected):
    """The end-of-DATA reply decides accepted / tempfail / rejected."""
    assert smtp_message_result(code) == expected


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, "", "success"),
        (299, "", "success"),
        (500, "HTTP 500", "http_error"),
        (302, "HTTP 302 (redirect not followed)", "http_error"),
        (None, "timeout", "timeout"),
        (None, "address is blocked", "blocked"),
        (None, "invalid webhook URL", "blocked"),
        (None, "DNS failure", "connect_error"),
        (None, "connection refused", "connect_error"),
    ],
)
def test_webhook_outcome_from_attempt_result(status, error, expected):
    """An attempt result becomes one of the five outcomes."""
    assert webhook_outcome(status, error) == expected


def test_route_template_never_passes_the_path_through():
    """A matched path becomes its template; anything else is ``unmatched``."""
    from klein import Klein

    app = Klein()

    @app.route("/api/v1/agents/<path:email>", methods=["GET"])
    def agent(request):  # pragma: no cover - never rendered
        return b""

    assert route_template(app.url_map, b"/api/v1/agents/bob@x.test", b"GET") == "/api/v1/agents/{email}"
    assert route_template(app.url_map, b"/api/v1/agents/bob@x.test", b"DELETE") == "/api/v1/agents/{email}"
    assert route_template(app.url_map, b"/secret/bob@x.test", b"GET") == "unmatched"
    assert route_template(app.url_map, b"/\xff", b"GET") == "unmatched"


def test_observe_http_maps_unknown_methods_to_other():
    """A made-up method is counted as ``other``, never as itself."""
    m = E2AMetrics()
    m.observe_http("unmatched", b"BREW", 405, 0.01)
    text = __import__("prometheus_client").generate_latest(m.registry).decode()
    assert "BREW" not in text and 'method="other"' in text


def test_outbound_labels_outside_the_sets_become_other():
    """A route or outcome not in the fixed sets is counted as ``other``."""
    m = E2AMetrics()
    m.outbound_recipient("carrier-pigeon@x", "lost")
    families = {f.name: f for f in text_string_to_metric_families(
        __import__("prometheus_client").generate_latest(m.registry).decode())}
    labels = [s.labels for s in families["e2a_outbound_recipients"].samples if s.value]
    assert labels == [{"route": "other", "outcome": "other"}]


@pytest.mark.parametrize(
    ("header", "token", "ok"),
    [(None, "", True), (None, "t", False), ("Bearer t", "t", True), ("Bearer u", "t", False), ("Basic t", "t", False),
     ("Bearer ", "t", False)],
)
def test_bearer_ok_requires_exact_token(header, token, ok):
    """metrics.token: the exact bearer, or anything when no token is set."""
    assert bearer_ok(header, token) is ok
