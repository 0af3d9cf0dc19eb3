//! The environment the suites run in, in one place for every package's tests: whether
//! everything must run (`WRIT_REQUIRE_ALL=1`, as CI sets it) or a test may skip with a
//! message, who this process is, and outside software (npm and pip packages) installed
//! on first use into `<workspace>/.interop/<name>` (ignored by git).

use std::fmt::Display;
use std::fs::{Metadata, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that turns every skip into a failure.
pub const REQUIRE_ALL_ENV: &str = "WRIT_REQUIRE_ALL";

/// Longest a test waits for another thread or process to finish an install. The lock is
/// an advisory file lock, released by the kernel when its holder exits, so it never goes
/// stale; a holder that keeps it this long is hung, and the waiter fails instead of
/// installing beside it.
pub const INSTALL_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Whether every suite must run (CI): missing software is then a failure, not a skip.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1")
}

/// Says on stderr why a test does not run and returns `None`, or, under
/// `WRIT_REQUIRE_ALL=1`, fails the test with the same reason.
///
/// # Panics
/// Under `WRIT_REQUIRE_ALL=1`, always.
pub fn skip<T>(what: &str, why: impl Display) -> Option<T> {
    assert!(
        !require_all(),
        "{what} is required ({REQUIRE_ALL_ENV}=1) but unavailable: {why}"
    );
    eprintln!("skipping: {what} is unavailable: {why}");
    None
}

/// `ok`, after [`skip`]ping (saying why, or failing under `WRIT_REQUIRE_ALL=1`) when it
/// is `false`.
pub fn available(what: &str, ok: bool) -> bool {
    if !ok {
        skip::<()>(what, "not available on this machine");
    }
    ok
}

/// The uid of this process (the workload the suites attest).
pub fn uid() -> u32 {
    proc_self().uid()
}

/// The gid of this process.
pub fn gid() -> u32 {
    proc_self().gid()
}

/// `/proc/self` belongs to the process's effective uid and gid, the ones the kernel
/// reports for its sockets.
fn proc_self() -> Metadata {
    std::fs::metadata("/proc/self").unwrap()
}

/// The workspace root (every package sits one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `<workspace>/.interop`, where the suites install outside software.
pub fn interop_dir() -> PathBuf {
    workspace_root().join(".interop")
}

/// Installs something into `<workspace>/.interop/<name>` once across threads and test
/// processes, and returns that directory.
///
/// `installed(dir)` says whether `dir` holds a complete install. When the directory does
/// not, the first caller takes the lock file `.interop/<name>.lock` and runs
/// `install(staging)` into a fresh staging directory beside it, which replaces `<name>`
/// only once `installed(staging)` holds, so a failed or killed install never looks
/// installed. Other callers wait for the lock (at most [`INSTALL_LOCK_WAIT`]) and find
/// the install done.
///
/// # Errors
/// What went wrong: the lock, `install`'s own error, or an install that `installed`
/// does not accept.
pub fn install_once(
    name: &str,
    installed: impl Fn(&Path) -> bool,
    install: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    let interop = interop_dir();
    let dir = interop.join(name);
    if installed(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&interop)
        .map_err(|e| format!("creating {}: {e}", interop.display()))?;
    let lock_path = interop.join(format!("{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    let deadline = Instant::now() + INSTALL_LOCK_WAIT;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                // Retrying until the deadline: another installer holds the lock.
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(format!(
                    "{} held for over {INSTALL_LOCK_WAIT:?}: the install in progress hangs",
                    lock_path.display()
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(format!("locking {}: {e}", lock_path.display()));
            }
        }
    }
    if installed(&dir) {
        return Ok(dir);
    }
    // Threads of one process share the pid: the counter keeps their staging apart.
    static STAGING: AtomicU64 = AtomicU64::new(0);
    let staging = interop.join(format!(
        "{name}.staging-{}-{}",
        std::process::id(),
        STAGING.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let result = std::fs::create_dir_all(&staging)
        .map_err(|e| format!("creating {}: {e}", staging.display()))
        .and_then(|()| install(&staging))
        .and_then(|()| {
            if !installed(&staging) {
                return Err(format!(
                    "installing {name} left an incomplete {}",
                    staging.display()
                ));
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&staging, &dir)
                .map_err(|e| format!("moving {} into place: {e}", staging.display()))
        });
    let _ = std::fs::remove_dir_all(&staging);
    drop(lock);
    result.map(|()| dir)
}

/// Runs `cmd` to completion, killing it after `timeout`. Returns (success, stdout,
/// stderr), or `None` when it cannot be started.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Option<(bool, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take()?;
    let mut err = child.stderr.take()?;
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().ok()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        // Polling until the deadline: std has no wait with a timeout.
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let mut stderr = err_reader.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {timeout:?})"));
    }
    Some((status.is_some_and(|s| s.success()), stdout, stderr))
}
