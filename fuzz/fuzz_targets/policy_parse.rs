//! Fuzzes `Policy::from_toml`, the parser of policy files (and of the policy text embedded in
//! a baseline header). It must never panic, and whatever it accepts must round-trip through
//! its canonical text: `from_toml(p.to_toml())` succeeds and prints the same text again.
#![no_main]

use driftwatch_agent::policy::Policy;
use libfuzzer_sys::fuzz_target;

/// Paths to ask every accepted policy about, so glob matching runs on the compiled sets.
const PATHS: [&[u8]; 6] = [
    b"/",
    b"/etc/passwd",
    b"/var/log/syslog",
    b"/home/a/.ssh/authorized_keys",
    b"/a/\xff\xfe/\n",
    b"/proc/1/status",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::from_toml(text) {
        Ok(p) => p,
        Err(e) => {
            drop(e.to_string());
            return;
        }
    };
    let canonical = policy.to_toml();
    assert!(!canonical.is_empty(), "to_toml produced no text");
    let again = match Policy::from_toml(&canonical) {
        Ok(p) => p,
        Err(e) => panic!("canonical text of an accepted policy is refused: {e}\n{canonical}"),
    };
    assert_eq!(
        canonical,
        again.to_toml(),
        "canonical text does not round-trip"
    );
    assert_eq!(policy.digest(), again.digest());
    for p in PATHS {
        let a = policy.for_path(p);
        assert_eq!(a, again.for_path(p));
        assert_eq!(policy.in_scope(p), again.in_scope(p));
        assert_eq!(policy.matching_rules(p), again.matching_rules(p));
    }
});
