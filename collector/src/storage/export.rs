//! Reads for the SIEM exports (`crate::export`): the fleet's events in time order, page by
//! page, and the syslog forwarder's persisted cursor.
//!
//! An export event is not a stored row of its own: a violation occurrence yields an *opened*
//! event at its `first_seen_ms` and, once resolved, a *resolved* event at its `resolved_ms`; a
//! security event or an audit record is one event at its `at_ms` (audit records by time, with
//! the chain's `seq` as the row id). Each source is read in `(time, row id)` order
//! after an exclusive position, up to a time bound, so a caller can merge the sources and page
//! through any window without offsets (migration 0004 indexes both violation times).

use super::{AuditRecord, SecurityEvent, StoreFuture, ViolationRecord};

/// Which time of a violation occurrence a page is ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationEdge {
    /// `first_seen_ms`: the occurrence was opened.
    Opened,
    /// `resolved_ms`: the occurrence was resolved (only resolved occurrences).
    Resolved,
}

/// An exclusive lower bound of a page: rows strictly after `(at_ms, row)` in `(time, row id)`
/// order. `row = i64::MIN` takes every row at `at_ms`; `row = i64::MAX` none of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowPosition {
    pub at_ms: i64,
    pub row: i64,
}

impl RowPosition {
    /// Before everything.
    pub const START: RowPosition = RowPosition {
        at_ms: i64::MIN,
        row: i64::MIN,
    };
}

/// A violation occurrence with its row id (the tie-break within one millisecond).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportViolation {
    pub row: i64,
    pub record: ViolationRecord,
}

/// A security event with its row id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSecurityEvent {
    pub row: i64,
    pub event: SecurityEvent,
}

/// Where a named export consumer (the syslog forwarder) stands: an opaque position the
/// export module encodes, and when it was saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCursor {
    pub position: String,
    pub saved_ms: i64,
}

/// Export reads. Every page is one read transaction.
pub trait ExportStore {
    /// Violation occurrences whose `edge` time is after `after` (in `(time, row)` order) and at
    /// or before `until_ms`, oldest first, at most `limit` (1 ..= 10 000; 0 means 1000).
    fn export_violations(
        &self,
        edge: ViolationEdge,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<ExportViolation>>;

    /// Security events after `after`, at or before `until_ms`, oldest first.
    fn export_security_events(
        &self,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<ExportSecurityEvent>>;

    /// Audit records after `after` (row = `seq`), at or before `until_ms`, oldest first.
    fn export_audit(
        &self,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<AuditRecord>>;

    /// The saved cursor of consumer `name`, if any.
    fn export_cursor(&self, name: &str) -> StoreFuture<'_, Option<ExportCursor>>;

    /// Saves (creates or replaces) the cursor of consumer `name`.
    fn save_export_cursor(&self, name: &str, cursor: ExportCursor) -> StoreFuture<'_, ()>;
}

/// The page size a `limit` of 0 means, and the largest one honoured.
pub const DEFAULT_EXPORT_PAGE: u32 = 1000;
pub const MAX_EXPORT_PAGE: u32 = 10_000;

pub(crate) fn page_limit(limit: u32) -> i64 {
    i64::from(if limit == 0 {
        DEFAULT_EXPORT_PAGE
    } else {
        limit.min(MAX_EXPORT_PAGE)
    })
}
