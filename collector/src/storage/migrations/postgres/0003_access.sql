-- driftwatch collector schema (PostgreSQL): API tokens with roles
-- (collector/src/storage/access.rs). Only the SHA-256 of a token is stored; lookups go by
-- that hash.

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('auditor', 'operator', 'admin')),
    secret_sha256 BYTEA NOT NULL UNIQUE,
    created_ms    BIGINT NOT NULL,
    expires_ms    BIGINT,
    revoked_ms    BIGINT,
    last_used_ms  BIGINT,
    created_by    TEXT NOT NULL
);
