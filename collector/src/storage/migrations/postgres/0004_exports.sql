-- Exports (issue 5): time-ordered reads of violation events and the syslog forwarder's cursor.
CREATE INDEX violations_first_seen ON violations (first_seen_ms, id);
CREATE INDEX violations_resolved ON violations (resolved_ms, id) WHERE resolved_ms IS NOT NULL;
CREATE INDEX security_events_at_id ON security_events (at_ms, id);
CREATE INDEX audit_log_at ON audit_log (at_ms, seq);

-- Where each named export consumer stands (position: opaque to storage, see crate::export).
CREATE TABLE export_cursors (
    name     text PRIMARY KEY,
    position text NOT NULL,
    saved_ms bigint NOT NULL
);
