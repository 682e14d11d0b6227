-- Violation updates that touch no indexed column (issue 4's ingest rate on PostgreSQL).
-- Every report updates most of its host's open rows: new content and last_seen_ms, or
-- last_seen_ms alone. With last_seen_ms in two indexes no such update could be HOT, so each
-- one added an entry to all seven indexes of the table. Without them, and with room left on
-- each page for a new version of every row on it (fillfactor 50: a report updates nearly all
-- of a host's open rows at once, and dead versions are pruned from the page before the next),
-- the new row version stays on its page and no index is written (resolving an item still is
-- not HOT: resolved_ms decides the partial indexes). Measured by hand on 600,000 rows, 96,000
-- updated per statement: 0 % HOT before, 100 % after, each statement about 10 x faster.
-- The price: a host's rows (resolved ones too) are found by (host_pk, id) instead of
-- (host_pk, last_seen_ms), and searches, ordered by last_seen_ms, sort what their filters
-- select. With a host or a path glob that is a few hundred rows (EXPLAIN ANALYZE on the same
-- 600,000 rows: 2-20 ms, as before); a fleet-wide search by time or image alone reads the
-- whole table and keeps the newest (0.26-0.5 s there, was 2-25 ms through violations_seen).
-- Existing pages get the room as they are rewritten (VACUUM FULL); new pages at once.
DROP INDEX violations_seen;
DROP INDEX violations_host_seen;
CREATE INDEX violations_host ON violations (host_pk, id);
ALTER TABLE violations SET (fillfactor = 50);
-- One row update per host per report batch; its indexed columns (pk, host_id, image_id)
-- do not change, so the room makes those updates HOT too.
ALTER TABLE hosts SET (fillfactor = 70);
