//! Scheduling priority of the collector's background threads.
//!
//! The reconciler's assessment is a burst of CPU work every round (up to 1.5 s with 1,200 hosts
//! held before its memo; issue 4, docs/benchmarks.md perf11 and perf12), on a machine the report
//! streams and the database share. It
//! runs on a thread of its own at a lower priority, so it takes the CPU the streams leave
//! instead of delaying their acknowledgements (on its own this did not measurably move the
//! benchmark's tail; the round's lower cost did). Linux applies `setpriority(PRIO_PROCESS, tid)`
//! to one thread; nix has no wrapper, so this module calls libc and is the one place in the
//! collector that may use `unsafe`.
#![allow(unsafe_code)]

use nix::libc;

/// The niceness the collector's background threads run at (a CFS weight of about a tenth of
/// a default thread's).
pub const BACKGROUND_NICE: i32 = 10;

/// The calling thread's niceness.
pub fn this_thread() -> std::io::Result<i32> {
    let tid = tid()?;
    // -1 is also a valid niceness: errno tells an error from it.
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes two integers and reads no memory of ours.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(nice)
}

/// Lowers the calling thread's priority to niceness `nice`; a thread already at `nice` or
/// lower priority is left as it is (never raised: a collector started `nice -n 15` stays so).
pub fn lower_this_thread(nice: i32) -> std::io::Result<()> {
    if this_thread()? >= nice {
        return Ok(());
    }
    // SAFETY: setpriority takes three integers and reads no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid()?, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn tid() -> std::io::Result<libc::id_t> {
    libc::id_t::try_from(nix::unistd::gettid().as_raw())
        .map_err(|_| std::io::Error::other("thread id out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The niceness the kernel reports for thread `tid` (`/proc`'s stat, field 19).
    fn proc_nice(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn lowers_only_the_calling_thread_and_never_raises() {
        let main_before = proc_nice(nix::unistd::gettid().as_raw());
        let seen = std::thread::spawn(|| {
            let tid = nix::unistd::gettid().as_raw();
            let before = this_thread().unwrap();
            lower_this_thread(BACKGROUND_NICE).unwrap();
            let lowered = (this_thread().unwrap(), proc_nice(tid));
            // Asking for a higher priority afterwards changes nothing.
            lower_this_thread(BACKGROUND_NICE - 5).unwrap();
            (before, lowered, proc_nice(tid))
        })
        .join()
        .unwrap();
        let (before, lowered, after) = seen;
        let want = before.max(BACKGROUND_NICE);
        assert_eq!(lowered, (want, want));
        assert_eq!(after, want);
        assert_eq!(
            proc_nice(nix::unistd::gettid().as_raw()),
            main_before,
            "the calling thread only"
        );
    }
}
