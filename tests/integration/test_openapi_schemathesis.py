"""Schemathesis against the real server: every operation of e2a/api/openapi.json, positive and
negative examples, with a user-scoped and an agent-scoped key. No 5xx, and every response
conforms to the document (status code, content type, headers, body schema); requests that
break the document are refused with a 4xx.

The server is the whole service (as twistd runs it) on the test PostgreSQL; schemathesis is
synchronous (requests + Hypothesis), so it runs in a thread while the reactor serves.
Everything stays on 127.0.0.1: a loopback DNS zone answers every lookup (NXDOMAIN), outbound
mail goes to a local SMTP sink and webhooks to a local receiver.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
import treq

from twisted.internet import reactor, threads
from twisted.web import resource, server

from e2a.api import openapi_doc
from e2a.config import DnsConfig, OutboundSmtpConfig, RateLimitConfig, WebhooksConfig
from e2a.store import accounts
from tests.support.dnsserver import start_dns_server
from tests.support.smtpsink import start_smtp_sink

pytestmark = pytest.mark.timeout(300)

# Examples per operation, per key and per generation mode (positive, negative). With ~40
# operations this is ~800 requests, about a minute on a small shared machine.
EXAMPLES = 6
HIGH = 1_000_000


class _Receiver(resource.Resource):
    isLeaf = True

    def render_POST(self, request):  # noqa: N802 - twisted.web API
        request.setResponseCode(204)
        return b""


@dataclass
class Seed:
    """Objects the run pins path parameters to, so examples reach real rows, not only 404s."""

    user_key: str
    agent_key: str
    agent_key_id: str
    local_agent: str
    cloud_agent: str
    spare_agent: str
    inbound_id: str
    cloud_inbound_id: str
    outbound_id: str
    held_id: str
    spare_secret_id: str
    domain: str


@dataclass
class Report:
    operations: set[str] = field(default_factory=set)
    examples: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "user key 2xx" → count
    failures: list[str] = field(default_factory=list)


async def _call(base: str, method: str, path: str, key: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    resp = await treq.request(
        method, base + path, data=data, headers={"Authorization": f"Bearer {key}"}, persistent=False
    )
    content = await treq.content(resp)
    assert resp.code < 300, (method, path, resp.code, content)
    return json.loads(content) if content else None


async def _seed(service: Any, base: str, webhook: str) -> Seed:
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    key = boot.api_key_plaintext
    for slug, extra in (
        ("alpha", {"agent_mode": "local"}),
        ("beta", {"webhook_url": webhook}),
        ("gamma", {"agent_mode": "local"}),
    ):
        await _call(base, "POST", "/api/v1/agents", key, {"slug": slug, **extra})
    alpha, beta, gamma = "alpha@agents.test", "beta@agents.test", "gamma@agents.test"
    test = await _call(base, "POST", f"/api/v1/agents/{alpha}/test", key)
    await _call(base, "POST", "/api/v1/send", key, {"from": alpha, "to": [beta], "subject": "hello", "body": "hi"})
    inbound = (await _call(base, "GET", f"/api/v1/agents/{alpha}/messages?status=all", key))["messages"][0]
    cloud_inbound = (await _call(base, "GET", f"/api/v1/agents/{beta}/messages?status=all", key))["messages"][0]
    await _call(base, "PUT", f"/api/v1/agents/{gamma}", key, {"hitl_enabled": True})
    held = await _call(
        base,
        "POST",
        "/api/v1/send",
        key,
        {"from": gamma, "to": ["someone@example.net"], "subject": "held", "body": "wait"},
    )
    agent_key = await _call(base, "POST", "/api/v1/keys", key, {"name": "agent", "agent": alpha})
    secret = await _call(base, "POST", "/api/v1/users/me/signing-secrets", key, {"name": "spare"})
    domain = await _call(base, "POST", "/api/v1/domains", key, {"domain": "example.org"})
    return Seed(
        user_key=key,
        agent_key=agent_key["key"],
        agent_key_id=agent_key["id"],
        local_agent=alpha,
        cloud_agent=beta,
        spare_agent=gamma,
        inbound_id=inbound["message_id"],
        cloud_inbound_id=cloud_inbound["message_id"],
        outbound_id=test["message_id"],
        held_id=held["message_id"],
        spare_secret_id=secret["id"],
        domain=domain["domain"],
    )


def _pinned(op_path: str, method: str, seed: Seed) -> list[dict[str, str]]:
    """Path parameters naming real objects for this operation (each tried besides random ones)."""
    if "{email}" in op_path:
        agents = [seed.local_agent, seed.cloud_agent]
        if method == "delete":
            agents = [seed.spare_agent]
        ids = [seed.inbound_id, seed.cloud_inbound_id] if "{id}" in op_path else [None]
        return [{"email": a, **({"id": i} if i else {})} for a in agents for i in ids]
    if op_path.startswith("/api/v1/messages/{id}"):
        return [{"id": seed.held_id if op_path.endswith(("approve", "reject")) else seed.outbound_id}]
    if op_path == "/api/v1/keys/{id}":
        return [{"id": seed.agent_key_id}]
    if op_path == "/api/v1/users/me/signing-secrets/{id}":
        return [{"id": seed.spare_secret_id}]
    if "{domain}" in op_path:
        return [{"domain": seed.domain}]
    return []


def accepted_by_design(failure: BaseException, label: str) -> bool:
    """A negative request the contract accepts on purpose: unknown query parameters are
    ignored, and the WebSocket takes its key from ``?token=`` when the header is absent."""
    if type(failure).__name__ != "AcceptedNegativeData":
        return False
    message = str(getattr(failure, "message", ""))
    if "Invalid component:" not in message:
        return False
    component = message.split("Invalid component:", 1)[1]
    bullets = [line.strip()[2:] for line in component.splitlines() if line.strip().startswith("- ")]
    parts = bullets or [component.strip()]
    return all(
        ("query" in part and "additionalProperties" in part)
        or ("(was Authorization)" in part and label.endswith("/ws"))
        for part in parts
    )


def real_failures(exc: BaseException, label: str) -> list[BaseException]:
    return [f for f in (getattr(exc, "exceptions", None) or (exc,)) if not accepted_by_design(f, label)]


def _describe(tag: str, response: Any, failures: list[BaseException]) -> str:
    what = "; ".join(
        f"{getattr(f, 'title', type(f).__name__)}: {' '.join(str(getattr(f, 'message', f)).split())[:300]}"
        for f in failures
    )
    request = response.request
    return f"{tag} {request.method} {request.url} -> {response.status_code} {response.text[:200]!r}: {what}"


def _order(operations: list[Any]) -> list[Any]:
    """Non-destructive operations first, deletions next, deleting the user last."""

    def rank(op: Any) -> tuple[int, str]:
        if op.path == "/api/v1/users/me":
            return (2, op.label)
        return (1 if op.method.lower() == "delete" else 0, op.label)

    return sorted(operations, key=rank)


def _explore(
    strategy: Any,
    tag: str,
    label: str,
    base: str,
    session: Any,
    headers: dict[str, str],
    checks: list[Any],
    report: Report,
) -> None:
    """One Hypothesis run of ``EXAMPLES`` cases; every failed check is recorded (not raised), so
    the run goes on and the report lists everything at once."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(base_url=base, session=session, headers=headers, timeout=30)
        report.examples += 1
        report.operations.add(label)
        klass = f"{tag.split('[', 1)[1].split(' key')[0]} key {response.status_code // 100}xx"
        report.statuses[klass] = report.statuses.get(klass, 0) + 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # FailureGroup is a BaseExceptionGroup
            failures = real_failures(exc, label)
            if failures:
                report.failures.append(_describe(tag, response, failures))

    check()


def run_schemathesis(base: str, seed: Seed, skip: set[tuple[str, str]], report: Report) -> None:
    """Blocking: the whole schemathesis run (called in a thread)."""
    import requests
    import schemathesis
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    conformance = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_dict(openapi_doc.load_document())
    session = requests.Session()
    operations = _order([r.ok() for r in schema.get_all_operations()])
    for op in operations:
        if (op.method.upper(), op.path) in skip:
            continue
        auth = op.definition.raw.get("x-e2a-auth")
        keys = (
            [("agent", seed.agent_key), ("user", seed.user_key)]
            if auth in ("key", "user", "optional")
            else [("no", None)]
        )
        pins = _pinned(op.path, op.method.lower(), seed)
        for key_name, key in keys:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE):
                strategies = [op.as_strategy(generation_mode=mode)]
                strategies += [op.as_strategy(generation_mode=mode, path_parameters=pin) for pin in pins]
                tag = f"{op.label} [{key_name} key, {mode.value}]"
                checks = conformance + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
                try:
                    _explore(st.one_of(*strategies), tag, op.label, base, session, headers, checks, report)
                except Unsatisfiable:
                    pass  # negative mode: nothing in this operation can be made invalid


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(e2a_service_factory, capsys):
    """Every documented operation, user and agent key, positive and negative examples: zero 5xx
    and zero responses outside the document."""
    dns = await start_dns_server(reactor, {})
    sink = await start_smtp_sink(reactor)
    hook = reactor.listenTCP(0, server.Site(_Receiver()), interface="127.0.0.1")
    try:
        service = await e2a_service_factory(
            rate_limits=RateLimitConfig(
                send_per_minute=HIGH, register_per_hour=HIGH, poll_per_minute=HIGH, feedback_per_hour=HIGH
            ),
            dns=DnsConfig(nameservers=(f"127.0.0.1:{dns.port}",), timeout=1),
            outbound_smtp=OutboundSmtpConfig(host="127.0.0.1", port=sink.port, tls="none"),
            webhooks=WebhooksConfig(allow_private=True),
        )
        base = f"http://127.0.0.1:{service.http_port.getHost().port}"
        seed = await _seed(service, base, f"http://127.0.0.1:{hook.getHost().port}/hook")
        skip = set()
        probe = await treq.get(base + "/metrics", persistent=False)
        await treq.content(probe)
        if probe.code == 404:
            skip.add(("GET", "/metrics"))  # not served by this build
        report = Report()
        started = time.monotonic()
        await threads.deferToThread(run_schemathesis, base, seed, skip, report)
        elapsed = time.monotonic() - started
    finally:
        await hook.stopListening()
        await sink.stop()
        await dns.stop()
    with capsys.disabled():
        print(
            f"\nschemathesis: {len(report.operations)} operations, {report.examples} examples "
            f"in {elapsed:.0f} s; answers {dict(sorted(report.statuses.items()))}"
            + (f"; skipped {sorted(skip)}" if skip else "")
        )
        shown: set[str] = set()
        for failure in report.failures:  # one line per operation and kind of failure
            kind = failure.split(" [", 1)[0] + failure.rsplit(": ", 2)[-2][-60:]
            if kind not in shown and len(shown) < 40:
                shown.add(kind)
                print("  FAIL", failure[:1200])
    assert not report.failures, f"{len(report.failures)} failing examples (listed above)"
    documented = sum(1 for item in openapi_doc.load_document()["paths"].values() for m in item if m != "parameters")
    assert len(report.operations) == documented - len(skip)
