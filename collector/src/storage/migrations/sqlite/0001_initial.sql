-- driftwatch collector schema, version 1 (SQLite).
-- u64 values (epochs, seqs, counters) are stored bit-for-bit in INTEGER columns.

CREATE TABLE enrollment_tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 BLOB NOT NULL UNIQUE,
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER NOT NULL,
    uses_left     INTEGER NOT NULL,
    host_pattern  TEXT
) STRICT;

CREATE TABLE hosts (
    pk                INTEGER PRIMARY KEY,
    host_id           TEXT NOT NULL UNIQUE,
    enrolled_ms       INTEGER NOT NULL,
    agent_version     TEXT NOT NULL DEFAULT '',
    image_id          TEXT NOT NULL DEFAULT '',
    image_version     TEXT NOT NULL DEFAULT '',
    baseline_root     BLOB NOT NULL DEFAULT x'',
    boot_id           TEXT NOT NULL DEFAULT '',
    hello_epoch       INTEGER NOT NULL DEFAULT 0,
    last_seen_ms      INTEGER,
    last_scan_ms      INTEGER,
    last_scan_status  INTEGER NOT NULL DEFAULT 0,
    last_report_ms    INTEGER,
    incomplete        INTEGER NOT NULL DEFAULT 0,
    incomplete_reason TEXT NOT NULL DEFAULT '',
    lost_reports      INTEGER NOT NULL DEFAULT 0,
    epoch             INTEGER NOT NULL DEFAULT 0,
    last_seq          INTEGER NOT NULL DEFAULT 0,
    set_digest        BLOB NOT NULL,
    -- Incremented by every apply batch that changes the host (open-set cache validity).
    apply_version     INTEGER NOT NULL DEFAULT 0,
    -- Open violations by severity (0..=5) and open package items, maintained by apply.
    open_sev0         INTEGER NOT NULL DEFAULT 0,
    open_sev1         INTEGER NOT NULL DEFAULT 0,
    open_sev2         INTEGER NOT NULL DEFAULT 0,
    open_sev3         INTEGER NOT NULL DEFAULT 0,
    open_sev4         INTEGER NOT NULL DEFAULT 0,
    open_sev5         INTEGER NOT NULL DEFAULT 0,
    open_packages     INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX hosts_image ON hosts (image_id);

CREATE TABLE host_labels (
    host_pk INTEGER NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (host_pk, key)
) STRICT, WITHOUT ROWID;

CREATE TABLE certificates (
    serial        BLOB PRIMARY KEY,
    host_pk       INTEGER NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    not_before_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    issued_ms     INTEGER NOT NULL,
    revoked_ms    INTEGER
) STRICT;
CREATE INDEX certificates_host ON certificates (host_pk);
CREATE INDEX certificates_revoked ON certificates (not_after_ms) WHERE revoked_ms IS NOT NULL;

-- One row per occurrence of a violation on a host.
CREATE TABLE violations (
    id            INTEGER PRIMARY KEY,
    host_pk       INTEGER NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    key           BLOB NOT NULL,
    item          BLOB NOT NULL,      -- encoded DriftItem
    item_hash     BLOB NOT NULL,      -- driftwatch_proto::set::item_hash of `item`
    path          BLOB,               -- raw path bytes, file items only
    kind          INTEGER NOT NULL,
    severity      INTEGER NOT NULL,
    is_package    INTEGER NOT NULL,
    packages      TEXT NOT NULL,      -- "\x1fname:arch\x1f..." (owners, or the package itself)
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    resolved_ms   INTEGER
) STRICT;
-- At most one open occurrence per (host, key); the host's open set in key order (digest scan).
CREATE UNIQUE INDEX violations_open ON violations (host_pk, key) WHERE resolved_ms IS NULL;
-- Path glob search: a literal-prefix range scan.
CREATE INDEX violations_path ON violations (path) WHERE path IS NOT NULL;
-- Host view history and time-window searches.
CREATE INDEX violations_host_seen ON violations (host_pk, last_seen_ms);
CREATE INDEX violations_seen ON violations (last_seen_ms);

CREATE TABLE security_events (
    id           INTEGER PRIMARY KEY,
    at_ms        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    peer_host_id TEXT,
    detail       TEXT NOT NULL
) STRICT;
CREATE INDEX security_events_at ON security_events (at_ms);
