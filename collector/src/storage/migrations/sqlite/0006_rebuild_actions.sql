-- Rebuild actions (issue 5): one row per flagging of a host (the idempotency key), and one
-- row per delivery attempt.
CREATE TABLE rebuild_actions (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    host_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    role TEXT,
    flagged_ms INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    state TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    triggered_ms INTEGER,
    finished_ms INTEGER,
    attempts INTEGER NOT NULL,
    next_attempt_ms INTEGER,
    last_error TEXT,
    decided_by TEXT,
    decision_reason TEXT,
    note TEXT,
    payload BLOB
);
CREATE INDEX rebuild_actions_state ON rebuild_actions (state);
CREATE INDEX rebuild_actions_host ON rebuild_actions (host_id, created_ms);
CREATE INDEX rebuild_actions_triggered ON rebuild_actions (triggered_ms);
CREATE INDEX rebuild_actions_created ON rebuild_actions (created_ms);

CREATE TABLE rebuild_attempts (
    action_id TEXT NOT NULL REFERENCES rebuild_actions (id),
    attempt INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    status INTEGER,
    detail TEXT NOT NULL,
    PRIMARY KEY (action_id, attempt)
);
