"""The OpenAPI document cannot drift: it names exactly the routes of the real app, and the
committed openapi.json and docs/api-reference.md equal what the generator makes now."""

from __future__ import annotations

import json
import re
from pathlib import Path

from twisted.internet import task

from e2a.api import openapi_doc
from e2a.api.app import HEAD_PATHS, ApiApp, ApiDeps
from e2a.metrics import E2AMetrics
from e2a.service import Secrets, build_api_services
from tests.support.apiserver import make_test_config

ROOT = Path(__file__).resolve().parents[2]
DOC_METHODS = ("get", "head", "post", "put", "delete", "patch", "options")

# Operations of the document that the Klein router does not route, with the reason.
NOT_IN_ROUTER: dict[tuple[str, str], str] = {}
# Router rules that the document leaves out on purpose, with the reason.
NOT_IN_DOCUMENT: dict[tuple[str, str], str] = {
    ("GET", "/"): "sends a browser to the web console; not an API operation",
}
# Whole path prefixes left out, with the reason.
NOT_IN_DOCUMENT_PREFIXES = {
    "/console": "the web console: HTML pages and forms for people, signed in with a console "
    "session; a user interface, not part of the HTTP API contract",
}


def _left_out(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in NOT_IN_DOCUMENT_PREFIXES)
# The web console (e2a/console): HTML pages for people, not part of the API contract.
CONSOLE_REASON = "web console HTML page (docs/decisions.md, Web console), not an API operation"
NOT_IN_DOCUMENT.update(dict.fromkeys([
    ('GET', '/'), ('GET', '/console'), ('GET', '/console/'), ('GET', '/console/account'),
    ('GET', '/console/account/export'), ('GET', '/console/agents/{}'), ('GET', '/console/agents/{}/messages/{}'),
    ('GET', '/console/agents/{}/messages/{}/raw'), ('GET', '/console/approvals'), ('GET', '/console/approvals/{}'),
    ('GET', '/console/domains'), ('GET', '/console/keys'), ('GET', '/console/login'), ('GET', '/console/signin'),
    ('GET', '/console/static/{}'), ('GET', '/console/{}'), ('POST', '/console/account/delete'),
    ('POST', '/console/agents'), ('POST', '/console/agents/{}/messages/{}/redeliver'),
    ('POST', '/console/agents/{}/settings'), ('POST', '/console/approvals/{}/approve'),
    ('POST', '/console/approvals/{}/reject'), ('POST', '/console/domains'), ('POST', '/console/domains/{}/delete'),
    ('POST', '/console/domains/{}/verify'), ('POST', '/console/keys'), ('POST', '/console/keys/{}/revoke'),
    ('POST', '/console/login'), ('POST', '/console/secrets'), ('POST', '/console/secrets/{}/revoke'),
    ('POST', '/console/signin'), ('POST', '/console/signout'),
], CONSOLE_REASON))


def _real_app() -> ApiApp:
    """The app exactly as the service builds it (route installation touches no database)."""
    config, clock = make_test_config(), task.Clock()
    services = build_api_services(
        object(), config, Secrets(master_key=bytes(32), hmac_secret=""), clock,  # type: ignore[arg-type]
        pool=None, metrics=E2AMetrics(),
    )
    return ApiApp(ApiDeps(config=config, db=object(), clock=clock, services=services))  # type: ignore[arg-type]


def _template(rule: str) -> str:
    """Klein ``/a/<path:email>/b/<message_id>`` → ``/a/{}/b/{}`` (names differ, shapes must not)."""
    return re.sub(r"<(?:[a-z_]+:)?[a-z_]+>", "{}", rule)


def _doc_template(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "{}", path)


def router_operations() -> dict[tuple[str, str], str]:
    """(METHOD, path template) → Klein rule, for every route of the real app. HEAD is counted
    only where the app answers it (werkzeug adds HEAD to every GET rule; app.py refuses the
    others). A rule without a method list (the magic-link pages, which answer every method
    themselves) is reported with method ``*``."""
    out = {}
    for rule in _real_app().router.url_map.iter_rules():
        path = _template(rule.rule)
        if rule.methods is None:
            out[("*", path)] = rule.rule
            continue
        for method in rule.methods:
            if method == "HEAD" and path.encode() not in HEAD_PATHS:
                continue
            out[(method, path)] = rule.rule
    return out


def document_operations(doc: dict) -> dict[tuple[str, str], str]:
    out = {}
    for path, item in doc["paths"].items():
        for method in DOC_METHODS:
            if method in item:
                out[(method.upper(), _doc_template(path))] = path
    return out


def test_every_route_is_documented_and_every_operation_routed():
    """Router rules and document operations are the same set, up to the reasoned allow-lists."""
    doc = openapi_doc.load_document()
    routed = router_operations()
    documented = document_operations(doc)
    wildcard_paths = {path for (method, path) in routed if method == "*"}

    undocumented = sorted(
        (m, p)
        for (m, p) in routed
        if m != "*" and (m, p) not in documented and (m, p) not in NOT_IN_DOCUMENT and not _left_out(p)
    )
    undocumented += sorted(("*", p) for p in wildcard_paths if not any(dp == p for (_m, dp) in documented))
    assert not undocumented, f"routes missing from e2a/api/openapi_spec.py: {undocumented}"

    unrouted = sorted(
        (m, p)
        for (m, p) in documented
        if (m, p) not in routed and p not in wildcard_paths and (m, p) not in NOT_IN_ROUTER
    )
    assert not unrouted, f"documented operations the app does not route: {unrouted}"


def test_allow_lists_hold_only_real_exceptions():
    """An allow-listed exception that is no longer one (the route appeared, or left the
    document) must be removed from the list, so the lists cannot rot."""
    routed = router_operations()
    documented = document_operations(openapi_doc.load_document())
    assert not [k for k in NOT_IN_ROUTER if k in routed or k not in documented]
    assert not [k for k in NOT_IN_DOCUMENT if k in documented or k not in routed]
    for prefix in NOT_IN_DOCUMENT_PREFIXES:
        assert any(p == prefix or p.startswith(prefix + "/") for (_m, p) in routed), prefix
    assert not [p for (_m, p) in documented if _left_out(p)]


def test_head_operations_match_the_head_paths():
    """The document lists HEAD exactly on the paths where app.py answers it (api.md §0.6)."""
    doc = openapi_doc.load_document()
    head = {path.encode() for path, item in doc["paths"].items() if "head" in item}
    assert head == set(HEAD_PATHS)


def test_committed_openapi_json_is_current():
    """e2a/api/openapi.json equals a fresh generation (python -m e2a.api.openapi_doc)."""
    expected, _md = openapi_doc.expected_files()
    assert (ROOT / "e2a/api/openapi.json").read_text("utf-8") == expected, "run: python -m e2a.api.openapi_doc"


def test_committed_api_reference_is_current():
    """docs/api-reference.md equals a fresh rendering of the document."""
    _json, expected = openapi_doc.expected_files()
    assert (ROOT / "docs/api-reference.md").read_text("utf-8") == expected, "run: python -m e2a.api.openapi_doc"


def test_document_is_valid_openapi_31_when_loaded_by_schemathesis():
    """The document loads as OpenAPI 3.1 and every operation resolves (refs, parameters)."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(openapi_doc.load_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(
        1 for item in openapi_doc.load_document()["paths"].values() for m in DOC_METHODS if m in item
    )


def test_every_error_code_of_an_operation_is_in_the_error_table():
    """Each code an operation lists is a documented code with the same status."""
    doc = openapi_doc.load_document()
    table = {row["code"]: row["status"] for row in doc["x-e2a-error-codes"]}
    for path, item in doc["paths"].items():
        for method in DOC_METHODS:
            if method not in item:
                continue
            for status, codes in item[method].get("x-e2a-errors", {}).items():
                for code in codes:
                    assert code in table, (method, path, code)
                    assert status in table[code], (method, path, code, status)


def test_every_operation_has_auth_summary_and_responses():
    """The reference can say, for every operation, who may call it and what it answers."""
    doc = openapi_doc.load_document()
    for path, item in doc["paths"].items():
        for method in DOC_METHODS:
            if method in item:
                op = item[method]
                assert op["x-e2a-auth"] in openapi_doc.AUTH_TEXT, (method, path)
                assert op["summary"] and op["description"] and op["responses"], (method, path)


def test_served_document_is_the_shipped_file():
    """GET /api/openapi.json serves the packaged file byte for byte."""
    from e2a.api.service_routes import openapi_document

    assert openapi_document() == (ROOT / "e2a/api/openapi.json").read_bytes()
    json.loads(openapi_document())
