-- Rebuild actions (issue 5): one row per flagging of a host (the idempotency key), and one
-- row per delivery attempt.
CREATE TABLE rebuild_actions (
    id text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    host_id text NOT NULL,
    image_id text NOT NULL,
    role text,
    flagged_ms bigint NOT NULL,
    reasons text NOT NULL,
    state text NOT NULL,
    dry_run boolean NOT NULL,
    created_ms bigint NOT NULL,
    updated_ms bigint NOT NULL,
    triggered_ms bigint,
    finished_ms bigint,
    attempts bigint NOT NULL,
    next_attempt_ms bigint,
    last_error text,
    decided_by text,
    decision_reason text,
    note text,
    payload bytea
);
CREATE INDEX rebuild_actions_state ON rebuild_actions (state);
CREATE INDEX rebuild_actions_host ON rebuild_actions (host_id, created_ms);
CREATE INDEX rebuild_actions_triggered ON rebuild_actions (triggered_ms);
CREATE INDEX rebuild_actions_created ON rebuild_actions (created_ms);

CREATE TABLE rebuild_attempts (
    action_id text NOT NULL REFERENCES rebuild_actions (id),
    attempt bigint NOT NULL,
    at_ms bigint NOT NULL,
    duration_ms bigint NOT NULL,
    delivered boolean NOT NULL,
    status integer,
    detail text NOT NULL,
    PRIMARY KEY (action_id, attempt)
);
