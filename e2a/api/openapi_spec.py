"""The OpenAPI 3.1 description of the HTTP API, written as Python data.

This module is the *source*; ``e2a/api/openapi.json`` (shipped in the wheel, served at
``GET /api/openapi.json``) and ``docs/api-reference.md`` are generated from it by
``python -m e2a.api.openapi_doc``, and tests fail when either is stale. It is written by hand
rather than derived from the routes because Klein routes carry no types: the contract (field
rules, error codes per endpoint, scopes) lives in prose, and small helpers here keep the
repetitive parts (error bodies, auth, timestamps) in one place. Three tests keep it honest:
the route-map drift guard, the committed-file checks, and a schemathesis run against the
real server.

Extensions used (ignored by OpenAPI tools, read by the reference generator):
``x-e2a-auth`` (``none`` | ``key`` | ``user`` | ``token`` | ``metrics``) and ``x-e2a-errors``
(status → error codes) on each operation; ``x-e2a-example`` (a request example).
"""

from __future__ import annotations

from typing import Any

API_VERSION = "v1"

TS_FRAC = {
    "type": "string",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$",
    "description": "RFC 3339 UTC with exactly 6 fractional digits (ts-frac)",
    "examples": ["2026-04-27T12:00:00.123456Z"],
}
TS_SEC = {
    "type": "string",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$",
    "description": "RFC 3339 UTC, whole seconds (ts-sec)",
    "examples": ["2026-04-27T12:00:00Z"],
}
MSG_ID = {"type": "string", "pattern": "^msg_[0-9a-f]{32}$", "examples": ["msg_0123456789abcdef0123456789abcdef"]}
STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR_LIST = {"type": "array", "items": STR}
# Header-bound text (api.md §0.11): no C0 control except TAB, no DEL.
HEADER_TEXT = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(
    required: dict[str, Any], optional: dict[str, Any] | None = None, *, strict: bool = True, description: str = ""
) -> dict[str, Any]:
    """A response object: ``required`` fields always present, ``optional`` ones omitted when
    unset; ``strict`` forbids any other field (the API never leaks extra fields)."""
    props = dict(required)
    props.update(optional or {})
    out: dict[str, Any] = {"type": "object", "properties": props, "required": list(required)}
    if strict:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


def req_obj(fields: dict[str, Any], required: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    """A request body object. ``null`` means absent and unknown fields are ignored (api.md
    §0.6), so every field also accepts ``null`` and extra fields are allowed."""
    props = {name: nullable(schema) for name, schema in fields.items()}
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return {
            "anyOf": [schema, {"type": "null"}],
            **({"description": schema["description"]} if "description" in schema else {}),
        }
    out = dict(schema)
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def d(schema: dict[str, Any], text: str) -> dict[str, Any]:
    """``schema`` with a description."""
    return {**schema, "description": text}


def enum(*values: str, text: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "enum": list(values)}
    if text:
        out["description"] = text
    return out


# ---------------------------------------------------------------------------- schemas

ATTACHMENT = obj(
    {
        "filename": d(STR, "1–255 chars, header-bound text rules"),
        "content_type": d(STR, "`type/subtype` with optional parameters; empty = application/octet-stream"),
        "data": d(STR, "standard base64 with padding, no whitespace"),
    },
    description="A file attached to an outgoing message. At most 100 per message.",
)
ATTACHMENT_IN = {
    "title": "Attachment",
    "type": "object",
    "properties": {
        "filename": STR,
        "content_type": STR,
        "data": STR,
    },
    "description": ATTACHMENT["description"],
}

SCHEMAS: dict[str, Any] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": d(STR, "stable snake_case code; what clients branch on"),
                    "message": d(STR, "human text; may change"),
                }
            )
        },
        description="The body of every non-2xx API response.",
    ),
    "Agent": obj(
        {
            "id": d(STR, "= email"),
            "domain": d(STR, "lowercase A-label"),
            "email": STR,
            "name": d(STR, '`""` when unset'),
            "webhook_url": d(STR, '`""` when unset'),
            "agent_mode": enum("cloud", "local"),
            "domain_verified": BOOL,
            "created_at": TS_FRAC,
            "hitl_enabled": d(BOOL, "default false"),
            "hitl_ttl_seconds": d({"type": "integer", "minimum": 1, "maximum": 604800}, "default 604800"),
            "hitl_expiration_action": enum("approve", "reject", text="default reject"),
            "hitl_notify": d(BOOL, "send reviewer notification emails; default true"),
            "hitl_reviewers": d(STR_LIST, "`[]` = the user's account email"),
            "webhook_status": enum(
                "active", "disabled", "none", text="`none` for local agents; `disabled` after a 410 from the webhook"
            ),
        },
        {"webhook_disabled_at": d(TS_FRAC, "only when `disabled`")},
        description="An agent: one email address that receives and sends mail.",
    ),
    "AgentCreated": obj({"id": STR, "domain": STR, "email": STR}),
    "Attachment": ATTACHMENT,
    "InboundSummary": obj(
        {
            "message_id": MSG_ID,
            "from": d(STR, "the single parseable Reply-To address, else the From address (not signed)"),
            "to": d(STR_LIST, "addresses of the To: header (≤ 100)"),
            "recipient": d(STR, "the agent address this copy was delivered to"),
            "subject": d(STR, "raw header text after unfolding; RFC 2047 words not decoded"),
            "status": enum("unread", "read"),
            "created_at": TS_SEC,
        },
        {
            "cc": d(STR_LIST, "addresses of the Cc: header; omitted when empty"),
            "conversation_id": d(STR, "omitted when none"),
        },
        description="An inbox list item.",
    ),
    "InboundDetail": obj(
        {
            "message_id": MSG_ID,
            "from": STR,
            "to": STR_LIST,
            "cc": d({"type": ["array", "null"], "items": STR}, "`null` when empty"),
            "recipient": STR,
            "subject": STR,
            "conversation_id": d(STR, '`""` when none'),
            "status": enum("unread", "read"),
            "created_at": TS_SEC,
            "auth_headers": d(
                {"type": "object", "additionalProperties": STR},
                "the signed `X-E2A-Auth-*` map as signed at receipt",
            ),
            "raw_message": d(STR, "standard base64 of the stored bytes (exactly the bytes that were hashed)"),
        },
        {
            "delivery": obj(
                {
                    "id": STR,
                    "status": enum("pending", "delivered", "failed", "paused"),
                    "attempts": INT,
                    "last_error": STR,
                },
                {"next_attempt_at": TS_FRAC},
                description="cloud agents only: the newest webhook delivery of this message",
            )
        },
        description="One inbound message.",
    ),
    "OutboundSummary": obj(
        {
            "id": MSG_ID,
            "agent_id": d(STR, "sending agent's address"),
            "direction": enum("outbound"),
            "subject": STR,
            "type": enum("send", "reply", "test"),
            "to": d({"type": ["array", "null"], "items": STR}, "normalised recipients; `null` when none"),
            "status": enum("sent", "pending_approval", "rejected", "expired_approved", "expired_rejected"),
            "created_at": TS_SEC,
        },
        {
            "conversation_id": d(STR, "omitted when empty"),
            "cc": d(STR_LIST, "omitted when empty"),
            "bcc": d(STR_LIST, "omitted when empty"),
            "approval_expires_at": d(TS_SEC, "held messages only"),
        },
        description="A held outbound message in the review list.",
    ),
    "Recipient": obj(
        {
            "address": STR,
            "kind": enum("to", "cc", "bcc"),
            "route": enum("internal", "smtp"),
            "status": enum("queued", "deferred", "sent", "failed"),
            "attempts": INT,
            "last_reply": d(STR, 'last SMTP reply line or error; may be `""`'),
            "updated_at": TS_FRAC,
        },
        description="Delivery state of one recipient of an outbound message.",
    ),
    "Delivery": obj(
        {
            "id": d(STR, "`dlv_` + 32 hex"),
            "message_id": MSG_ID,
            "agent_id": STR,
            "webhook_url": d(STR, "URL used for this delivery"),
            "status": enum("pending", "delivered", "failed", "paused"),
            "attempts": d(INT, "HTTP attempts made"),
            "last_error": d(STR, '`""` when none; never contains response bodies'),
            "created_at": TS_FRAC,
        },
        {
            "last_status_code": d(INT, "HTTP status of the last attempt; omitted if none was received"),
            "last_attempt_at": TS_FRAC,
            "next_attempt_at": TS_FRAC,
            "delivered_at": TS_FRAC,
        },
        description="One webhook delivery of an inbound message.",
    ),
    "Domain": obj(
        {
            "domain": d(STR, "lowercase A-label"),
            "verified": BOOL,
            "verification_token": d(
                {"type": "string", "pattern": "^e2a-verify=[0-9a-f]{32}$"}, "publish as TXT at the apex"
            ),
            "dns_records": obj(
                {
                    "mx": obj({"host": STR, "value": STR, "priority": INT}),
                    "txt": obj({"host": STR, "value": STR}),
                    "dkim": obj({"host": STR, "value": STR}),
                },
                description="records to publish: MX (inbound), TXT (verification), DKIM (outbound signing)",
            ),
            "created_at": TS_FRAC,
        },
        {"verified_at": d(TS_FRAC, "omitted until verified")},
        description="A custom domain.",
    ),
    "SendResult": obj(
        {
            "status": enum("sent", text="accepted and durably queued"),
            "message_id": MSG_ID,
            "smtp_message_id": d(STR, "`<msg_…@smtp-domain>`, the RFC 5322 Message-ID"),
            "method": enum("smtp", "internal", text="`internal` only when every recipient is an agent here"),
            "delivery_status": enum("queued", "sent", text="`sent` when all recipients were internal"),
        },
        {"provider_message_id": d(STR, "omitted until the upstream relay reports one")},
        description="The answer of send, reply and test email when the message is accepted.",
    ),
    "HoldResult": obj(
        {
            "status": enum("pending_approval"),
            "message_id": MSG_ID,
            "approval_expires_at": TS_FRAC,
        },
        description="202: the agent has HITL review on; nothing is sent until approval.",
    ),
}


# ---------------------------------------------------------------------------- responses

HEADERS: dict[str, Any] = {
    "NoSniff": {"schema": {"type": "string", "const": "nosniff"}, "required": True},
    "NoStore": {
        "schema": {"type": "string", "const": "no-store"},
        "required": True,
        "description": "on every authenticated response",
    },
    "WwwAuthenticate": {"schema": {"type": "string", "const": 'Bearer realm="e2a"'}, "required": True},
    "Allow": {"schema": STR, "required": True, "description": "the methods this path supports"},
    "RetryAfter": {"schema": STR, "required": True, "description": "seconds until a slot frees"},
    "FrameOptions": {"schema": {"type": "string", "const": "DENY"}, "required": True},
    "ReferrerPolicy": {"schema": {"type": "string", "const": "no-referrer"}, "required": True},
    "RobotsTag": {"schema": {"type": "string", "const": "noindex, nofollow"}, "required": True},
    "PageCsp": {
        "schema": {
            "type": "string",
            "const": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        },
        "required": True,
    },
}


def header_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


NOSNIFF = {"X-Content-Type-Options": header_ref("NoSniff")}
NO_STORE = {"Cache-Control": header_ref("NoStore")}
STATUS_TEXT = {
    400: "Bad request",
    401: "Missing or invalid API key",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition failed",
    426: "Upgrade required",
    429: "Rate limited",
    500: "Internal error",
    503: "Unavailable",
}


RESPONSES: dict[str, Any] = {}


def error_response(status: int, codes: list[str]) -> dict[str, Any]:
    """The error response for ``codes``; a response with one code is shared through
    ``components/responses`` (most endpoints repeat 401, 403, 405 and 503)."""
    if len(codes) == 1:
        name = f"{status}_{codes[0]}"
        RESPONSES[name] = _error_response(status, codes)
        return {"$ref": f"#/components/responses/{name}"}
    return _error_response(status, codes)


def _error_response(status: int, codes: list[str]) -> dict[str, Any]:
    body_schema: dict[str, Any] = {
        "allOf": [ref("Error")],
        "properties": {"error": {"properties": {"code": {"enum": codes}}}},
    }
    headers: dict[str, Any] = dict(NOSNIFF)
    if status == 401:
        headers["WWW-Authenticate"] = header_ref("WwwAuthenticate")
    if status == 405:
        headers["Allow"] = header_ref("Allow")
    if status == 429 and "too_many_connections" not in codes:
        headers["Retry-After"] = header_ref("RetryAfter")
    return {
        "description": f"{STATUS_TEXT[status]}: " + ", ".join(f"`{c}`" for c in codes),
        "headers": headers,
        "content": {"application/json": {"schema": body_schema}},
    }


def json_response(
    description: str,
    schema: dict[str, Any],
    *,
    authenticated: bool = True,
    headers: dict[str, Any] | None = None,
    example: Any = None,
) -> dict[str, Any]:
    hs = dict(NOSNIFF)
    if authenticated:
        hs.update(NO_STORE)
    hs.update(headers or {})
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "headers": hs, "content": {"application/json": media}}


def no_content(description: str) -> dict[str, Any]:
    return {"description": description, "headers": dict(NO_STORE)}


# ---------------------------------------------------------------------------- operations

BODY_ERRORS = ["invalid_request_body", "body_too_large"]


def operation(
    op_id: str,
    tag: str,
    summary: str,
    description: str,
    *,
    auth: str,
    responses: dict[int, dict[str, Any]],
    errors: dict[int, list[str]] | None = None,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_required: bool = False,
    example: Any = None,
    path_params: bool = False,
    db: bool = True,
) -> dict[str, Any]:
    """One operation. ``errors`` lists the codes of api.md for this endpoint; the errors every
    endpoint of its kind can give (401 for keyed routes, 403 ``insufficient_scope`` for
    user-only routes, 400 for JSON bodies, 503 ``unavailable``) are added here."""
    errs: dict[int, list[str]] = {k: list(v) for k, v in (errors or {}).items()}

    def add(status: int, *codes: str) -> None:
        have = errs.setdefault(status, [])
        for code in codes:
            if code not in have:
                have.append(code)

    if body is not None:
        add(400, *BODY_ERRORS)
    if auth in ("key", "user"):
        add(401, "unauthorized")
    if auth == "user":
        add(403, "insufficient_scope")
    if path_params:
        # a path parameter that decodes to something else (for example with a `/`) can land on
        # no route, or on another route that lacks this method
        add(404, "not_found")
        add(405, "method_not_allowed")
    if db:
        add(503, "unavailable")

    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "description": description.strip(),
        "x-e2a-auth": auth,
    }
    if auth == "none":
        op["security"] = []
    elif auth == "key":
        op["security"] = [{"apiKey": []}]
    elif auth == "user":
        op["security"] = [{"apiKey": ["user"]}]
    elif auth == "optional":
        op["security"] = [{}, {"apiKey": []}]
    elif auth == "token":
        op["security"] = []
    elif auth == "metrics":
        op["security"] = [{}, {"metricsToken": []}]
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": body}},
        }
        if example is not None:
            op["requestBody"]["content"]["application/json"]["example"] = example
    out: dict[str, Any] = {str(k): v for k, v in sorted(responses.items())}
    for status, codes in sorted(errs.items()):
        out[str(status)] = error_response(status, codes)
    op["responses"] = dict(sorted(out.items()))
    op["x-e2a-errors"] = {str(k): v for k, v in sorted(errs.items())}
    return op


def path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema or STR}


def query(name: str, description: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


EMAIL = path_param("email", "the agent's address; matched case-insensitively; `@` may be sent as `%40`")
MESSAGE_ID = path_param("id", "a message id `msg_…` (exact match)")
PAGE_PARAMS = [
    query(
        "page_size",
        "1–100, default 50; a missing, non-integer or out-of-range value becomes 50",
        {"type": ["integer", "string"], "default": 50},
    ),
    query("token", "the `next_token` of the previous page (opaque, ≤ 512 chars)", STR),
]

SEND_FIELDS_NOTE = (
    "Recipient addresses are RFC 5322 mailboxes (`Alice <alice@example.com>`; the display name is "
    "dropped, the address lowercased). The agent's own address is removed from the recipient lists."
)


def _paths() -> dict[str, dict[str, Any]]:
    p: dict[str, dict[str, Any]] = {}

    # ---------------------------------------------------------------- service
    health = json_response("alive", obj({"status": enum("ok")}), authenticated=False, example={"status": "ok"})
    p["/api/health"] = {
        "get": operation(
            "health",
            "Service",
            "Liveness",
            "Liveness only: answers without touching the database.",
            auth="none",
            responses={200: health},
            db=False,
        ),
        "head": operation(
            "healthHead",
            "Service",
            "Liveness (HEAD)",
            "As `GET`, without a body.",
            auth="none",
            responses={200: {"description": "alive"}},
            db=False,
        ),
    }
    p["/api/ready"] = {
        "get": operation(
            "ready",
            "Service",
            "Readiness",
            "200 when the database answers within 2 s and every migration is applied; otherwise 503 "
            "with the failing checks. Use it for load-balancer health checks.",
            auth="none",
            db=False,
            responses={
                200: json_response("ready", obj({"status": enum("ready")}), authenticated=False),
                503: json_response(
                    "not ready",
                    obj(
                        {
                            "status": enum("not_ready"),
                            "checks": obj({"database": enum("ok", "error"), "migrations": enum("ok", "pending")}),
                        }
                    ),
                    authenticated=False,
                    example={"status": "not_ready", "checks": {"database": "ok", "migrations": "pending"}},
                ),
            },
        )
    }
    p["/metrics"] = {
        "get": operation(
            "metrics",
            "Service",
            "Prometheus metrics",
            """
Prometheus text exposition (`e2a_smtp_*`, `e2a_inbound_*`, `e2a_webhook_*`, `e2a_outbound_*`,
`e2a_http_*`, `e2a_websocket_connections`, `e2a_hitl_pending`, …). Label values come from fixed
sets and never contain addresses, domains, URLs, ids or subjects. With `metrics.enabled: false`
the path does not exist (404 `not_found`). When `metrics.token` is set the scraper must send
`Authorization: Bearer <metrics.token>`, else 401 with a plain-text body.
""",
            auth="metrics",
            errors={404: ["not_found"]},
            responses={
                200: {"description": "text exposition format", "content": {"text/plain": {"schema": STR}}},
                401: {
                    "description": "`metrics.token` is set and was not sent (plain text)",
                    "content": {"text/plain": {"schema": STR}},
                },
            },
        )
    }
    p["/api/v1/info"] = {
        "get": operation(
            "info",
            "Service",
            "Deployment information",
            "Public facts about this deployment. An `Authorization` header is ignored.",
            auth="none",
            db=False,
            responses={
                200: json_response(
                    "deployment facts",
                    obj(
                        {
                            "shared_domain": d(STR, '`""` when unset'),
                            "slug_registration_enabled": d(BOOL, '`shared_domain != ""`'),
                            "version": d(STR, "server version"),
                        },
                        {"public_url": d(STR, "omitted when unset")},
                    ),
                    authenticated=False,
                    example={
                        "shared_domain": "agents.example.com",
                        "slug_registration_enabled": True,
                        "public_url": "https://e2a.example.com",
                        "version": "0.1.0",
                    },
                )
            },
        )
    }
    p["/api/openapi.json"] = {
        "get": operation(
            "openapi",
            "Service",
            "This document",
            "The OpenAPI 3.1 description of this API (the document this reference is generated from).",
            auth="none",
            db=False,
            responses={200: json_response("the OpenAPI document", {"type": "object"}, authenticated=False)},
        )
    }
    p["/api/feedback"] = {
        "post": operation(
            "feedback",
            "Service",
            "Send feedback",
            """
Stores a feedback submission. No key is needed; a valid key attaches its user (whose email is
used when `email` is empty), an invalid key is ignored. Limited per client IP
(`rate_limits.feedback_per_hour`, default 10/h), counted before anything else.
""",
            auth="optional",
            body=req_obj(
                {
                    "email": d({"type": "string", "maxLength": 254}, "reply address, ≤ 254 octets"),
                    "category": enum("bug", "feature", "general", text="default `general`"),
                    "message": d(
                        {"type": "string", "minLength": 1, "maxLength": 5000}, "1–5000 characters after trimming"
                    ),
                },
                required=("message",),
            ),
            body_required=True,
            example={"category": "bug", "message": "The inbox shows the wrong date", "email": "me@example.com"},
            errors={400: ["missing_field", "invalid_field"], 429: ["rate_limited"]},
            responses={200: json_response("stored", obj({"status": enum("ok")}), authenticated=False)},
        )
    }

    # ---------------------------------------------------------------- agents
    agent_list = json_response("the agents, newest first", obj({"agents": {"type": "array", "items": ref("Agent")}}))
    create_fields = {
        "email": d(
            {"type": "string", "maxLength": 254},
            "the address; required unless `slug` (custom domain you own and verified)",
        ),
        "slug": d(
            STR,
            "registers `<slug>@<shared_domain>`; 2–40 of `a-z0-9-`, no leading/trailing `-`, "
            "not reserved (admin, postmaster, …); `email` is then ignored",
        ),
        "name": d({"type": "string", "maxLength": 200, "pattern": HEADER_TEXT}, "display name, ≤ 200 chars"),
        "webhook_url": d(STR, "required for cloud mode: where signed webhooks are POSTed"),
        "agent_mode": enum("cloud", "local", text="default `cloud`; `local` agents read by polling or WebSocket"),
    }
    p["/api/v1/agents"] = {
        "get": operation(
            "listAgents",
            "Agents",
            "List agents",
            "The caller's agents, newest first. An agent-scoped key sees a list holding only its agent.",
            auth="key",
            responses={200: agent_list},
        ),
        "post": operation(
            "createAgent",
            "Agents",
            "Register an agent",
            """
Registers an address. Either `slug` (an address on the deployment's shared domain) or `email`
on a custom domain the caller has registered and verified. The register limit
(`rate_limits.register_per_hour` per client IP, default 20/h) counts every attempt, before
authentication. Checks run in this order, first failure wins: rate limit → key and scope →
JSON → slug → address present → address syntax and name → webhook URL → custom domain owned
and verified → mode → address free. New agents get the defaults shown in the Agent object.
""",
            auth="user",
            body=req_obj(create_fields),
            example={"slug": "my-bot", "name": "My bot", "agent_mode": "local"},
            errors={
                400: [
                    "shared_domain_disabled",
                    "invalid_slug",
                    "missing_field",
                    "invalid_email",
                    "invalid_header_value",
                    "invalid_field",
                    "invalid_webhook_url",
                    "domain_not_registered",
                    "domain_not_verified",
                    "webhook_url_required",
                ],
                409: ["agent_exists"],
                429: ["rate_limited"],
            },
            responses={
                201: json_response(
                    "registered",
                    ref("AgentCreated"),
                    example={
                        "id": "my-bot@agents.example.com",
                        "domain": "agents.example.com",
                        "email": "my-bot@agents.example.com",
                    },
                )
            },
        ),
    }
    update_fields = {
        "webhook_url": d(STR, "validated when non-empty; setting it re-enables a disabled webhook"),
        "agent_mode": enum(
            "cloud",
            "local",
            text="switching to `cloud` needs `webhook_url` in the same request; "
            "when given, the stored webhook becomes this request's "
            '`webhook_url` or `""`',
        ),
        "hitl_enabled": d(BOOL, "hold outgoing mail for human review"),
        "hitl_ttl_seconds": d(
            {"type": "integer", "minimum": 1, "maximum": 604800}, "how long a held message waits for review"
        ),
        "hitl_expiration_action": enum("approve", "reject", text="what happens to a held message at expiry"),
        "name": d({"type": "string", "maxLength": 200, "pattern": HEADER_TEXT}, "display name"),
        "hitl_notify": d(BOOL, "email the reviewers when a message is held"),
        "hitl_reviewers": d(
            {"type": "array", "items": STR}, "≤ 10 addresses (deduplicated, lowercased); `[]` = the account email"
        ),
    }
    p["/api/v1/agents/{email}"] = {
        "parameters": [EMAIL],
        "get": operation(
            "getAgent",
            "Agents",
            "Read an agent",
            "One agent. Missing, another user's, or (agent key) another agent: the same 404.",
            auth="key",
            path_params=True,
            errors={404: ["agent_not_found"]},
            responses={200: json_response("the agent", ref("Agent"))},
        ),
        "put": operation(
            "updateAgent",
            "Agents",
            "Update an agent",
            """
Changes the given fields; the others keep their values. All changes apply in one transaction or
not at all. A cloud agent can never end with an empty webhook URL. Setting a non-empty
`webhook_url` on a cloud agent (even the same value) sets `webhook_status` to `active` and
releases its paused deliveries.
""",
            auth="user",
            path_params=True,
            body=req_obj(update_fields),
            example={"hitl_enabled": True, "hitl_ttl_seconds": 3600, "hitl_reviewers": ["boss@example.com"]},
            errors={
                400: [
                    "no_fields",
                    "invalid_field",
                    "invalid_webhook_url",
                    "webhook_url_required",
                    "invalid_address",
                    "invalid_header_value",
                ],
                404: ["agent_not_found"],
            },
            responses={200: json_response("the updated agent", ref("Agent"))},
        ),
        "delete": operation(
            "deleteAgent",
            "Agents",
            "Delete an agent",
            "Deletes the agent, its messages (held ones too), deliveries and unstarted outbound work; "
            "revokes its agent-scoped keys and closes its WebSockets (1008).",
            auth="user",
            path_params=True,
            errors={404: ["agent_not_found"]},
            responses={200: json_response("deleted", obj({"status": enum("deleted")}), example={"status": "deleted"})},
        ),
    }
    p["/api/v1/agents/{email}/test"] = {
        "parameters": [EMAIL],
        "post": operation(
            "testEmail",
            "Agents",
            "Send a test email to the agent",
            """
Sends a test email from the agent to itself over the internal route (works without outbound
SMTP). The body is ignored. Counts against the send limit. With HITL on it is held (202) like
any other outgoing message. Checks: key → agent visible → send limit → domain verified.
""",
            auth="key",
            path_params=True,
            errors={
                403: ["domain_not_verified"],
                404: ["agent_not_found"],
                429: ["rate_limited"],
                503: ["outbound_not_configured"],
            },
            responses={
                200: json_response(
                    "sent",
                    ref("SendResult"),
                    example={
                        "status": "sent",
                        "message_id": "msg_0123456789abcdef0123456789abcdef",
                        "smtp_message_id": "<msg_0123456789abcdef0123456789abcdef@mx.example.com>",
                        "method": "internal",
                        "delivery_status": "sent",
                    },
                ),
                202: json_response("held for review", ref("HoldResult")),
            },
        ),
    }

    # ---------------------------------------------------------------- inbox and deliveries
    p["/api/v1/agents/{email}/messages"] = {
        "parameters": [EMAIL],
        "get": operation(
            "listInbox",
            "Inbox and deliveries",
            "List the inbox",
            """
Inbound messages of the agent not yet purged, oldest first, filtered by read state. A message is
`unread` when stored and becomes `read` by the detail call, a WebSocket `ack`, or (cloud agents)
a successful webhook delivery. Shares the poll limit (`rate_limits.poll_per_minute` per user)
with the detail call. `next_token` is present only when more messages exist.
""",
            auth="key",
            path_params=True,
            params=[
                query("status", "read-state filter", enum("unread", "read", "all", text="default `unread`")),
                *PAGE_PARAMS,
            ],
            errors={
                400: ["invalid_field", "invalid_pagination_token"],
                404: ["agent_not_found"],
                429: ["rate_limited"],
            },
            responses={
                200: json_response(
                    "one page",
                    obj(
                        {"messages": {"type": "array", "items": ref("InboundSummary")}},
                        {"next_token": d(STR, "cursor of the next page")},
                    ),
                )
            },
        ),
    }
    p["/api/v1/agents/{email}/messages/{id}"] = {
        "parameters": [EMAIL, MESSAGE_ID],
        "get": operation(
            "getInboundMessage",
            "Inbox and deliveries",
            "Read an inbound message",
            """
The message with its signed `X-E2A-Auth-*` headers and the raw bytes they are bound to. Marks
an unread message read (the response already says `read`) unless `mark_read=false`, for
clients that acknowledge only after handling it. Only inbound messages of this agent are
served. Counts against the poll limit.
""",
            auth="key",
            path_params=True,
            params=[
                query("mark_read", "`false` leaves the read state unchanged; default `true`", enum("true", "false"))
            ],
            errors={400: ["invalid_field"], 404: ["agent_not_found", "message_not_found"], 429: ["rate_limited"]},
            responses={200: json_response("the message", ref("InboundDetail"))},
        ),
    }
    attachments = d({"type": "array", "items": ATTACHMENT_IN, "maxItems": 100}, "files to attach (≤ 100)")
    p["/api/v1/agents/{email}/messages/{id}/reply"] = {
        "parameters": [EMAIL, MESSAGE_ID],
        "post": operation(
            "reply",
            "Inbox and deliveries",
            "Reply to an inbound message",
            """
Replies to the sender: To = the replied-to message's `Reply-To` (else `From`); with `reply_all`
its To and Cc go to Cc. Subject gets `Re: ` unless already there; `In-Reply-To` and
`References` thread the reply. Body cap 25 MiB. Checks: key → agent → message → send limit →
domain verified → JSON → `body` → recipients and content → a route for every recipient → HITL
hold (202) → sent (200). 200 means the message and its delivery jobs are committed; delivery
itself is asynchronous (see `GET /api/v1/messages/{id}`).
""",
            auth="key",
            path_params=True,
            body=req_obj(
                {
                    "body": d({"type": "string", "minLength": 1}, "plain-text body, required"),
                    "html_body": d(STR, "optional HTML alternative"),
                    "reply_all": d(BOOL, "also address the original To and Cc (as Cc)"),
                    "cc": d(STR_LIST, "extra Cc recipients"),
                    "bcc": d(STR_LIST, "Bcc recipients"),
                    "conversation_id": d(
                        {"type": "string", "maxLength": 256}, "1–256 printable ASCII; default: the replied-to message's"
                    ),
                    "attachments": attachments,
                },
                required=("body",),
            ),
            body_required=True,
            example={"body": "Thanks, received.", "reply_all": True},
            errors={
                400: [
                    "missing_field",
                    "reply_all_unavailable",
                    "invalid_address",
                    "invalid_header_value",
                    "invalid_attachment",
                    "invalid_field",
                    "too_many_recipients",
                    "no_recipients",
                ],
                403: ["domain_not_verified"],
                404: ["agent_not_found", "message_not_found"],
                429: ["rate_limited"],
                503: ["outbound_not_configured"],
            },
            responses={
                200: json_response("sent (queued)", ref("SendResult")),
                202: json_response("held for review", ref("HoldResult")),
            },
        ),
    }
    p["/api/v1/agents/{email}/messages/{id}/redeliver"] = {
        "parameters": [EMAIL, MESSAGE_ID],
        "post": operation(
            "redeliver",
            "Inbox and deliveries",
            "Redeliver an inbound message by webhook",
            """
Queues a new webhook delivery now (cloud agents). If a `pending` delivery of the message
exists, that one is rescheduled to now and returned instead. The body is ignored. A disabled
webhook must first be re-enabled with `PUT /api/v1/agents/{email}`.
""",
            auth="key",
            path_params=True,
            errors={404: ["agent_not_found", "message_not_found"], 409: ["agent_not_cloud", "webhook_disabled"]},
            responses={
                202: json_response(
                    "queued",
                    obj({"status": enum("queued"), "delivery_id": STR, "message_id": MSG_ID}),
                    example={
                        "status": "queued",
                        "delivery_id": "dlv_0123456789abcdef0123456789abcdef",
                        "message_id": "msg_0123456789abcdef0123456789abcdef",
                    },
                )
            },
        ),
    }
    p["/api/v1/agents/{email}/deliveries"] = {
        "parameters": [EMAIL],
        "get": operation(
            "listDeliveries",
            "Inbox and deliveries",
            "List webhook deliveries",
            "The agent's webhook deliveries, newest first; filter by status and message.",
            auth="key",
            path_params=True,
            params=[
                query(
                    "status",
                    "delivery-state filter",
                    enum("pending", "delivered", "failed", "paused", "all", text="default `all`"),
                ),
                query("message_id", "only deliveries of this message", STR),
                *PAGE_PARAMS,
            ],
            errors={400: ["invalid_field", "invalid_pagination_token"], 404: ["agent_not_found"]},
            responses={
                200: json_response(
                    "one page", obj({"deliveries": {"type": "array", "items": ref("Delivery")}}, {"next_token": STR})
                )
            },
        ),
    }
    p["/api/v1/agents/{email}/ws"] = {
        "parameters": [EMAIL],
        "get": operation(
            "websocket",
            "WebSocket",
            "Open the agent's WebSocket",
            """
A WebSocket (`wss://` in production) on which a **local-mode** agent receives a notification
frame for every new message. Not a JSON endpoint: send a WebSocket upgrade request; on success
the answer is `101 Switching Protocols` and frames follow (each a JSON text frame with a
`type` field; `ack` frames from the client mark messages read).

Handshake, checked in this order, each failure a plain HTTP response with the JSON error body:
the key (from `Authorization: Bearer <key>` or `?token=<key>`; the header wins) → 401;
`Origin`, when present, must be in `websocket.allowed_origins` (default: the origin of
`http.public_url`) → 403 `origin_not_allowed`; the agent must be visible to the key → 404;
the agent must be in local mode → 400 `agent_not_local`; fewer than
`websocket.max_connections_per_agent` (default 10) open connections → 429
`too_many_connections`; a valid upgrade → 426 `upgrade_required`.

Offer `Sec-WebSocket-Protocol: e2a.v2` to also receive control frames. Several connections per
agent may be open; each receives every notification. Revoking the key, deleting the agent or
the user closes the socket with code 1008.
""",
            auth="key",
            path_params=True,
            params=[query("token", "the API key, for clients that cannot set headers", STR)],
            errors={
                400: ["agent_not_local"],
                403: ["origin_not_allowed"],
                404: ["agent_not_found"],
                426: ["upgrade_required"],
                429: ["too_many_connections"],
            },
            responses={101: {"description": "Switching Protocols: the WebSocket is open"}},
        ),
    }
    # 426 carries the upgrade headers
    upgrade = _error_response(426, ["upgrade_required"])
    upgrade["headers"].update(
        {
            "Upgrade": {"schema": {"type": "string", "const": "websocket"}, "required": True},
            "Sec-WebSocket-Version": {"schema": {"type": "string", "const": "13"}, "required": True},
        }
    )
    p["/api/v1/agents/{email}/ws"]["get"]["responses"]["426"] = upgrade

    # ---------------------------------------------------------------- send
    p["/api/v1/send"] = {
        "post": operation(
            "send",
            "Send",
            "Send an email",
            f"""
Sends a new message from an agent. Body cap 25 MiB. {SEND_FIELDS_NOTE} Checks in order:
key → JSON → `subject` and `body` present → a To or Cc recipient → sender (`from` must be an
agent this key may send as; omitted: the user's only agent, or the agent key's agent) → send
limit (`rate_limits.send_per_minute` per agent) → sender's domain verified → content and
recipients → a route for every recipient → HITL hold (202) → 200. Nothing is sent inside the
request: 200 means the message and one delivery job per recipient are committed; follow
delivery with `GET /api/v1/messages/{{id}}`.
""",
            auth="key",
            body=req_obj(
                {
                    "from": d(STR, "the sending agent's address; optional (see above)"),
                    "to": d(STR_LIST, "To recipients"),
                    "cc": d(STR_LIST, "Cc recipients"),
                    "bcc": d(STR_LIST, "Bcc recipients"),
                    "subject": d({"type": "string", "minLength": 1, "maxLength": 998}, "required; ≤ 998 characters"),
                    "body": d({"type": "string", "minLength": 1}, "plain-text body, required"),
                    "html_body": d(STR, "optional HTML alternative"),
                    "conversation_id": d({"type": "string", "maxLength": 256}, "1–256 printable ASCII"),
                    "attachments": attachments,
                },
                required=("subject", "body"),
            ),
            body_required=True,
            example={
                "from": "my-bot@agents.example.com",
                "to": ["Alice <alice@example.com>"],
                "subject": "Your report",
                "body": "Attached.",
                "attachments": [{"filename": "report.txt", "content_type": "text/plain", "data": "aGVsbG8K"}],
            },
            errors={
                400: [
                    "missing_field",
                    "no_recipients",
                    "invalid_from",
                    "ambiguous_sender",
                    "invalid_address",
                    "invalid_header_value",
                    "invalid_attachment",
                    "invalid_field",
                    "too_many_recipients",
                ],
                403: ["domain_not_verified"],
                429: ["rate_limited"],
                503: ["outbound_not_configured"],
            },
            responses={
                200: json_response(
                    "accepted and queued",
                    ref("SendResult"),
                    example={
                        "status": "sent",
                        "message_id": "msg_0123456789abcdef0123456789abcdef",
                        "smtp_message_id": "<msg_0123456789abcdef0123456789abcdef@mx.example.com>",
                        "method": "smtp",
                        "delivery_status": "queued",
                    },
                ),
                202: json_response(
                    "held for review",
                    ref("HoldResult"),
                    example={
                        "status": "pending_approval",
                        "message_id": "msg_0123456789abcdef0123456789abcdef",
                        "approval_expires_at": "2026-04-28T12:00:00.000000Z",
                    },
                ),
            },
        )
    }

    # ---------------------------------------------------------------- outbound and HITL
    p["/api/v1/messages"] = {
        "get": operation(
            "listHeld",
            "Outbound messages and HITL review",
            "List held messages",
            "Up to 100 messages waiting for review across the user's agents (agent key: its agent), "
            "soonest expiry first. No bodies.",
            auth="key",
            params=[query("status", "only `pending_approval` is supported", enum("pending_approval"))],
            errors={400: ["invalid_field"]},
            responses={
                200: json_response(
                    "held messages", obj({"messages": {"type": "array", "items": ref("OutboundSummary")}})
                )
            },
        )
    }
    outbound_detail = obj(
        {**SCHEMAS["OutboundSummary"]["properties"], "edited": d(BOOL, "a reviewer changed the content")},
        {
            "email_message_id": d(STR, "replies: the Message-ID of the message replied to"),
            "body_text": d(STR, "only while pending_approval"),
            "body_html": d(STR, "only while pending_approval"),
            "attachments": d({"type": "array", "items": ref("Attachment")}, "only while pending_approval"),
            "reviewed_at": d(TS_SEC, "set on any terminal review transition"),
            "rejection_reason": STR,
            "method": enum("smtp", "internal", text="set once released for delivery"),
            "smtp_message_id": d(STR, "the RFC 5322 Message-ID e2a generated"),
            "provider_message_id": d(STR, "queue id reported by the upstream relay, when known"),
            "delivery_status": enum("queued", "sent", "partial", "failed", text="absent until released"),
            "recipients": d({"type": "array", "items": ref("Recipient")}, "per-recipient delivery state"),
        },
        description="An outbound message: held, released, rejected or expired.",
    )
    outbound_detail["required"] = [*SCHEMAS["OutboundSummary"]["required"], "edited"]
    SCHEMAS["OutboundDetail"] = outbound_detail
    p["/api/v1/messages/{id}"] = {
        "parameters": [MESSAGE_ID],
        "get": operation(
            "getOutboundMessage",
            "Outbound messages and HITL review",
            "Read an outbound message",
            "Any outbound message (send, reply, test): its review state and per-recipient delivery state. "
            "Inbound ids, other users' messages and (agent key) other agents' messages answer 404.",
            auth="key",
            path_params=True,
            errors={404: ["message_not_found"]},
            responses={200: json_response("the message", ref("OutboundDetail"))},
        ),
    }
    p["/api/v1/messages/{id}/approve"] = {
        "parameters": [MESSAGE_ID],
        "post": operation(
            "approve",
            "Outbound messages and HITL review",
            "Approve a held message",
            """
Releases a held message, optionally with edits (a field counts as an edit only when it differs
from the stored value; `attachments` whenever present). Body cap 25 MiB. Checks: key → user
scope → message → still `pending_approval` (409 `not_pending`) → not past
`approval_expires_at` (409 `expired`) → domain verified → content and recipients (400; the
message stays pending) → a route for every recipient (503; stays pending) → release. Of
concurrent approve, reject and expiry exactly one wins; the others get 409 `not_pending`.
""",
            auth="user",
            path_params=True,
            body=req_obj(
                {
                    "subject": STR,
                    "body_text": STR,
                    "body_html": STR,
                    "to": d(STR_LIST, "replaces the To list (`[]` allowed)"),
                    "cc": d(STR_LIST, "replaces the Cc list"),
                    "bcc": d(STR_LIST, "replaces the Bcc list"),
                    "attachments": d({"type": "array", "items": ATTACHMENT_IN}, "replaces all (`[]` removes all)"),
                }
            ),
            example={"subject": "Re: quote (corrected)"},
            errors={
                400: [
                    "missing_field",
                    "invalid_address",
                    "invalid_header_value",
                    "invalid_attachment",
                    "invalid_field",
                    "too_many_recipients",
                    "no_recipients",
                ],
                403: ["domain_not_verified"],
                404: ["message_not_found"],
                409: ["not_pending", "expired"],
                503: ["outbound_not_configured"],
            },
            responses={
                200: json_response(
                    "released",
                    obj(
                        {
                            "status": enum("sent"),
                            "message_id": MSG_ID,
                            "edited": d(BOOL, "this or an earlier review edited the content"),
                            "method": enum("smtp", "internal"),
                            "smtp_message_id": STR,
                            "delivery_status": enum("queued", "sent"),
                        },
                        {"provider_message_id": d(STR, "omitted until known")},
                    ),
                )
            },
        ),
    }
    p["/api/v1/messages/{id}/reject"] = {
        "parameters": [MESSAGE_ID],
        "post": operation(
            "reject",
            "Outbound messages and HITL review",
            "Reject a held message",
            "Rejects a held message (also after `approval_expires_at`, until the expiry worker has run); "
            "its bodies and attachments are removed.",
            auth="user",
            path_params=True,
            body=req_obj({"reason": d({"type": "string", "maxLength": 1000}, 'why; default `""`')}),
            example={"reason": "wrong recipient"},
            errors={400: ["invalid_field"], 404: ["message_not_found"], 409: ["not_pending"]},
            responses={
                200: json_response(
                    "rejected",
                    obj({"status": enum("rejected"), "message_id": MSG_ID, "rejection_reason": STR}),
                    example={
                        "status": "rejected",
                        "message_id": "msg_0123456789abcdef0123456789abcdef",
                        "rejection_reason": "wrong recipient",
                    },
                )
            },
        ),
    }

    # ---------------------------------------------------------------- magic-link pages
    html_headers = {
        "Cache-Control": header_ref("NoStore"),
        "X-Frame-Options": header_ref("FrameOptions"),
        "Referrer-Policy": header_ref("ReferrerPolicy"),
        "X-Robots-Tag": header_ref("RobotsTag"),
        "X-Content-Type-Options": header_ref("NoSniff"),
        "Content-Security-Policy": header_ref("PageCsp"),
    }

    def page(description: str) -> dict[str, Any]:
        return {"description": description, "headers": html_headers, "content": {"text/html": {"schema": STR}}}

    def shared_page(name: str, description: str) -> dict[str, str]:
        RESPONSES[name] = page(description)
        return {"$ref": f"#/components/responses/{name}"}

    def page_responses(action: str, *, post: bool) -> dict[int, dict[str, Any]]:
        out = {
            400: page(
                "missing link token, or invalid link (bad MAC, malformed, other action)"
                + ("; on POST approve also a validation error (message stays pending)" if post else "")
            ),
            404: shared_page("PageNotFound", "message not found (deleted or purged)"),
            409: page(
                "already resolved (with the current status)"
                + ("; approve: approval window closed" if action == "approve" else "")
            ),
            410: shared_page("PageExpired", "link expired"),
            500: shared_page("PageError", "unexpected failure (generic page)"),
        }
        if action == "approve":
            out[403] = shared_page("PageDomainNotVerified", "the agent's domain is not verified")
        if post and action == "approve":
            out[503] = page("no route for a recipient; the message stays pending")
        if post:
            out[200] = page("Approved" if action == "approve" else "Rejected")
        else:
            out[200] = page(
                "confirmation page: agent, To, Cc, Bcc, subject, expiry and a text preview, "
                f"with a form that POSTs to `/api/v1/{action}`"
            )
        out[405] = shared_page("PageMethodNotAllowed", "other methods (HTML page, same headers)")
        return out

    def magic(action: str) -> dict[str, Any]:
        verb = "Approve" if action == "approve" else "Reject"
        token_params = [
            query("t", "the link token (from the notification email)", STR),
            query("token", "alternative name for `t`; `t` wins if both", STR),
        ]
        form_fields: dict[str, Any] = {"t": d(STR, "the link token"), "token": d(STR, "alternative name for `t`")}
        if action == "reject":
            form_fields["reason"] = d({"type": "string", "maxLength": 1000}, "optional; empty → `magic-link rejection`")
        common = f"""
The page a reviewer reaches from the notification email. The token is the only credential (no
API key); key scopes do not apply. `GET` and `HEAD` never change anything (link scanners fetch
them): they show a confirmation page whose form POSTs to this path. Every outcome is an HTML
page with the security headers listed; checks in order: token present → token valid for
`{action}` → not expired → message exists → still pending"""
        if action == "approve":
            common += " → approval window open → domain verified"
        common += "."

        def op(method: str, post: bool) -> dict[str, Any]:
            o = operation(
                f"{action}Page{method.title()}",
                "Magic-link pages",
                f"{verb} page ({method.upper()})",
                common
                + (
                    "\n\n`POST` acts: "
                    + (
                        "releases the message exactly like the API approve "
                        "without edits; the owner is recorded as reviewer."
                        if action == "approve"
                        else "rejects the message with `reason`."
                    )
                    if post
                    else ""
                ),
                auth="token",
                db=False,
                params=None if post else token_params,
                responses=page_responses(action, post=post),
            )
            if post:
                o["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": form_fields}}
                    },
                }
            return o

        return {"get": op("get", False), "head": op("head", False), "post": op("post", True)}

    p["/api/v1/approve"] = magic("approve")
    p["/api/v1/reject"] = magic("reject")

    # ---------------------------------------------------------------- domains
    domain_param = path_param("domain", "the domain; lowercased and IDNA-encoded before lookup")
    p["/api/v1/domains"] = {
        "get": operation(
            "listDomains",
            "Domains",
            "List domains",
            "The caller's custom domains, newest first.",
            auth="user",
            responses={200: json_response("domains", obj({"domains": {"type": "array", "items": ref("Domain")}}))},
        ),
        "post": operation(
            "addDomain",
            "Domains",
            "Register a custom domain",
            """
Claims a domain for the caller: creates it unverified with a verification token and a DKIM key,
and answers the DNS records to publish. Re-registering one's own domain returns it unchanged.
A domain verified by someone else, or claimed unverified by another user less than 72 h ago,
is not available; an older unverified claim is taken over.
""",
            auth="user",
            body=req_obj({"domain": d(STR, "the domain name (IDNA allowed)")}, required=("domain",)),
            body_required=True,
            example={"domain": "example.com"},
            errors={400: ["missing_field", "invalid_domain", "reserved_domain", "domain_not_available"]},
            responses={201: json_response("the domain and its DNS records", ref("Domain"))},
        ),
    }
    p["/api/v1/domains/{domain}/verify"] = {
        "parameters": [domain_param],
        "post": operation(
            "verifyDomain",
            "Domains",
            "Verify a domain",
            "Looks up the TXT records of the domain apex; verified when one contains the token. "
            "Verification is permanent. Already verified: 200 with the stored values. No body.",
            auth="user",
            path_params=True,
            errors={400: ["dns_lookup_failed"], 404: ["domain_not_found"], 412: ["dns_record_not_found"]},
            responses={
                200: json_response(
                    "verified",
                    obj({"domain": STR, "verified": {"type": "boolean", "const": True}, "verified_at": TS_FRAC}),
                )
            },
        ),
    }
    p["/api/v1/domains/{domain}"] = {
        "parameters": [domain_param],
        "delete": operation(
            "deleteDomain",
            "Domains",
            "Delete a domain",
            "Deletes the domain and its DKIM key. Refused while agents exist on it.",
            auth="user",
            path_params=True,
            errors={400: ["domain_has_agents"], 404: ["domain_not_found"]},
            responses={204: no_content("deleted")},
        ),
    }

    # ---------------------------------------------------------------- signing secrets
    secret_item = obj(
        {
            "id": d(STR, "`wsec_` + 32 hex"),
            "name": STR,
            "secret_prefix": d(STR, "first 12 chars"),
            "created_at": TS_SEC,
        },
        {"last_signed_at": d(TS_SEC, "omitted if never used")},
    )
    p["/api/v1/users/me/signing-secrets"] = {
        "get": operation(
            "listSigningSecrets",
            "Signing secrets",
            "List signing secrets",
            "The secrets that sign webhooks and `X-E2A-Auth-*` headers, newest first. Never the secret itself.",
            auth="user",
            responses={200: json_response("secrets", obj({"secrets": {"type": "array", "items": secret_item}}))},
        ),
        "post": operation(
            "createSigningSecret",
            "Signing secrets",
            "Create a signing secret",
            "Creates a secret (at most 5 per user). The answer is the only time `secret` is shown. "
            "The new secret signs from the next delivery on.",
            auth="user",
            body=req_obj(
                {"name": d({"type": "string", "maxLength": 100}, "≤ 100 chars after trimming; empty → `unnamed`")}
            ),
            example={"name": "rotation-2026"},
            errors={400: ["invalid_field", "too_many_secrets"]},
            responses={
                201: json_response(
                    "created",
                    obj(
                        {
                            "id": STR,
                            "name": STR,
                            "secret": d(
                                {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "64 lowercase hex; shown once"
                            ),
                            "secret_prefix": STR,
                            "created_at": TS_SEC,
                        }
                    ),
                )
            },
        ),
    }
    p["/api/v1/users/me/signing-secrets/{id}"] = {
        "parameters": [path_param("id", "a signing secret id `wsec_…`")],
        "delete": operation(
            "deleteSigningSecret",
            "Signing secrets",
            "Delete a signing secret",
            "Deletes a secret; the last one cannot be deleted.",
            auth="user",
            path_params=True,
            errors={400: ["last_signing_secret"], 404: ["signing_secret_not_found"]},
            responses={204: no_content("deleted")},
        ),
    }

    # ---------------------------------------------------------------- API keys
    key_fields = {
        "id": d(STR, "`apk_` + 32 hex"),
        "name": STR,
        "key_prefix": d(STR, "first 12 chars (`e2a_` + 8 hex)"),
        "scope": enum("user", "agent"),
        "agent": d({"type": ["string", "null"]}, "the agent of an agent-scoped key; `null` for user keys"),
        "created_at": TS_FRAC,
    }
    p["/api/v1/keys"] = {
        "post": operation(
            "createKey",
            "API keys",
            "Create an API key",
            """
Creates a key. With `agent`, the key is agent-scoped: it acts as the user restricted to that
agent (its inbox, its messages, sending as it) and cannot manage agents, domains, secrets, keys
or the account. The key is shown only in this answer. At most 100 active keys.
""",
            auth="user",
            body=req_obj(
                {
                    "name": d({"type": "string", "maxLength": 100}, 'label, ≤ 100 chars, default `""`'),
                    "agent": d(STR, "an agent address of the user → agent-scoped key; absent → user-scoped"),
                }
            ),
            example={"name": "ci", "agent": "bot@example.com"},
            errors={400: ["invalid_field", "too_many_keys"], 404: ["agent_not_found"]},
            responses={
                201: json_response(
                    "created",
                    obj({**key_fields, "key": d({"type": "string", "pattern": "^e2a_[0-9a-f]{64}$"}, "shown once")}),
                    example={
                        "id": "apk_0123456789abcdef0123456789abcdef",
                        "name": "ci",
                        "key": "e2a_" + "0" * 64,
                        "key_prefix": "e2a_00000000",
                        "scope": "agent",
                        "agent": "bot@example.com",
                        "created_at": "2026-04-27T12:00:00.000000Z",
                    },
                )
            },
        ),
        "get": operation(
            "listKeys",
            "API keys",
            "List API keys",
            "Active keys, newest first (never the key itself).",
            auth="user",
            responses={
                200: json_response(
                    "keys",
                    obj(
                        {
                            "keys": {
                                "type": "array",
                                "items": obj(key_fields, {"last_used_at": d(TS_FRAC, "coalesced to once per minute")}),
                            }
                        }
                    ),
                )
            },
        ),
    }
    p["/api/v1/keys/{id}"] = {
        "parameters": [path_param("id", "an API key id `apk_…`")],
        "delete": operation(
            "revokeKey",
            "API keys",
            "Revoke an API key",
            "Revokes a key at once in every process; WebSockets opened with it close (1008). A key may "
            "revoke itself, except the last active user-scoped key.",
            auth="user",
            path_params=True,
            errors={400: ["last_user_key"], 404: ["key_not_found"]},
            responses={204: no_content("revoked")},
        ),
    }

    # ---------------------------------------------------------------- user data
    p["/api/v1/users/me/export"] = {
        "get": operation(
            "exportUser",
            "User data",
            "Export all data of the user",
            """
Everything stored for the user in one JSON document, read in one consistent snapshot: user,
domains, agents, API keys (incl. revoked), signing-secret metadata, every message (inbound raw
bytes as base64), deliveries and, when usage tracking is on, usage events. Never key hashes,
secret values or DKIM private keys. Lists are `[]` when empty.
""",
            auth="user",
            errors={404: ["not_found"]},
            responses={
                200: json_response(
                    "the export",
                    obj(
                        {
                            "generated_at": TS_FRAC,
                            "schema_version": enum("1"),
                            "user": {"type": "object"},
                            "domains": {"type": "array"},
                            "agents": {"type": "array"},
                            "api_keys": {"type": "array"},
                            "signing_secrets": {"type": "array"},
                            "messages": {"type": "array"},
                            "deliveries": {"type": "array"},
                        },
                        {"usage_events": {"type": "array"}},
                    ),
                    headers={
                        "Content-Disposition": {
                            "schema": {
                                "type": "string",
                                "pattern": '^attachment; filename="e2a-export-[0-9a-f]{32}\\.json"$',
                            },
                            "required": True,
                        }
                    },
                )
            },
        )
    }
    counts = {
        name: INT
        for name in (
            "usage_events_deleted",
            "usage_summaries_deleted",
            "messages_deleted",
            "agents_deleted",
            "domains_deleted",
            "api_keys_deleted",
            "sessions_deleted",
            "signing_secrets_deleted",
            "deliveries_deleted",
        )
    }
    p["/api/v1/users/me"] = {
        "delete": operation(
            "deleteUser",
            "User data",
            "Delete the user and everything owned",
            """
Deletes the user and all they own (agents, messages, deliveries, domains, DKIM keys, keys,
secrets, usage rows) in one transaction. Afterwards every key of the user fails with 401, its
WebSockets close (1008) and held messages are gone. Requires `?confirm=DELETE`.
""",
            auth="user",
            params=[query("confirm", "must be exactly `DELETE`", enum("DELETE"), required=True)],
            errors={400: ["confirmation_required"]},
            responses={200: json_response("deleted; counts of removed rows", obj({**counts, "user_deleted": BOOL}))},
        )
    }
    return p


ERROR_TABLE: list[tuple[str, str, str]] = [
    (
        "invalid_request_body",
        "400",
        "Body not valid JSON, not an object, invalid UTF-8, or a field of the wrong JSON type.",
    ),
    ("body_too_large", "400", "Body over the cap (25 MiB for send, reply and approve; 64 KiB for other JSON bodies)."),
    ("missing_field", "400", "A required field is absent or empty; `message` names it."),
    ("invalid_field", "400", "A value is out of range, not in its enum, or badly formed; `message` names the field."),
    ("no_fields", "400", "`PUT` body had no recognised field."),
    ("invalid_email", "400", "Agent address is not a valid address."),
    ("invalid_slug", "400", "Slug breaks the slug rules."),
    ("shared_domain_disabled", "400", "Slug registration requested but no shared domain is configured."),
    ("invalid_webhook_url", "400", "Webhook URL is not an allowed public http(s) URL."),
    ("webhook_url_required", "400", "Cloud mode without a webhook URL."),
    ("invalid_domain", "400", "Domain name syntax."),
    ("reserved_domain", "400", "Domain is one of the deployment's own domains."),
    ("domain_not_available", "400", "Domain verified by another user, or recently claimed by another user."),
    ("domain_not_registered", "400", "Agent registration on a domain the caller does not own."),
    (
        "domain_not_verified",
        "400 / 403",
        "400 at agent registration; 403 when sending, replying, testing or approving "
        "from an agent whose domain is unverified.",
    ),
    ("domain_has_agents", "400", "Domain delete while agents exist on it."),
    ("dns_lookup_failed", "400", "Temporary DNS failure while verifying."),
    ("dns_record_not_found", "412", "Verification TXT record absent."),
    ("invalid_pagination_token", "400", "Cursor malformed or bound to another filter or agent."),
    ("invalid_address", "400", "A recipient or reviewer address cannot be parsed."),
    ("no_recipients", "400", "No To/Cc recipient (before or after normalisation)."),
    ("too_many_recipients", "400", "More than `outbound.max_recipients` (default 50) recipients."),
    (
        "invalid_header_value",
        "400",
        "A control character in a value that goes into a mail header (subject, names, "
        "addresses, `conversation_id`, filenames, content types).",
    ),
    ("invalid_attachment", "400", "Attachment `data` not valid base64, or bad filename or content type."),
    ("invalid_from", "400", "`from` is not an agent this key may send as."),
    ("ambiguous_sender", "400", "`from` omitted and the user does not have exactly one agent."),
    ("reply_all_unavailable", "400", "`reply_all` requested but the replied-to message's headers cannot be parsed."),
    ("too_many_secrets", "400", "5 signing secrets already exist."),
    ("last_signing_secret", "400", "Deleting the only signing secret."),
    ("too_many_keys", "400", "100 active API keys already exist."),
    ("last_user_key", "400", "Revoking the last active user-scoped key."),
    ("confirmation_required", "400", "`DELETE /api/v1/users/me` without `confirm=DELETE`."),
    ("agent_not_local", "400", "WebSocket for a cloud-mode agent."),
    ("unauthorized", "401", "Missing, malformed, unknown or revoked key."),
    ("insufficient_scope", "403", "Agent-scoped key on a user-only endpoint."),
    ("origin_not_allowed", "403", "WebSocket `Origin` not allowed."),
    ("not_found", "404", "No such route."),
    ("agent_not_found", "404", "Agent missing or not visible to this key."),
    ("message_not_found", "404", "Message missing or not visible to this key."),
    ("domain_not_found", "404", "Domain missing or another user's."),
    ("signing_secret_not_found", "404", "Signing secret missing or another user's."),
    ("key_not_found", "404", "API key missing, another user's, or already revoked."),
    ("method_not_allowed", "405", "Route exists with other methods; `Allow` lists them."),
    ("upgrade_required", "426", "WebSocket path requested without a valid upgrade."),
    ("agent_exists", "409", "Agent address already registered (any user, case-insensitive)."),
    ("not_pending", "409", "Review action on a message that is no longer `pending_approval`."),
    ("expired", "409", "Approve after `approval_expires_at`."),
    ("agent_not_cloud", "409", "Redeliver for a local-mode agent."),
    ("webhook_disabled", "409", "Redeliver while the agent's webhook is disabled."),
    ("rate_limited", "429", "A rate limit was hit; `Retry-After` says when to retry."),
    ("too_many_connections", "429", "WebSocket connections per agent exhausted."),
    ("internal_error", "500", "Unexpected failure."),
    (
        "outbound_not_configured",
        "503",
        "A recipient needs SMTP delivery but neither an upstream relay nor direct MX is configured.",
    ),
    ("unavailable", "503", "Database unreachable or overloaded; retry later."),
]

DESCRIPTION = """
e2a gives AI agents real mailboxes: it receives mail for agent addresses, verifies and signs who
sent it, delivers it by signed webhook or WebSocket, and sends mail on the agents' behalf.
This is its HTTP API.

**Authentication.** `Authorization: Bearer <key>` with an API key `e2a_` + 64 hex (the scheme
word is case-insensitive; a bare key is also accepted). A key is *user-scoped* (all of the
user's objects; the key `e2a-admin bootstrap` prints is one) or *agent-scoped* (created with
`POST /api/v1/keys` and `agent`: the user restricted to that one agent). Operations marked
*user* answer 403 `insufficient_scope` to an agent key, decided before any lookup; on the
others an agent key sees only its own agent, and any other agent or its messages answer exactly
as if they did not exist (404). Missing key → 401 `unauthorized` with
`WWW-Authenticate: Bearer realm="e2a"`; an invalid key never falls back to anything else.

**Requests.** Bodies are JSON objects (`Content-Type` is not checked); unknown fields are
ignored; `null` means absent; optional bodies may be empty. Bodies are capped at 64 KiB (25 MiB
for send, reply and approve). Path parameters are percent-decoded once. Unknown paths → 404
`not_found`; a known path with another method → 405 `method_not_allowed` with `Allow`.
Repeated query parameters: the first wins.

**Responses.** JSON (`application/json`, compact) with `X-Content-Type-Options: nosniff`, and
`Cache-Control: no-store` on authenticated requests. Times are UTC RFC 3339 with `Z`: *ts-frac*
(6 fractional digits) or *ts-sec* (whole seconds), as each field says; unset optional fields are
omitted, never `null`, unless stated. Every error is
`{"error": {"code": "…", "message": "…"}}`: branch on `code` (stable), show `message`.

**Pagination.** Paged lists take `page_size` (1–100, default 50) and `token`, and answer
`next_token` only when more rows exist. Cursors are opaque and bound to their list's agent and
filter.

**Rate limits** (shared by every process): send 60/min per agent (send, reply, test email),
register 20/h per client IP, poll 60/min per user (inbox list and detail), feedback 10/h per
client IP. Over the limit → 429 `rate_limited` with `Retry-After`. The client IP is the TCP
peer, or from `X-Forwarded-For` when the peer is one of `http.trusted_proxies`.
""".strip()

TAGS = [
    ("Service", "Health, readiness, metrics, deployment facts, feedback."),
    ("Agents", "Register and manage agent addresses."),
    ("Inbox and deliveries", "Read inbound mail, reply to it, and inspect webhook deliveries."),
    ("Send", "Send new mail from an agent."),
    ("Outbound messages and HITL review", "Follow sent mail; review messages held for human approval."),
    ("Magic-link pages", "HTML pages reached from review notification emails (no API key)."),
    ("WebSocket", "Real-time notifications for local-mode agents."),
    ("Domains", "Custom domains for agent addresses."),
    ("Signing secrets", "Secrets that sign webhooks and authentication headers."),
    ("API keys", "User- and agent-scoped API keys."),
    ("User data", "Export and delete everything stored for the user."),
]


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document as a plain dict (deterministic: same input, same output)."""
    paths = _paths()  # also completes SCHEMAS (OutboundDetail)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "e2a HTTP API",
            "version": API_VERSION,
            "summary": "Authenticated email gateway for AI agents",
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/", "description": "the deployment's `http.public_url`"}],
        "tags": [{"name": n, "description": t} for n, t in TAGS],
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "e2a_<64 hex>",
                    "description": "An API key. Operations marked user need a user-scoped key; agent-scoped "
                    "keys get 403 insufficient_scope there and see only their agent elsewhere.",
                },
                "metricsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`metrics.token` from the configuration, when set (for `/metrics` only).",
                },
            },
            "schemas": dict(sorted(SCHEMAS.items())),
            "headers": HEADERS,
            "responses": dict(sorted(RESPONSES.items())),
        },
        "x-e2a-error-codes": [{"code": c, "status": s, "meaning": m} for c, s, m in ERROR_TABLE],
    }
