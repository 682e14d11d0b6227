-- driftwatch collector schema, version 5 (SQLite): host lifecycle, image registry,
-- acknowledgements of violations.

-- A host's current lifecycle state; a host without a row is 'enrolled' since enrolled_ms.
CREATE TABLE host_lifecycle (
    host_pk  INTEGER PRIMARY KEY REFERENCES hosts (pk) ON DELETE CASCADE,
    state    TEXT NOT NULL,
    since_ms INTEGER NOT NULL
) STRICT;

-- Every transition, with its cause and actor.
CREATE TABLE host_transitions (
    id         INTEGER PRIMARY KEY,
    host_pk    INTEGER NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    at_ms      INTEGER NOT NULL,
    cause      TEXT NOT NULL,
    actor      TEXT NOT NULL
) STRICT;
CREATE INDEX host_transitions_host ON host_transitions (host_pk, id);

-- Every baseline pushed for an image id; the newest version is the registered one.
CREATE TABLE image_baselines (
    image_id      TEXT NOT NULL,
    image_version TEXT NOT NULL,
    merkle_root   BLOB NOT NULL,
    signer        TEXT NOT NULL,
    created_unix  INTEGER NOT NULL,
    expires_unix  INTEGER,
    entry_count   INTEGER NOT NULL,
    pushed_ms     INTEGER NOT NULL,
    actor         TEXT NOT NULL,
    PRIMARY KEY (image_id, image_version)
) STRICT;

-- An operator's acknowledgement of one open violation (by key and exact item hash).
CREATE TABLE violation_acks (
    id         INTEGER PRIMARY KEY,
    host_pk    INTEGER NOT NULL REFERENCES hosts (pk) ON DELETE CASCADE,
    key        BLOB NOT NULL,
    item_hash  BLOB NOT NULL,
    path       BLOB,
    package    TEXT,
    reason     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    at_ms      INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX violation_acks_expires ON violation_acks (expires_ms);
CREATE INDEX violation_acks_host ON violation_acks (host_pk, key);
