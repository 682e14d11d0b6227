//! The audit log: every state-changing action as one record in a hash chain.
//!
//! Record `n` stores the hash of record `n − 1` (`prev_hash`; 32 zero bytes for the first) and
//! its own hash over that and its fields ([`chain_hash`]). Altering a stored record breaks its
//! hash; deleting one breaks the sequence and the next record's `prev_hash`; reordering breaks
//! both. [`ChainVerifier`] walks the records in order and names the first bad one. Truncating
//! the *end* of the log cannot be seen from the log alone: [`ChainHead`] (last seq and hash) is
//! what an auditor keeps elsewhere and compares later (`driftwatch audit verify --expect-head`).
//!
//! What this module owns: the record types, the hash and the verification, all pure. The
//! backends append a record in the same transaction as the change it describes
//! (`sqlite::audit::append_tx`, `postgres::audit::append_tx`), so a change is never stored
//! without its record nor a record without its change. What it must never do: rewrite or
//! delete a record.

use std::fmt;

use ring::digest;

use super::{StorageError, StoreFuture};

/// Domain separation of the chain hash (and its version).
const HASH_DOMAIN: &[u8] = b"driftwatch-audit-v1\0";

/// `prev_hash` of the first record.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Longest `actor`, `action` or `target` accepted, in bytes; longer values are a caller bug.
pub const MAX_FIELD: usize = 1024;
/// Longest serialized `detail`, in bytes.
pub const MAX_DETAIL: usize = 64 * 1024;

/// What happened, by whom, to what — before it is appended.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// `token:<id>`, `local:<unix user>`, `host:<host id>` or `collector`.
    pub actor: String,
    /// A dotted lower-case verb: `host.enrolled`, `rebuild.triggered`, …
    pub action: String,
    /// What it was done to: a host id, a token id, an image id, … (may be empty).
    pub target: String,
    pub detail: serde_json::Value,
}

impl AuditEntry {
    pub fn new(
        at_ms: i64,
        actor: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
        detail: serde_json::Value,
    ) -> AuditEntry {
        AuditEntry {
            at_ms,
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            detail,
        }
    }

    /// The detail as stored (and hashed): compact JSON. Checks the field limits.
    pub(crate) fn detail_text(&self) -> Result<String, StorageError> {
        for (name, v) in [
            ("actor", &self.actor),
            ("action", &self.action),
            ("target", &self.target),
        ] {
            if v.len() > MAX_FIELD {
                return Err(StorageError::InvalidArgument(format!(
                    "audit {name} is {} bytes, at most {MAX_FIELD}",
                    v.len()
                )));
            }
        }
        if self.action.is_empty() || self.actor.is_empty() {
            return Err(StorageError::InvalidArgument(
                "audit actor and action must not be empty".into(),
            ));
        }
        let text = serde_json::to_string(&self.detail)
            .map_err(|e| StorageError::InvalidArgument(format!("audit detail: {e}")))?;
        if text.len() > MAX_DETAIL {
            return Err(StorageError::InvalidArgument(format!(
                "audit detail is {} bytes, at most {MAX_DETAIL}",
                text.len()
            )));
        }
        Ok(text)
    }
}

/// One stored record, exactly as read back (nothing decoded that could fail: a tampered row
/// must reach the verifier, not an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// The detail's JSON text as stored.
    pub detail: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl AuditRecord {
    /// The hash this record should have, given its stored fields.
    pub fn expected_hash(&self) -> [u8; 32] {
        chain_hash(
            &self.prev_hash,
            self.seq,
            self.at_ms,
            &self.actor,
            &self.action,
            &self.target,
            &self.detail,
        )
    }
}

/// The hash of record `seq`: SHA-256 over a domain tag, the previous hash and the fields,
/// each variable-length field prefixed with its length (u64, big-endian) so that no two
/// different records hash alike by moving bytes between fields.
pub fn chain_hash(
    prev_hash: &[u8],
    seq: u64,
    at_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(HASH_DOMAIN);
    ctx.update(&(prev_hash.len() as u64).to_be_bytes());
    ctx.update(prev_hash);
    ctx.update(&seq.to_be_bytes());
    ctx.update(&at_ms.to_be_bytes());
    for field in [actor, action, target, detail] {
        ctx.update(&(field.len() as u64).to_be_bytes());
        ctx.update(field.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The last record of a verified chain: what an auditor notes to detect a truncated tail
/// later. Shown as `<seq>:<hex hash>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl fmt::Display for ChainHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.seq)?;
        for b in self.hash {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ChainHead {
    type Err = String;

    fn from_str(s: &str) -> Result<ChainHead, String> {
        let (seq, hex) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not <seq>:<64 hex digits>"))?;
        let seq = seq
            .parse::<u64>()
            .map_err(|_| format!("{seq:?} is not a record number"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hex:?} is not 64 hex digits"));
        }
        let mut hash = [0u8; 32];
        for (i, out) in hash.iter_mut().enumerate() {
            *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{hex:?} is not 64 hex digits"))?;
        }
        Ok(ChainHead { seq, hash })
    }
}

/// Why a record fails verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "audit record {found}: expected record {expected} here (a record is missing or out of order)"
    )]
    Sequence { expected: u64, found: u64 },
    #[error(
        "audit record {seq}: does not link to the record before it (prev_hash differs: a record before it was altered, removed or reordered)"
    )]
    Link { seq: u64 },
    #[error("audit record {seq}: its hash does not match its contents (the record was altered)")]
    Hash { seq: u64 },
    #[error(
        "the audit log (ending at {found}) does not contain record {expected} seen in it before (records were removed from its end, or it was rewritten)"
    )]
    Head {
        expected: ChainHead,
        found: ChainHeadOrEmpty,
    },
}

impl ChainError {
    /// The first bad record, where there is one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ChainError::Sequence { found, .. } => Some(*found),
            ChainError::Link { seq } | ChainError::Hash { seq } => Some(*seq),
            ChainError::Head { .. } => None,
        }
    }
}

/// A chain end for messages: `<seq>:<hash>` or "an empty log".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHeadOrEmpty(pub Option<ChainHead>);

impl fmt::Display for ChainHeadOrEmpty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => h.fmt(f),
            None => f.write_str("an empty log"),
        }
    }
}

/// Verifies a chain fed to it in order, page by page, in constant memory.
#[derive(Debug, Clone, Default)]
pub struct ChainVerifier {
    head: Option<ChainHead>,
    count: u64,
    /// A head remembered from an earlier verification, and whether this chain contains it.
    expect: Option<(ChainHead, bool)>,
}

impl ChainVerifier {
    pub fn new() -> ChainVerifier {
        ChainVerifier::default()
    }

    /// A verifier that also checks, in [`ChainVerifier::finish`], that the chain still
    /// contains `head` (noted earlier): the only way to see records removed from the end.
    pub fn expecting(head: ChainHead) -> ChainVerifier {
        ChainVerifier {
            expect: Some((head, false)),
            ..ChainVerifier::default()
        }
    }

    /// Checks the next record. After an error the verifier must not be fed more.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), ChainError> {
        let (expected_seq, expected_prev) = match self.head {
            Some(h) => (h.seq + 1, h.hash),
            None => (1, GENESIS_HASH),
        };
        if r.seq != expected_seq {
            return Err(ChainError::Sequence {
                expected: expected_seq,
                found: r.seq,
            });
        }
        if r.prev_hash != expected_prev {
            return Err(ChainError::Link { seq: r.seq });
        }
        let hash = r.expected_hash();
        if r.hash != hash {
            return Err(ChainError::Hash { seq: r.seq });
        }
        if let Some((want, found)) = &mut self.expect
            && want.seq == r.seq
        {
            *found = want.hash == hash;
        }
        self.head = Some(ChainHead { seq: r.seq, hash });
        self.count += 1;
        Ok(())
    }

    /// Records verified so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// After the last record: the chain's end, or why the remembered head is not in it.
    pub fn finish(&self) -> Result<Option<ChainHead>, ChainError> {
        match self.expect {
            Some((expected, false)) => Err(ChainError::Head {
                expected,
                found: ChainHeadOrEmpty(self.head),
            }),
            _ => Ok(self.head),
        }
    }
}

/// Reading and appending audit records outside another change.
pub trait AuditStore {
    /// Appends one record on its own (for events with no other state change, such as a
    /// webhook attempt's outcome). Returns its seq.
    fn append_audit(&self, entry: AuditEntry) -> StoreFuture<'_, u64>;

    /// Records with `seq > after_seq` in order, at most `limit` (0: the default search limit).
    fn audit_records(&self, after_seq: u64, limit: u32) -> StoreFuture<'_, Vec<AuditRecord>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_vec();
        (1..=n)
            .map(|seq| {
                let mut r = AuditRecord {
                    seq,
                    at_ms: 1_700_000_000_000 + seq as i64,
                    actor: "token:0123abcd".into(),
                    action: "host.retired".into(),
                    target: format!("web-{seq}"),
                    detail: format!("{{\"reason\":\"r{seq}\"}}"),
                    prev_hash: prev.clone(),
                    hash: Vec::new(),
                };
                r.hash = r.expected_hash().to_vec();
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn verify(records: &[AuditRecord]) -> Result<ChainVerifier, ChainError> {
        let mut v = ChainVerifier::new();
        for r in records {
            v.push(r)?;
        }
        Ok(v)
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let c = chain(5);
        let v = verify(&c).unwrap();
        assert_eq!(v.count(), 5);
        let head = v.finish().unwrap().unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(head.hash.to_vec(), c[4].hash);
        assert_eq!(head.to_string().parse::<ChainHead>().unwrap(), head);
        assert_eq!(ChainVerifier::new().finish().unwrap(), None);
    }

    #[test]
    fn altering_any_field_fails_at_that_record() {
        type Alter = fn(&mut AuditRecord);
        let alterations: [Alter; 6] = [
            |r| r.at_ms += 1,
            |r| r.actor.push('x'),
            |r| r.action = "host.enrolled".into(),
            |r| r.target.clear(),
            |r| r.detail = "{\"reason\":\"other\"}".into(),
            |r| r.hash[0] ^= 1,
        ];
        for alter in alterations {
            let mut c = chain(5);
            alter(&mut c[2]);
            assert_eq!(verify(&c).unwrap_err(), ChainError::Hash { seq: 3 });
        }
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_hash() {
        let a = chain_hash(&GENESIS_HASH, 1, 0, "ab", "c", "", "{}");
        let b = chain_hash(&GENESIS_HASH, 1, 0, "a", "bc", "", "{}");
        assert_ne!(a, b);
    }

    #[test]
    fn deleting_a_record_fails_at_the_next_one() {
        let mut c = chain(5);
        c.remove(2);
        assert_eq!(
            verify(&c).unwrap_err(),
            ChainError::Sequence {
                expected: 3,
                found: 4
            }
        );
    }

    #[test]
    fn deleting_and_renumbering_fails_on_the_link() {
        let mut c = chain(5);
        c.remove(2);
        for (i, r) in c.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
        assert_eq!(verify(&c).unwrap_err(), ChainError::Link { seq: 3 });
    }

    #[test]
    fn reordering_fails_at_the_first_moved_record() {
        let mut c = chain(5);
        c.swap(1, 3);
        let err = verify(&c).unwrap_err();
        assert_eq!(err.seq(), Some(4));
        // Swapping contents but keeping the seq numbers in place.
        let mut c = chain(5);
        let (s1, s3) = (c[1].seq, c[3].seq);
        c.swap(1, 3);
        c[1].seq = s1;
        c[3].seq = s3;
        assert_eq!(verify(&c).unwrap_err(), ChainError::Link { seq: 2 });
    }

    #[test]
    fn a_truncated_tail_is_caught_only_against_a_remembered_head() {
        let c = chain(5);
        let full = verify(&c).unwrap().finish().unwrap().unwrap();
        let earlier = verify(&c[..3]).unwrap().finish().unwrap().unwrap();
        let check = |records: &[AuditRecord], head| {
            let mut v = ChainVerifier::expecting(head);
            for r in records {
                v.push(r)?;
            }
            v.finish()
        };
        // Without a remembered head, the first three records look like a whole chain.
        verify(&c[..3]).unwrap().finish().unwrap();
        let err = check(&c[..3], full).unwrap_err();
        assert!(matches!(err, ChainError::Head { .. }));
        assert!(err.to_string().contains(&full.to_string()), "{err}");
        assert_eq!(check(&c, earlier).unwrap(), Some(full));
        assert!(check(&[], earlier).is_err());
        // A chain rewritten from the start (consistent in itself) does not contain the head.
        let mut other = chain(5);
        other[0].detail = "{}".into();
        let mut prev = GENESIS_HASH.to_vec();
        for r in &mut other {
            r.prev_hash = prev;
            r.hash = r.expected_hash().to_vec();
            prev = r.hash.clone();
        }
        verify(&other).unwrap();
        assert!(check(&other, full).is_err());
    }

    #[test]
    fn the_head_parser_refuses_garbage() {
        for bad in ["", "5", "x:00", "5:zz", &format!("5:{}", "0".repeat(63))] {
            assert!(bad.parse::<ChainHead>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entries_over_the_limits_are_refused() {
        let mut e = AuditEntry::new(
            0,
            "collector",
            "host.flagged",
            "web-1",
            serde_json::json!({}),
        );
        assert_eq!(e.detail_text().unwrap(), "{}");
        e.target = "x".repeat(MAX_FIELD + 1);
        assert!(e.detail_text().is_err());
        e.target.clear();
        e.detail = serde_json::json!({ "big": "y".repeat(MAX_DETAIL) });
        assert!(e.detail_text().is_err());
        e.detail = serde_json::json!({});
        e.action.clear();
        assert!(e.detail_text().is_err());
    }
}
