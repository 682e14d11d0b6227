//! Hostile trees: every one must end in a clear error or a reported finding, never a panic, a
//! hang or a silently wrong "clean".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use driftwatch_tests::{
    Keys, baseline_create, binary, check_json, finding, findings, require_root, run_with_limit,
};
use nix::sys::stat::{Mode, SFlag};

fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A character device with major 1 and the given minor (needs root).
fn char_device(path: &Path, minor: u64) {
    let dev = nix::sys::stat::makedev(1, minor);
    nix::sys::stat::mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), dev).unwrap();
}

fn kinds(report: &serde_json::Value) -> Vec<(Vec<u8>, String)> {
    findings(report)
        .into_iter()
        .map(|(p, k, _)| (p, k))
        .collect()
}

#[test]
fn fifos_sockets_devices_and_symlink_loops_neither_block_nor_loop() {
    let t = tree();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    symlink("b", root.join("a")).unwrap();
    symlink("a", root.join("b")).unwrap();
    symlink(".", root.join("d")).unwrap();
    symlink("self", root.join("self")).unwrap();
    symlink("/", root.join("to-host-root")).unwrap();
    let is_root = nix::unistd::geteuid().is_root();
    if is_root {
        char_device(&root.join("null"), 3);
    }
    let keys = Keys::new();
    let bl = t.path().join("bl");
    let r = baseline_create(&root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(60));

    let show = driftwatch_tests::baseline_show_json(&bl, &["--entries"]);
    let j = show.json();
    let counts = &j["counts_by_type"];
    assert_eq!(counts["fifo"], 1);
    assert_eq!(counts["socket"], 1);
    assert_eq!(
        counts["symlink"], 5,
        "symlinks are recorded, never followed: {counts}"
    );
    if is_root {
        assert_eq!(counts["char_device"], 1);
    }
    // Only the root directory itself: `d -> .` and `to-host-root -> /` were not descended.
    assert_eq!(counts["directory"], 1, "{counts}");

    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout_str());

    // A device node whose numbers change is drift.
    if is_root {
        fs::remove_file(root.join("null")).unwrap();
        char_device(&root.join("null"), 5);
        let r = check_json(&root, &bl, &keys, None, &[]);
        assert_eq!(
            findings(&r.json()),
            vec![finding(b"/null", "modified", &["rdev"])]
        );
    }
}

/// Creates `depth` nested directories named `d` below `dir`, with handles (the path would be
/// too long for path-based calls).
fn nest(dir: &Path, depth: usize) {
    use nix::fcntl::{OFlag, openat};
    let mut fd =
        nix::fcntl::open(dir, OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty()).unwrap();
    for _ in 0..depth {
        nix::sys::stat::mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(
            fd.as_fd(),
            "d",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
    let f = openat(
        fd.as_fd(),
        "leaf",
        OFlag::O_CREAT | OFlag::O_WRONLY,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    drop(f);
}

#[test]
fn deep_directories() {
    // 1,000 levels (paths of ~2 KB): fully checked, and a change at the bottom is found.
    let t = tree();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    nest(&root, 1000);
    let keys = Keys::new();
    let bl = t.path().join("bl");
    let r = baseline_create(&root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(check_json(&root, &bl, &keys, None, &[]).code, 0);
    let leaf: Vec<u8> = std::iter::repeat_n(&b"/d"[..], 1000)
        .flatten()
        .copied()
        .chain(*b"/leaf")
        .collect();
    fs::write(root.join(OsStr::from_bytes(&leaf[1..])), b"x").unwrap();
    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(
        findings(&r.json()),
        vec![finding(&leaf, "modified", &["content", "size"])]
    );

    // 4,096 levels: deeper than PATH_MAX allows naming. Baseline creation refuses clearly,
    // and a check reports the unexaminable part instead of passing it as clean.
    let deep = t.path().join("deep");
    fs::create_dir(&deep).unwrap();
    nest(&deep, 4096);
    let bl2 = t.path().join("bl2");
    let r = baseline_create(&deep, &bl2, &keys, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("could not be read completely") && r.stderr.contains("path too long"),
        "{}",
        r.stderr
    );
    assert!(r.elapsed < Duration::from_secs(120));
    // Check the deep tree against the shallow tree's baseline: the deep part is unverifiable.
    let r = check_json(&deep, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1);
    let report = r.json();
    let unverifiable: Vec<_> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "unverifiable")
        .collect();
    assert_eq!(unverifiable.len(), 1, "{report}");
    assert!(
        unverifiable[0]["reason"]
            .as_str()
            .unwrap()
            .contains("path too long")
    );
}

#[test]
fn one_hundred_thousand_entries_in_one_directory() {
    let t = tree();
    let root = t.path().join("root");
    let big = root.join("big");
    fs::create_dir_all(&big).unwrap();
    for i in 0..100_000 {
        fs::File::create(big.join(format!("f{i:06}"))).unwrap();
    }
    let keys = Keys::new();
    let bl = t.path().join("bl");
    let r = baseline_create(&root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json()["summary"]["scan"]["entries"], 100_002);
    fs::write(big.join("f050000"), b"changed").unwrap();
    fs::remove_file(big.join("f099999")).unwrap();
    fs::File::create(big.join("g")).unwrap();
    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(
        findings(&r.json()),
        vec![
            finding(b"/big/f050000", "modified", &["content", "size"]),
            finding(b"/big/f099999", "removed", &[]),
            finding(b"/big/g", "added", &[]),
        ]
    );
}

#[test]
fn hostile_names_round_trip_raw_in_json_and_escaped_in_text() {
    let t = tree();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let names: Vec<&[u8]> = vec![
        b"new\nline",
        b"esc\x1b[2J\x1b[31mred",
        b"bad\xff\xfeutf8",
        "bidi\u{202e}txt.exe".as_bytes(),
        b"back\\slash",
        b"-rf",
        b" spaced ",
        b"tab\tand\rcr",
    ];
    let keys = Keys::new();
    let bl = t.path().join("bl");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    for n in &names {
        fs::write(root.join(OsStr::from_bytes(n)), b"x").unwrap();
    }
    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1);
    let mut want: Vec<(Vec<u8>, String)> = names
        .iter()
        .map(|n| ([b"/", *n].concat(), "added".to_string()))
        .collect();
    want.sort();
    assert_eq!(kinds(&r.json()), want);

    let text = driftwatch_tests::check_text(&root, &bl, &keys);
    assert_eq!(text.code, 1);
    assert!(!text.stdout.contains(&0x1b), "raw ESC reached the terminal");
    assert!(
        !text.stdout.windows(2).any(|w| w == b"\xff\xfe"),
        "invalid UTF-8 reached the terminal"
    );
    let s = text.stdout_str();
    assert!(!s.contains('\u{202e}'));
    for shown in [
        "/new\\nline",
        "/esc\\x1b[2J\\x1b[31mred",
        "/bad\\xff\\xfeutf8",
        "/bidi\\u{202e}txt.exe",
        "/back\\\\slash",
        "/tab\\tand\\rcr",
    ] {
        assert!(s.contains(shown), "{shown} not in:\n{s}");
    }
    // Every line of the report is ours: a newline in a name cannot forge one.
    assert!(s.lines().all(|l| !l.starts_with("line")), "{s}");
}

#[test]
fn a_file_growing_and_shrinking_while_hashed_is_never_clean() {
    let t = tree();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let f = root.join("busy.log");
    fs::write(&f, vec![b'a'; 32 << 20]).unwrap();
    let keys = Keys::new();
    let bl = t.path().join("bl");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let f = f.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                let mut h = fs::OpenOptions::new().append(true).open(&f).unwrap();
                // Grow, then shrink back to exactly the baseline's content: only a comparison of
                // the file's state before and after reading can tell it was changing.
                h.write_all(&[b'b'; 1 << 16]).unwrap();
                h.set_len(32 << 20).unwrap();
                n += 1;
            }
        })
    };
    for _ in 0..5 {
        let r = check_json(&root, &bl, &keys, None, &[]);
        assert_eq!(
            r.code,
            1,
            "a file being rewritten must not check clean: {}",
            r.stdout_str()
        );
        let k = kinds(&r.json());
        assert_eq!(k.len(), 1, "{k:?}");
        assert_eq!(k[0].0, b"/busy.log");
        assert!(k[0].1 == "unverifiable" || k[0].1 == "modified", "{k:?}");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn an_unreadable_file_is_a_finding_and_the_scan_goes_on() {
    let t = tree();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("secret"), b"s").unwrap();
    fs::write(root.join("sub/other"), b"o").unwrap();
    let keys = Keys::new();
    let bl = t.path().join("bl");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::write(root.join("sub/other"), b"O").unwrap();
    let args: Vec<&OsStr> = vec![
        "check".as_ref(),
        "--baseline".as_ref(),
        bl.as_os_str(),
        "--trusted-key".as_ref(),
        keys.public.as_os_str(),
        "--root".as_ref(),
        root.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ];
    // Root reads everything; check as an unprivileged user, as a non-root agent would run.
    let r = if nix::unistd::geteuid().is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(binary("driftwatch-agent"))
            .args(&args);
        run_with_limit(cmd, Duration::from_secs(120))
    } else {
        driftwatch_tests::agent(&args)
    };
    assert_eq!(r.code, 1, "{}\n{}", r.stdout_str(), r.stderr);
    let report = r.json();
    // mode 0644 -> 0000 is a modification; the unreadable content is named as the reason.
    let v = &report["violations"].as_array().unwrap()[0];
    assert_eq!(v["path"]["text"], "/secret");
    assert!(
        v["reason"].as_str().unwrap().contains("Permission denied"),
        "{v}"
    );
    assert_eq!(
        findings(&report),
        vec![
            finding(b"/secret", "modified", &["mode"]),
            finding(b"/sub/other", "modified", &["content"])
        ]
    );
}

#[test]
fn a_64_kib_xattr_value_is_recorded_and_compared() {
    if !require_root("mounting a tmpfs: ext4 here caps xattr values at one block") {
        return;
    }
    let t = tree();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    let f = mnt.join("f");
    fs::write(&f, b"content").unwrap();
    let mut value = vec![0u8; 65536];
    for (i, b) in value.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    xattr::set(&f, "user.big", &value).unwrap();
    let keys = Keys::new();
    let bl = t.path().join("bl");
    let r = baseline_create(&mnt, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(check_json(&mnt, &bl, &keys, None, &[]).code, 0);
    value[40000] ^= 1;
    xattr::set(&f, "user.big", &value).unwrap();
    let r = check_json(&mnt, &bl, &keys, None, &[]);
    let report = r.json();
    assert_eq!(
        findings(&report),
        vec![finding(b"/f", "modified", &["xattr user.big"])]
    );
    let after = report["violations"][0]["changes"][0]["after"]
        .as_str()
        .unwrap();
    assert!(after.starts_with("<65536 bytes, blake3:"), "{after}");
}

#[test]
fn a_one_tib_sparse_file_is_bounded_by_the_size_policy() {
    let t = tree();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let f = fs::File::create(root.join("huge.img")).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    let keys = Keys::new();
    let bl = t.path().join("bl");
    // Baseline creation records it without a hash and says so.
    let r = baseline_create(&root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("/huge.img: content not hashed: size 1099511627776 is above the policy's max_hash_size 4 GiB"), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(60));
    // A check reports it as unverifiable every time: never silently skipped, never hashed.
    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1);
    assert!(r.elapsed < Duration::from_secs(60));
    let report = r.json();
    assert_eq!(
        kinds(&report),
        vec![(b"/huge.img".to_vec(), "unverifiable".to_string())]
    );
    assert!(
        report["violations"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_hash_size")
    );
}
