-- driftwatch collector schema, version 2 (PostgreSQL): the hash-chained audit log
-- (collector/src/storage/audit.rs). Rows are only ever appended; appends are serialized by a
-- transaction-scoped advisory lock.

CREATE TABLE audit_log (
    seq       bigint PRIMARY KEY,
    at_ms     bigint NOT NULL,
    actor     text NOT NULL,
    action    text NOT NULL,
    target    text NOT NULL,
    detail    text NOT NULL,
    prev_hash bytea NOT NULL,
    hash      bytea NOT NULL
);
