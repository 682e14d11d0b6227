-- driftwatch collector schema (SQLite): API tokens with roles (collector/src/storage/access.rs).
-- Only the SHA-256 of a token is stored; lookups go by that hash.

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('auditor', 'operator', 'admin')),
    secret_sha256 BLOB NOT NULL UNIQUE,
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER,
    revoked_ms    INTEGER,
    last_used_ms  INTEGER,
    created_by    TEXT NOT NULL
) STRICT;
