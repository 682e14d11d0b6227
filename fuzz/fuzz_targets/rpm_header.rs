//! Fuzzes `packages::rpm::parse_header`, the decoder of rpm header blobs as the rpm database
//! stores them (untrusted bytes from a root's `rpmdb.sqlite`), and `RpmHeader::to_package`,
//! which turns an accepted header into manifest entries.
//!
//! Neither may panic, hang or allocate without bound; whatever is accepted must follow the
//! documented rules: one package file per header file, in order; paths in baseline form;
//! permission bits within 7777 and type bits within S_IFMT; the version ends in
//! `version-release`. The seeds in `fuzz/seeds/rpm_header/` are real headers written by rpm
//! 4.18 (a region of 52 entries plus 9 install-time dribbles).
#![no_main]

use driftwatch_agent::packages::rpm;
use libfuzzer_sys::fuzz_target;

/// The baseline path rules: absolute, no empty, `.` or `..` component, no trailing slash, no NUL.
fn valid_path(p: &[u8]) -> bool {
    driftwatch_proto::path::validate(p).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let header = match rpm::parse_header(data) {
        Ok(h) => h,
        // Error messages are shown to people: rendering them must not panic either.
        Err(e) => {
            assert!(
                e.byte <= data.len(),
                "error position {} past the blob",
                e.byte
            );
            drop(e.to_string());
            return;
        }
    };
    let (package, note) = match header.to_package() {
        Ok(p) => p,
        Err(e) => {
            drop(e);
            return;
        }
    };
    drop(note);
    assert_eq!(package.files.len(), header.files.len());
    assert!(
        package
            .version
            .ends_with(&format!("{}-{}", header.version, header.release))
    );
    for (f, raw) in package.files.iter().zip(&header.files) {
        assert!(valid_path(&f.path), "invalid path accepted: {:?}", f.path);
        assert!(raw.path.starts_with(&f.path));
        assert!(f.mode.is_none_or(|m| m <= 0o7777));
        assert!(f.file_type.is_none_or(|t| t & !0o170000 == 0));
        assert_eq!(f.link_target.is_some(), !raw.link_to.is_empty());
        if let Some(d) = &f.digest {
            assert_eq!(2 * d.bytes().len(), raw.digest.len());
        }
    }
});
