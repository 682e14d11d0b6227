-- driftwatch collector schema, version 5 (PostgreSQL): host lifecycle, image registry,
-- acknowledgements of violations.

-- A host's current lifecycle state; a host without a row is 'enrolled' since enrolled_ms.
CREATE TABLE host_lifecycle (
    host_pk  bigint PRIMARY KEY REFERENCES hosts (pk) ON DELETE CASCADE,
    state    text NOT NULL,
    since_ms bigint NOT NULL
);

-- Every transition, with its cause and actor.
CREATE TABLE host_transitions (
    id         bigserial PRIMARY KEY,
    host_pk    bigint NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    from_state text NOT NULL,
    to_state   text NOT NULL,
    at_ms      bigint NOT NULL,
    cause      text NOT NULL,
    actor      text NOT NULL
);
CREATE INDEX host_transitions_host ON host_transitions (host_pk, id);

-- Every baseline pushed for an image id; the newest version is the registered one.
CREATE TABLE image_baselines (
    image_id      text NOT NULL,
    image_version text NOT NULL,
    merkle_root   bytea NOT NULL,
    signer        text NOT NULL,
    created_unix  bigint NOT NULL,
    expires_unix  bigint,
    entry_count   bigint NOT NULL,
    pushed_ms     bigint NOT NULL,
    actor         text NOT NULL,
    PRIMARY KEY (image_id, image_version)
);

-- An operator's acknowledgement of one open violation (by key and exact item hash).
CREATE TABLE violation_acks (
    id         bigserial PRIMARY KEY,
    host_pk    bigint NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    key        bytea NOT NULL,
    item_hash  bytea NOT NULL,
    path       bytea,
    package    text,
    reason     text NOT NULL,
    actor      text NOT NULL,
    at_ms      bigint NOT NULL,
    expires_ms bigint NOT NULL
);
CREATE INDEX violation_acks_expires ON violation_acks (expires_ms);
CREATE INDEX violation_acks_host ON violation_acks (host_pk, key);
