-- e2a schema, version 1: the whole data model of the spec, so that later work adds columns,
-- not redesigns. PostgreSQL only. Ids are the wire ids (msg_…, apk_…, wsec_…, dlv_…); agents
-- are keyed by their address as registered (domain lowercased) with a unique lower() index.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,                      -- 32 hex
    email       TEXT NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- Domains: custom domains (user_id set) and the shared domain (user_id NULL, is_shared).
CREATE TABLE domains (
    domain              TEXT PRIMARY KEY,              -- lowercase A-label
    user_id             TEXT REFERENCES users (id) ON DELETE CASCADE,
    is_shared           BOOLEAN NOT NULL DEFAULT FALSE,
    verified            BOOLEAN NOT NULL DEFAULT FALSE,
    verification_token  TEXT NOT NULL DEFAULT '',
    claimed_at          TIMESTAMPTZ NOT NULL DEFAULT now(),  -- reset on take-over (72 h rule)
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    verified_at         TIMESTAMPTZ,
    dkim_selector       TEXT NOT NULL DEFAULT '',
    dkim_private_key    TEXT NOT NULL DEFAULT '',      -- v1: AES-256-GCM, AD = domain
    dkim_public_key     TEXT NOT NULL DEFAULT ''       -- base64 SubjectPublicKeyInfo
);
CREATE INDEX domains_user_idx ON domains (user_id, created_at DESC);

CREATE TABLE agents (
    id                      TEXT PRIMARY KEY,          -- the address: local part as given, domain lowercase
    user_id                 TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    domain                  TEXT NOT NULL REFERENCES domains (domain),
    name                    TEXT NOT NULL DEFAULT '',
    agent_mode              TEXT NOT NULL DEFAULT 'cloud' CHECK (agent_mode IN ('cloud', 'local')),
    webhook_url             TEXT NOT NULL DEFAULT '',
    webhook_status          TEXT NOT NULL DEFAULT 'none' CHECK (webhook_status IN ('active', 'disabled', 'none')),
    webhook_disabled_at     TIMESTAMPTZ,
    hitl_enabled            BOOLEAN NOT NULL DEFAULT FALSE,
    hitl_ttl_seconds        INTEGER NOT NULL DEFAULT 604800,
    hitl_expiration_action  TEXT NOT NULL DEFAULT 'reject' CHECK (hitl_expiration_action IN ('approve', 'reject')),
    hitl_notify             BOOLEAN NOT NULL DEFAULT TRUE,
    hitl_reviewers          JSONB NOT NULL DEFAULT '[]',
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX agents_address_key ON agents (lower(id));
CREATE INDEX agents_user_idx ON agents (user_id, created_at DESC);
CREATE INDEX agents_domain_idx ON agents (domain);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,                    -- apk_ + 32 hex
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    agent_id      TEXT REFERENCES agents (id) ON DELETE SET NULL,  -- agent-scoped keys; revoked with the agent
    scope         TEXT NOT NULL CHECK (scope IN ('user', 'agent')),
    name          TEXT NOT NULL DEFAULT '',
    key_hash      TEXT NOT NULL UNIQUE,                -- sha256 hex of the plaintext key
    key_prefix    TEXT NOT NULL,                       -- e2a_ + 8 hex
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at DESC);

CREATE TABLE signing_secrets (
    id              TEXT PRIMARY KEY,                  -- wsec_ + 32 hex
    user_id         TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name            TEXT NOT NULL DEFAULT '',
    secret          TEXT NOT NULL,                     -- v1: AES-256-GCM, AD = id
    secret_prefix   TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    last_signed_at  TIMESTAMPTZ
);
CREATE INDEX signing_secrets_user_idx ON signing_secrets (user_id, created_at DESC);

-- Messages: one row per inbound copy per recipient agent, and one row per outbound message
-- (send, reply, test), including HITL holds (status pending_approval + approval_expires_at).
CREATE TABLE messages (
    id                   TEXT PRIMARY KEY,             -- msg_ + 32 hex
    agent_id             TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    user_id              TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    direction            TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    type                 TEXT NOT NULL DEFAULT '',     -- outbound: send | reply | test
    status               TEXT NOT NULL,                -- inbound: unread | read; outbound: sent | pending_approval | rejected | expired_*
    route                TEXT NOT NULL DEFAULT 'smtp', -- inbound: smtp | internal
    sender               TEXT NOT NULL DEFAULT '',     -- signed sender (inbound) / agent (outbound)
    display_from         TEXT NOT NULL DEFAULT '',     -- unsigned display sender (Reply-To else From)
    recipient            TEXT NOT NULL DEFAULT '',     -- inbound: the agent address of this copy
    envelope_from        TEXT NOT NULL DEFAULT '',     -- MAIL FROM (inbound)
    client_ip            TEXT NOT NULL DEFAULT '',
    subject              TEXT NOT NULL DEFAULT '',
    to_addrs             JSONB,                        -- parsed To (inbound) / normalised To (outbound)
    cc_addrs             JSONB,
    bcc_addrs            JSONB,
    email_message_id     TEXT NOT NULL DEFAULT '',     -- inbound Message-ID / replied-to Message-ID
    in_reply_to          TEXT NOT NULL DEFAULT '',
    references_ids       TEXT NOT NULL DEFAULT '',
    smtp_message_id      TEXT NOT NULL DEFAULT '',     -- outbound <msg_…@M>
    provider_message_id  TEXT NOT NULL DEFAULT '',
    conversation_id      TEXT NOT NULL DEFAULT '',
    raw_message          BYTEA,                        -- stored bytes (inbound): what is hashed and served
    composed             BYTEA,                        -- outbound composed bytes until every recipient is terminal
    auth_headers         JSONB,
    method               TEXT NOT NULL DEFAULT '',     -- outbound: smtp | internal
    delivery_status      TEXT NOT NULL DEFAULT '',     -- outbound: queued | sent | partial | failed
    body_text            TEXT,
    body_html            TEXT,
    attachments          JSONB,
    approval_expires_at  TIMESTAMPTZ,
    reviewed_at          TIMESTAMPTZ,
    rejection_reason     TEXT NOT NULL DEFAULT '',
    edited               BOOLEAN NOT NULL DEFAULT FALSE,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    read_at              TIMESTAMPTZ,
    expires_at           TIMESTAMPTZ
);
-- The raw bytes are already compressed or incompressible often enough, and pglz doubled the
-- CPU per 100 KB message: store them out of line without compression.
ALTER TABLE messages ALTER COLUMN raw_message SET STORAGE EXTERNAL;
ALTER TABLE messages ALTER COLUMN composed SET STORAGE EXTERNAL;
CREATE INDEX messages_inbox_idx ON messages (agent_id, status, created_at, id) WHERE direction = 'inbound';
CREATE INDEX messages_agent_created_idx ON messages (agent_id, created_at, id);
CREATE INDEX messages_thread_inbound_idx ON messages (agent_id, email_message_id) WHERE email_message_id <> '';
CREATE INDEX messages_thread_smtp_idx ON messages (agent_id, smtp_message_id) WHERE smtp_message_id <> '';
CREATE INDEX messages_thread_provider_idx ON messages (agent_id, provider_message_id) WHERE provider_message_id <> '';
CREATE INDEX messages_pending_idx ON messages (approval_expires_at) WHERE status = 'pending_approval';
CREATE INDEX messages_retention_idx ON messages (created_at);

-- Webhook deliveries: the durable job queue for cloud agents (mail.md §4).
CREATE TABLE deliveries (
    id                TEXT PRIMARY KEY,                -- dlv_ + 32 hex
    message_id        TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    agent_id          TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    webhook_url       TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed', 'paused')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_status_code  INTEGER,
    last_error        TEXT NOT NULL DEFAULT '',
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_attempt_at   TIMESTAMPTZ,
    next_attempt_at   TIMESTAMPTZ,
    delivered_at      TIMESTAMPTZ,
    leased_until      TIMESTAMPTZ                     -- claim lease: timeout + 30 s
);
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_agent_idx ON deliveries (agent_id, created_at DESC, id DESC);
CREATE INDEX deliveries_message_idx ON deliveries (message_id);

-- Outbound relay jobs: one row per recipient of an outbound message (mail.md §7.8).
CREATE TABLE outbound_recipients (
    id               BIGSERIAL PRIMARY KEY,
    message_id       TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address          TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('to', 'cc', 'bcc')),
    route            TEXT NOT NULL CHECK (route IN ('internal', 'smtp')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'deferred', 'sent', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_reply       TEXT NOT NULL DEFAULT '',
    queued_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    next_attempt_at  TIMESTAMPTZ,
    leased_until     TIMESTAMPTZ
);
CREATE INDEX outbound_recipients_message_idx ON outbound_recipients (message_id, id);
CREATE INDEX outbound_recipients_due_idx ON outbound_recipients (next_attempt_at) WHERE status IN ('queued', 'deferred');

-- HITL review trail: the hold itself lives on the message row (its status is part of the wire
-- contract); this records each decision and the notification emails sent for it.
CREATE TABLE approvals (
    id           BIGSERIAL PRIMARY KEY,
    message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    action       TEXT NOT NULL CHECK (action IN ('hold', 'approve', 'reject', 'expire_approve', 'expire_reject', 'notify')),
    actor        TEXT NOT NULL DEFAULT '',             -- api | magic_link | worker
    detail       TEXT NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX approvals_message_idx ON approvals (message_id);

-- Fixed-window counters shared by every process (api.md §0.8).
CREATE TABLE rate_limits (
    bucket        TEXT NOT NULL,                       -- e.g. send:<agent>, register:<ip>
    window_start  TIMESTAMPTZ NOT NULL,
    count         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, window_start)
);

CREATE TABLE feedback (
    id          TEXT PRIMARY KEY,
    user_id     TEXT REFERENCES users (id) ON DELETE SET NULL,
    email       TEXT NOT NULL DEFAULT '',
    category    TEXT NOT NULL,
    message     TEXT NOT NULL,
    client_ip   TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE usage_events (
    id          TEXT PRIMARY KEY,                      -- ue_ + 32 hex
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    agent_id    TEXT NOT NULL DEFAULT '',
    domain      TEXT NOT NULL DEFAULT '',
    direction   TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_user_idx ON usage_events (user_id);
