-- The same index shape as PostgreSQL's migration 7. SQLite rewrites an entry of every index
-- whose columns an UPDATE names, so with last_seen_ms in two indexes each updated or
-- confirmed violation rewrote two index entries besides its row. A host's rows (resolved
-- ones too) are found by (host_pk, id) instead; searches, ordered by last_seen_ms, sort what
-- their filters select. SQLite has no fillfactor.
DROP INDEX violations_seen;
DROP INDEX violations_host_seen;
CREATE INDEX violations_host ON violations (host_pk, id);
