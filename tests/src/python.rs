//! Python 3 with py-spiffe (PyPI `spiffe`, which brings PyJWT and cryptography),
//! installed on first use into `<workspace>/.interop/py` (ignored by git) with
//! `python3 -m pip install --target`, under a file lock so parallel tests and test
//! processes install it once. [`schemathesis`] installs Schemathesis the same way into
//! `<workspace>/.interop/schemathesis`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::env::{install_once, run_bounded};

/// The py-spiffe release the suites pin.
pub const PY_SPIFFE_VERSION: &str = "0.3.2";
/// File in the install directory naming the package and the interpreter it was
/// installed for.
const STAMP: &str = "writ-install.txt";
/// Longest a pip install may take before it counts as failed.
const PIP_TIMEOUT: Duration = Duration::from_secs(300);

/// The Python interpreter and the directory py-spiffe is installed in.
pub struct Python {
    /// The real interpreter binary (symlinks and pyenv shims resolved): the path the
    /// attestor sees in `/proc/<pid>/exe`.
    pub exe: PathBuf,
    /// The `pip install --target` directory, for `PYTHONPATH`.
    pub site: PathBuf,
}

/// Finds Python 3 and makes sure py-spiffe is installed; `None` (after saying why) when
/// that is not possible.
pub fn python() -> Option<Python> {
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

/// Installs `requirement` with `pip install --target <workspace>/.interop/<dir>` once
/// (see [`install_once`]). `module` is a directory the install must contain. The install
/// is redone for another interpreter or requirement.
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
    // Compiled dependencies (grpcio, cryptography) are built for one interpreter: an
    // install made by another one is redone.
    let stamp = format!("{requirement}\n{}\n{version}\n", exe.display());
    let installed = |site: &std::path::Path| {
        site.join(module).is_dir()
            && std::fs::read_to_string(site.join(STAMP)).is_ok_and(|s| s == stamp)
    };
    let install = |staging: &std::path::Path| {
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
                .arg(staging)
                .arg(requirement)
                .env("PIP_ROOT_USER_ACTION", "ignore"),
            PIP_TIMEOUT,
        );
        match result {
            Some((true, _, _)) => std::fs::write(staging.join(STAMP), &stamp)
                .map_err(|e| format!("writing {STAMP}: {e}")),
            Some((false, stdout, stderr)) => Err(format!(
                "pip install {requirement} failed:\n{stdout}\n{stderr}"
            )),
            None => Err(format!("cannot run {} -m pip", exe.display())),
        }
    };
    match install_once(dir, installed, install) {
        Ok(site) => Some(Python { exe, site }),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

/// The xds-protos release (Envoy's API protos, generated for Python; brings grpcio and
/// protobuf) the SDS suite pins.
pub const XDS_PROTOS_VERSION: &str = "1.85.0";

/// Finds Python 3 and makes sure xds-protos is installed into
/// `<workspace>/.interop/xds` (its own directory and lock); `None` (after saying why)
/// when that is not possible.
pub fn xds() -> Option<Python> {
    pip_target("xds", &format!("xds-protos=={XDS_PROTOS_VERSION}"), "envoy")
}
