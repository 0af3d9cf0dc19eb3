//! Python 3 with py-spiffe (PyPI `spiffe`, which brings PyJWT and cryptography),
//! installed on first use into `<workspace>/.interop/py` (ignored by git) with
//! `python3 -m pip install --target`, under a file lock so parallel tests and test
//! processes install it once. [`schemathesis`] installs Schemathesis the same way into
//! `<workspace>/.interop/schemathesis`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The py-spiffe release the suites pin.
pub const PY_SPIFFE_VERSION: &str = "0.3.2";
/// File in the install directory naming the package and the interpreter it was
/// installed for.
const STAMP: &str = "writ-install.txt";
/// Longest a pip install may take before it counts as failed.
const PIP_TIMEOUT: Duration = Duration::from_secs(300);

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python interpreter and the directory py-spiffe is installed in.
pub struct Python {
    /// The real interpreter binary (symlinks and pyenv shims resolved): the path the
    /// attestor sees in `/proc/<pid>/exe`.
    pub exe: PathBuf,
    /// The `pip install --target` directory, for `PYTHONPATH`.
    pub site: PathBuf,
}

/// Runs `cmd` to completion, killing it after `timeout`. Returns (success, stdout, stderr).
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
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let mut stderr = err_reader.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {timeout:?})"));
    }
    Some((status.is_some_and(|s| s.success()), stdout, stderr))
}

/// Finds Python 3 and makes sure py-spiffe is installed; `None` (after saying why) when
/// that is not possible.
pub fn python() -> Option<Python> {
    // Compiled dependencies (grpcio, cryptography) are built for one interpreter: an
    // install made by another one is redone.
    pip_target("py", &format!("spiffe=={PY_SPIFFE_VERSION}"), "spiffe")
}

/// The Schemathesis release the OpenAPI suite pins (its CLI, and the `jsonschema_rs` and
/// PyYAML it brings).
pub const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Finds Python 3 and makes sure Schemathesis is installed into
/// `<workspace>/.interop/schemathesis` (its own directory and lock, so it never disturbs
/// the py-spiffe install); `None` (after saying why) when that is not possible. Run it
/// as `python3 -m schemathesis.cli` with `PYTHONPATH` set to [`Python::site`].
pub fn schemathesis() -> Option<Python> {
    pip_target(
        "schemathesis",
        &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
        "schemathesis",
    )
}

/// Installs `requirement` with `pip install --target <workspace>/.interop/<dir>` once,
/// under the file lock `<dir>.lock`, staged beside it and renamed into place so a failed
/// or killed install never looks installed. `module` is a directory the install must
/// contain. The install is redone for another interpreter or requirement.
fn pip_target(dir: &str, requirement: &str, module: &str) -> Option<Python> {
    let probe = run_bounded(
        Command::new("python3").args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable)); print(sys.version)",
        ]),
        Duration::from_secs(30),
    );
    let Some((true, stdout, _)) = probe else {
        eprintln!("python3 not found or not runnable");
        return None;
    };
    let mut lines = stdout.lines();
    let exe = PathBuf::from(lines.next()?.trim());
    let version = lines.next().unwrap_or_default().trim().to_owned();
    if !version.starts_with('3') || !exe.is_absolute() {
        eprintln!("python3 is not Python 3: {stdout}");
        return None;
    }
    let stamp = format!("{requirement}\n{}\n{version}\n", exe.display());
    let interop = workspace_root().join(".interop");
    std::fs::create_dir_all(&interop).ok()?;
    let site = interop.join(dir);
    let installed = || {
        site.join(module).is_dir()
            && std::fs::read_to_string(site.join(STAMP)).is_ok_and(|s| s == stamp)
    };
    if installed() {
        return Some(Python { exe, site });
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(interop.join(format!("{dir}.lock")))
        .ok()?;
    lock.lock().ok()?;
    if installed() {
        return Some(Python { exe, site });
    }
    let staging = interop.join(format!("{dir}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = run_bounded(
        Command::new(&exe)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-warn-script-location", "--target"])
            .arg(&staging)
            .arg(requirement)
            .env("PIP_ROOT_USER_ACTION", "ignore"),
        PIP_TIMEOUT,
    );
    let ok = match result {
        Some((true, _, _)) if staging.join(module).is_dir() => {
            let _ = std::fs::remove_dir_all(&site);
            std::fs::write(staging.join(STAMP), &stamp).is_ok()
                && std::fs::rename(&staging, &site).is_ok()
        }
        Some((_, stdout, stderr)) => {
            eprintln!("pip install {requirement} failed:\n{stdout}\n{stderr}");
            false
        }
        None => {
            eprintln!("cannot run {} -m pip", exe.display());
            false
        }
    };
    let _ = std::fs::remove_dir_all(&staging);
    drop(lock);
    ok.then_some(Python { exe, site })
}
