//! A throwaway PostgreSQL server for tests: `initdb` + `pg_ctl` from the installed PostgreSQL
//! (Debian's `/usr/lib/postgresql/<newest>/bin`, else `initdb` on `PATH`) in a temporary
//! directory, listening only on a Unix socket in that directory (no TCP port to collide on).
//!
//! One server per test process ([`server`]), a fresh database per test
//! ([`PgServer::create_database`]). The server is stopped when the process exits (an `atexit`
//! hook), and a watchdog process stops it too if the test process dies without exiting
//! (a panic with `abort`, a signal), so no postgres outlives `cargo test`.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user
//! (the Debian package creates it) via `runuser`.
//!
//! Binaries missing: [`server`] returns `None` after printing why, and panics under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::in_ci;

/// A running test server.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    /// Holds `data/` and the socket. Removed when the server stops.
    dir: PathBuf,
    /// `Some(user)` when the server runs as another user (we are root).
    run_as: Option<String>,
}

const PORT: u16 = 5432;
const SUPERUSER: &str = "postgres";

static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();

/// The process's test server, started on first use. `None` (with the reason printed) when
/// PostgreSQL is not installed; under `CI=true` that is a panic instead.
pub fn server() -> Option<&'static PgServer> {
    SERVER
        .get_or_init(|| match find_bin_dir() {
            Some(bin) => Some(PgServer::start(bin)),
            None => {
                assert!(
                    !in_ci(),
                    "PostgreSQL (initdb, pg_ctl) is not installed and CI=true forbids skipping \
                     the PostgreSQL tests"
                );
                eprintln!(
                    "SKIPPED: PostgreSQL tests: no initdb/pg_ctl in /usr/lib/postgresql/*/bin \
                     or on PATH (apt-get install postgresql)"
                );
                None
            }
        })
        .as_ref()
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding initdb and pg_ctl, else the
/// directory of `initdb` on `PATH`.
fn find_bin_dir() -> Option<PathBuf> {
    let usable = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            usable(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| usable(d)).map(|d| {
        // /usr/local/bin/initdb may be a symlink into the real bin dir (postgres must be
        // next to pg_ctl).
        std::fs::canonicalize(d.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or(d)
    })
}

impl PgServer {
    fn start(bin: PathBuf) -> PgServer {
        let root = nix::unistd::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("dw-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL")
            .keep();
        let run_as = if root {
            let user = nix::unistd::User::from_name(SUPERUSER)
                .expect("user lookup")
                .unwrap_or_else(|| {
                    panic!("running as root needs the `{SUPERUSER}` user to run PostgreSQL")
                });
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).expect("chown temp dir");
            Some(SUPERUSER.to_owned())
        } else {
            None
        };
        let server = PgServer { bin, dir, run_as };
        let data = server.dir.join("data");
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let options = format!(
            "-k {} -p {PORT} -c listen_addresses='' -c max_connections=200 -c shared_buffers=128MB",
            server.dir.display()
        );
        let out = server
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(server.dir.join("server.log"))
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        if !out.status.success() {
            let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        server.spawn_watchdog();
        register_atexit();
        server
    }

    /// A command running `program` from the server's bin dir as the server's user.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn stop_command(&self) -> Command {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// A shell that waits for this process to go away, then stops the server and removes its
    /// directory: the fallback when the atexit hook never runs.
    fn spawn_watchdog(&self) {
        let stop = format!("{:?}", self.stop_command());
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.display(),
        );
        // Never waited for: it must outlive this process (it is reparented when we exit).
        #[allow(clippy::zombie_processes)]
        let _watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the PostgreSQL watchdog");
    }

    fn stop(&self) {
        let _ = self.stop_command().status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The libpq-style connection string of database `db` (Unix socket, trust auth).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={PORT} user={SUPERUSER} dbname={db}",
            self.dir.display()
        )
    }

    /// Creates a fresh, uniquely named database and returns its connection string.
    pub fn create_database(&self, hint: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!("t{n}_{clean}");
        let out = self
            .command("createdb")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &PORT.to_string(), "-U", SUPERUSER, &name])
            .output()
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }
}

extern "C" fn stop_at_exit() {
    if let Some(Some(server)) = SERVER.get() {
        server.stop();
    }
}

fn register_atexit() {
    // SAFETY: `atexit` only records a function pointer; `stop_at_exit` is a plain `extern "C"`
    // function that does not unwind (it ignores every error) and touches only a static that is
    // initialized by then.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::atexit(stop_at_exit) };
    if rc != 0 {
        eprintln!("warning: atexit failed; the PostgreSQL watchdog will stop the test server");
    }
}
