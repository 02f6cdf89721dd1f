-- Web console sessions (docs/decisions.md, "Web console"). Only the SHA-256 of the session
-- token is stored; the CSRF token is random per session and compared in constant time.
-- A session dies with its user (ON DELETE CASCADE: account deletion revokes it).
CREATE TABLE console_sessions (
    token_hash   TEXT PRIMARY KEY,                  -- sha256 hex of the cookie value
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token   TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    revoked_at   TIMESTAMPTZ
);
CREATE INDEX console_sessions_user_idx ON console_sessions (user_id);
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);

-- One-time sign-in links (e2a-admin login-link): only the SHA-256 of the link token is stored.
CREATE TABLE console_login_links (
    token_hash   TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at   TIMESTAMPTZ NOT NULL,
    used_at      TIMESTAMPTZ
);
