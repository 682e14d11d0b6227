//! driftwatch's wire protocol and baseline file format, and the pure helpers every part needs
//! to agree on byte for byte: path rules, the Merkle root over baseline entries and the
//! signature envelope of a baseline header.
//!
//! This crate does no I/O and knows nothing of tokio: it turns values into bytes and hashes and
//! back. Reading and writing files is the agent's job.

pub mod envelope;
pub mod escape;
pub mod host_id;
pub mod layered;
pub mod merkle;
pub mod path;
pub mod set;

/// Generated protobuf types of package `driftwatch.v1`.
#[allow(
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/driftwatch.v1.rs"));
}

/// The encoded `FileDescriptorSet` of every driftwatch .proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/driftwatch_descriptor.bin"));

/// First eight bytes of every baseline file.
pub const BASELINE_MAGIC: [u8; 8] = *b"DWBASE\x00\x01";

/// The baseline format version this crate writes and reads.
pub const BASELINE_FORMAT_VERSION: u32 = 1;

/// Content hash algorithm of baseline format version 1.
pub const HASH_ALGORITHM: &str = "blake3";

/// Length of every hash and Merkle node in this crate.
pub const HASH_LEN: usize = 32;

/// A BLAKE3 digest.
pub type Hash = [u8; HASH_LEN];
