//! Long-running processes in tests: a collector or an agent daemon started from the real
//! binary, with its output in a log file the failure message quotes, killed when the test
//! ends (pass or panic), and bounded waits for what it should eventually do.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Polls `f` every `every` until it returns `Some`, for at most `limit`; panics with `what`
/// and the last value's description when the time is up. Every wait in the e2e tests goes
/// through here, so none can hang the suite.
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    let mut last = String::from("(not tried)");
    while started.elapsed() < limit {
        match f() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(every);
    }
    panic!("timed out after {limit:?} waiting for {what}; last: {last}");
}

/// A child process whose stdout and stderr go to `log`; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output appended to `log` (created if missing; a restarted daemon
    /// appends to the same log).
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Daemon {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        let err = out.try_clone().expect("clone log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far (for failure messages).
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends a signal (e.g. SIGUSR1 to ask an agent for an immediate scan).
    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Whether the process has exited (reaping it if so), with its exit status.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap: a crash at whatever point the process was.
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `grace` for a clean exit; SIGKILL after that. Returns the exit
    /// code (None when it had to be killed or died of a signal).
    pub fn stop(&mut self, grace: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < grace {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
