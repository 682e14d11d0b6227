//! driftwatch agent library: everything `driftwatch-agent` does, as testable code.
//!
//! - [`scan`] walks a root and observes objects; [`hash`] hashes one file safely.
//! - [`policy`] decides scope, attributes and severities; [`diff`] compares values (pure).
//! - [`baseline`] reads and writes signed baseline files; [`create`] and [`check`] are the two
//!   pipelines built on them; [`cache`] makes re-checks cheap; [`report`] renders results.
//! - [`packages`] reads dpkg and rpm databases and verifies package files (`verify-packages`);
//!   [`attribution`] (pure) turns package drift into owners and classes of file violations.
//! - [`wire`] (pure) turns check results into the protocol's drift items; [`report_set`] (pure)
//!   tracks the host's violation set and makes the reports that carry its changes.
//! - [`identity`], [`enroll`] and [`transport`]: the host's certificate, enrollment and renewal,
//!   and the mutual-TLS gRPC connection to the collector; [`spool`] is the durable outbox;
//!   [`daemon`] is `driftwatch-agent run`, tying scans, spool and report stream together.
//! - [`spool`] is the daemon's durable outbox: checksummed, synced records that leave only when
//!   the collector acknowledged them.

pub mod attribution;
pub mod baseline;
pub mod cache;
pub mod check;
pub mod cli;
pub mod create;
pub mod daemon;
pub mod diff;
pub mod enroll;
pub mod escape;
pub mod fsutil;
pub mod hash;
pub mod identity;
pub mod keys;
pub mod packages;
pub mod policy;
pub mod report;
pub mod report_set;
pub mod scan;
pub mod spool;
pub mod time;
pub mod transport;
pub mod wire;
