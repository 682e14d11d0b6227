//! Fuzzes the dpkg database parsers (`packages::dpkg`): `parse_status` on arbitrary bytes, and
//! the `.list`, `.md5sums`, `diversions` and `statoverride` parsers on the same bytes (they
//! are cheap). None may panic; whatever they accept must follow the documented rules (paths in
//! baseline form, names dpkg allows, modes within 7777), and an accepted status file written
//! back in canonical form must parse to the same records.
#![no_main]

use std::fmt::Write as _;
use std::path::Path;

use driftwatch_agent::packages::dpkg::{self, StatusRecord};
use libfuzzer_sys::fuzz_target;

/// The baseline path rules: absolute, no empty, `.` or `..` component, no trailing slash, no NUL.
fn valid_path(p: &[u8]) -> bool {
    driftwatch_proto::path::validate(p).is_ok()
}

fn valid_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-+._".contains(&b))
}

/// The records as dpkg would write them (only the fields the parser keeps).
fn canonical(records: &[StatusRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let mut text = String::new();
        let _ = writeln!(text, "Package: {}", r.name);
        let _ = writeln!(
            text,
            "Status: {} {} {}",
            r.want.as_str(),
            r.error.as_str(),
            r.state.as_str()
        );
        if !r.arch.is_empty() {
            let _ = writeln!(text, "Architecture: {}", r.arch);
        }
        let _ = writeln!(text, "Multi-Arch: {}", r.multi_arch.as_str());
        if !r.version.is_empty() {
            let _ = writeln!(text, "Version: {}", r.version);
        }
        out.extend_from_slice(text.as_bytes());
        if !r.conffiles.is_empty() {
            out.extend_from_slice(b"Conffiles:\n");
            for c in &r.conffiles {
                out.push(b' ');
                out.extend_from_slice(&c.path);
                match c.md5 {
                    Some(md5) => {
                        out.push(b' ');
                        for b in md5 {
                            out.extend_from_slice(format!("{b:02x}").as_bytes());
                        }
                    }
                    None => out.extend_from_slice(b" newconffile"),
                }
                if c.obsolete {
                    out.extend_from_slice(b" obsolete");
                }
                if c.remove_on_upgrade {
                    out.extend_from_slice(b" remove-on-upgrade");
                }
                out.push(b'\n');
            }
        }
        out.push(b'\n');
    }
    out
}

fn without_lines(records: &[StatusRecord]) -> Vec<StatusRecord> {
    records
        .iter()
        .cloned()
        .map(|mut r| {
            r.line = 0;
            r
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz");
    match dpkg::parse_status(data, file) {
        Ok(records) => {
            assert!(
                records
                    .windows(2)
                    .all(|w| (&w[0].name, &w[0].arch) < (&w[1].name, &w[1].arch)),
                "records not sorted by (name, arch) or duplicated"
            );
            for r in &records {
                assert!(valid_name(&r.name), "invalid name {:?}", r.name);
                assert!(
                    r.arch
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                );
                assert!(r.version.bytes().all(|b| b.is_ascii_graphic()));
                for c in &r.conffiles {
                    assert!(valid_path(&c.path));
                    assert!(!c.path.contains(&b'\n'));
                }
            }
            let again = dpkg::parse_status(&canonical(&records), file)
                .unwrap_or_else(|e| panic!("canonical form of accepted records refused: {e}"));
            assert_eq!(without_lines(&records), without_lines(&again));
        }
        // Messages are shown to people: rendering them must not panic either.
        Err(e) => drop(e.to_string()),
    }
    match dpkg::parse_list(data, file) {
        Ok(paths) => {
            for p in &paths {
                assert!(valid_path(p));
            }
        }
        Err(e) => drop(e.to_string()),
    }
    match dpkg::parse_md5sums(data, file) {
        Ok(sums) => {
            for s in &sums {
                let mut path = b"/".to_vec();
                path.extend_from_slice(&s.path);
                assert!(valid_path(&path));
                assert_ne!(path, b"/");
            }
        }
        Err(e) => drop(e.to_string()),
    }
    match dpkg::parse_diversions(data, file) {
        Ok(diversions) => {
            for d in &diversions {
                assert!(valid_path(&d.from));
                assert!(valid_path(&d.to));
                assert!(d.package.as_deref().is_none_or(valid_name));
            }
        }
        Err(e) => drop(e.to_string()),
    }
    match dpkg::parse_statoverride(data, file) {
        Ok(overrides) => {
            for o in &overrides {
                assert!(valid_path(&o.path));
                assert!(o.mode <= 0o7777);
                assert!(!o.user.is_empty() && !o.group.is_empty());
            }
        }
        Err(e) => drop(e.to_string()),
    }
});
