-- Exports (issue 5): time-ordered reads of violation events and the syslog forwarder's cursor.
-- SQLite appends the rowid to every index, so these serve ORDER BY (time, id).
CREATE INDEX violations_first_seen ON violations (first_seen_ms);
CREATE INDEX violations_resolved ON violations (resolved_ms) WHERE resolved_ms IS NOT NULL;
CREATE INDEX audit_log_at ON audit_log (at_ms);

-- Where each named export consumer stands (position: opaque to storage, see crate::export).
CREATE TABLE export_cursors (
    name     TEXT PRIMARY KEY,
    position TEXT NOT NULL,
    saved_ms INTEGER NOT NULL
) STRICT;
