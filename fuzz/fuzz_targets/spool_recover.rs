//! Fuzzes `spool::Spool::open`, the recovery of the agent's outbox from whatever its directory
//! holds after a crash or disk damage.
//!
//! Input: one flags byte; if bit 0 is set, the next 72 bytes (or fewer) are the `meta` file;
//! the rest is a segment file, split into two consecutive segments at the offset in the next
//! two bytes if bit 1 is set. `open` must not panic, hang or allocate without bound; when it
//! succeeds, `pending()` must read back exactly the recovered records, each one a correctly
//! encoded record present in the input, in strictly increasing seq order below `next_seq`; a
//! new append gets a fresh seq; and a second open finds a clean spool with the same records
//! (damage is repaired, and reported, once).
#![no_main]

use std::fs;
use std::path::Path;

use driftwatch_agent::spool::{self, Record, Spool, SpoolLimits};
use libfuzzer_sys::fuzz_target;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn read_all(s: &Spool) -> Vec<Record> {
    s.pending()
        .collect::<Result<Vec<_>, _>>()
        .expect("pending() failed right after a successful open")
}

fn limits() -> SpoolLimits {
    SpoolLimits::new(4 << 20, 1 << 20, 64 << 10).expect("valid limits")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("write fuzz input");
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    // tmpfs where there is one: recovery fsyncs, and disk fsyncs would dominate the run.
    let dir = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let dir = dir.path();
    if flags & 1 != 0 {
        let n = rest.len().min(72);
        write(dir, "meta", &rest[..n]);
        rest = &rest[n..];
    }
    let mut second: &[u8] = &[];
    if flags & 2 != 0 && rest.len() >= 2 {
        let at = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let at = at.min(rest.len());
        second = &rest[at..];
        rest = &rest[..at];
    }
    write(dir, "00000000000000000001.seg", rest);
    if !second.is_empty() {
        write(dir, "00000000000000000002.seg", second);
    }

    let (mut s, recovery) = match Spool::open(dir, limits()) {
        Ok(x) => x,
        Err(e) => {
            drop(e.to_string());
            return;
        }
    };
    drop(recovery.to_string());
    let records = read_all(&s);
    assert_eq!(records.len() as u64, recovery.records_recovered);
    assert_eq!(s.stats().records, recovery.records_recovered);
    assert_eq!(s.stats().oldest_seq, records.first().map(|r| r.seq));
    let mut last = 0;
    for r in &records {
        assert!(r.seq > last, "seq {} after {last}", r.seq);
        assert!(r.seq < s.next_seq());
        last = r.seq;
        assert!(
            contains(
                data,
                &spool::encode_record(r.seq, r.epoch, false, &r.payload)
            ) || contains(
                data,
                &spool::encode_record(r.seq, r.epoch, true, &r.payload)
            ),
            "record {} is not a valid record of the input",
            r.seq
        );
    }
    let seq = s.append(b"fuzz").expect("append after open");
    assert!(seq > last);
    drop(s);

    let (s, again) = Spool::open(dir, limits()).expect("reopen");
    assert!(again.is_clean(), "second open not clean: {again}");
    let mut expect = records;
    expect.push(Record {
        seq,
        epoch: s.epoch(),
        payload: b"fuzz".to_vec(),
    });
    assert_eq!(read_all(&s), expect);
});
