-- driftwatch collector schema, version 1 (PostgreSQL).
-- u64 values (epochs, seqs, counters) are stored bit-for-bit in bigint columns.

CREATE TABLE enrollment_tokens (
    id            text PRIMARY KEY,
    secret_sha256 bytea NOT NULL UNIQUE,
    created_ms    bigint NOT NULL,
    expires_ms    bigint NOT NULL,
    uses_left     bigint NOT NULL,
    host_pattern  text
);

CREATE TABLE hosts (
    pk                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host_id           text NOT NULL UNIQUE,
    enrolled_ms       bigint NOT NULL,
    agent_version     text NOT NULL DEFAULT '',
    image_id          text NOT NULL DEFAULT '',
    image_version     text NOT NULL DEFAULT '',
    baseline_root     bytea NOT NULL DEFAULT '',
    boot_id           text NOT NULL DEFAULT '',
    hello_epoch       bigint NOT NULL DEFAULT 0,
    last_seen_ms      bigint,
    last_scan_ms      bigint,
    last_scan_status  integer NOT NULL DEFAULT 0,
    last_report_ms    bigint,
    incomplete        boolean NOT NULL DEFAULT false,
    incomplete_reason text NOT NULL DEFAULT '',
    lost_reports      bigint NOT NULL DEFAULT 0,
    epoch             bigint NOT NULL DEFAULT 0,
    last_seq          bigint NOT NULL DEFAULT 0,
    set_digest        bytea NOT NULL,
    -- Incremented by every apply batch that changes the host (open-set cache validity).
    apply_version     bigint NOT NULL DEFAULT 0,
    -- Open violations by severity (0..=5) and open package items, maintained by apply.
    open_sev0         bigint NOT NULL DEFAULT 0,
    open_sev1         bigint NOT NULL DEFAULT 0,
    open_sev2         bigint NOT NULL DEFAULT 0,
    open_sev3         bigint NOT NULL DEFAULT 0,
    open_sev4         bigint NOT NULL DEFAULT 0,
    open_sev5         bigint NOT NULL DEFAULT 0,
    open_packages     bigint NOT NULL DEFAULT 0
);
CREATE INDEX hosts_image ON hosts (image_id);

CREATE TABLE host_labels (
    host_pk bigint NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    key     text NOT NULL,
    value   text NOT NULL,
    PRIMARY KEY (host_pk, key)
);

CREATE TABLE certificates (
    serial        bytea PRIMARY KEY,
    host_pk       bigint NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    not_before_ms bigint NOT NULL,
    not_after_ms  bigint NOT NULL,
    issued_ms     bigint NOT NULL,
    revoked_ms    bigint
);
CREATE INDEX certificates_host ON certificates (host_pk);
CREATE INDEX certificates_revoked ON certificates (not_after_ms) WHERE revoked_ms IS NOT NULL;

-- One row per occurrence of a violation on a host. Ids are taken from the sequence by the
-- writer before it inserts (so it knows them without RETURNING).
-- host_pk has no FOREIGN KEY constraint: its per-row check trigger cost about a third of the
-- insert time of a batch. Rows are only inserted by apply, for a host row it has locked FOR
-- UPDATE in the same transaction, so the reference holds by construction; deleting a host
-- (not implemented yet) must delete its violations in the same transaction.
CREATE SEQUENCE violations_id_seq AS bigint;
CREATE TABLE violations (
    id            bigint PRIMARY KEY DEFAULT nextval('violations_id_seq'),
    host_pk       bigint NOT NULL,
    key           bytea NOT NULL,
    item          bytea NOT NULL,      -- encoded DriftItem
    item_hash     bytea NOT NULL,      -- driftwatch_proto::set::item_hash of `item`
    path          bytea,               -- raw path bytes, file items only
    kind          integer NOT NULL,
    severity      integer NOT NULL,
    is_package    boolean NOT NULL,
    packages      text NOT NULL,       -- E'\x1fname:arch\x1f...' (owners, or the package itself)
    first_seen_ms bigint NOT NULL,
    last_seen_ms  bigint NOT NULL,
    resolved_ms   bigint
);
ALTER SEQUENCE violations_id_seq OWNED BY violations.id;
-- At most one open occurrence per (host, key); the host's open set.
CREATE UNIQUE INDEX violations_open ON violations (host_pk, key) WHERE resolved_ms IS NULL;
-- Path glob search: a literal-prefix range scan.
CREATE INDEX violations_path ON violations (path) WHERE path IS NOT NULL;
-- Host view history and time-window searches.
CREATE INDEX violations_host_seen ON violations (host_pk, last_seen_ms);
CREATE INDEX violations_seen ON violations (last_seen_ms);

CREATE TABLE security_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms        bigint NOT NULL,
    kind         text NOT NULL,
    peer_host_id text,
    detail       text NOT NULL
);
CREATE INDEX security_events_at ON security_events (at_ms);
