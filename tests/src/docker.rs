//! A real Docker daemon for the suites: the one `DOCKER_HOST` or `/var/run/docker.sock`
//! names if it answers, else (as root, with `dockerd` installed) one this test process
//! starts on temp paths, shared by every test of the binary and stopped when the
//! process exits. Images are built `FROM scratch` out of local binaries and the shared
//! libraries `ldd` lists: no registry is needed.
//!
//! ```no_run
//! # fn demo(writ: &std::path::Path) {
//! let Some(docker) = writ_tests::docker::daemon() else { return }; // skipped, with a message
//! let image = docker.scratch_image("writ-test-writ", writ, &[]).unwrap();
//! let id = docker.run(&["--rm", &image, "--version"]).unwrap();
//! # }
//! ```
//!
//! A daemon started here runs `dockerd --storage-driver=vfs --iptables=false
//! --bridge=none` with its own `--data-root`, `--exec-root`, socket and pidfile in a temp
//! directory. There is no global teardown in the Rust test harness, so a watcher shell
//! (in its own session, `setsid`) waits for this process to disappear, then stops the
//! daemon (`SIGTERM`, then `SIGKILL` after 20 s) and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::env::{run_bounded, skip};

/// Longest a `docker` command of the suites may take (an image build copies ~100 MB).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest a started daemon may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A Docker daemon the tests can use.
#[derive(Debug)]
pub struct Daemon {
    /// The daemon's Unix socket.
    pub socket: PathBuf,
    /// Whether this process started it (and its watcher will stop it).
    pub started_here: bool,
}

/// The shared daemon, or `None` after [`skip`]ping with the reason (a failure under
/// `WRIT_REQUIRE_ALL=1`).
pub fn daemon() -> Option<&'static Daemon> {
    static DAEMON: OnceLock<Result<Daemon, String>> = OnceLock::new();
    match DAEMON.get_or_init(find_or_start) {
        Ok(d) => Some(d),
        Err(why) => skip("Docker", why),
    }
}

fn docker_cli() -> Option<PathBuf> {
    which("docker")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether the daemon at `socket` answers `docker version`.
fn answers(socket: &Path) -> bool {
    socket.exists()
        && run_bounded(
            Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .args(["version", "--format", "{{.Server.APIVersion}}"]),
            Duration::from_secs(10),
        )
        .is_some_and(|(ok, _, _)| ok)
}

fn find_or_start() -> Result<Daemon, String> {
    if docker_cli().is_none() {
        return Err("the docker command is not installed (apt-get install docker.io)".into());
    }
    let mut tried = Vec::new();
    if let Ok(host) = std::env::var("DOCKER_HOST")
        && !host.is_empty()
    {
        let Some(path) = host.strip_prefix("unix://") else {
            return Err(format!("DOCKER_HOST={host} is not a unix:// socket"));
        };
        if answers(Path::new(path)) {
            return Ok(Daemon {
                socket: PathBuf::from(path),
                started_here: false,
            });
        }
        tried.push(host);
    }
    let default = Path::new("/var/run/docker.sock");
    if answers(default) {
        return Ok(Daemon {
            socket: default.to_owned(),
            started_here: false,
        });
    }
    tried.push(default.display().to_string());
    let Some(dockerd) = which("dockerd") else {
        return Err(format!(
            "no daemon answers at {} and dockerd is not installed",
            tried.join(", ")
        ));
    };
    if crate::env::uid() != 0 {
        return Err(format!(
            "no daemon answers at {} and only root can start dockerd",
            tried.join(", ")
        ));
    }
    start(&dockerd)
}

/// Starts a private `dockerd` and its watcher.
fn start(dockerd: &Path) -> Result<Daemon, String> {
    let dir = tempfile::Builder::new()
        .prefix("writ-dockerd-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    let socket = dir.join("docker.sock");
    let log = std::fs::File::create(dir.join("dockerd.log")).map_err(|e| e.to_string())?;
    let child = Command::new(dockerd)
        .args(["--storage-driver=vfs", "--iptables=false", "--bridge=none"])
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", dockerd.display()))?;
    let daemon_pid = child.id();
    // The watcher: in its own session so a signal to the test's process group does not
    // reach it before it can clean up.
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
         kill -TERM {daemon_pid} 2>/dev/null; \
         i=0; while kill -0 {daemon_pid} 2>/dev/null && [ $i -lt 20 ]; do sleep 1; i=$((i+1)); done; \
         kill -KILL {daemon_pid} 2>/dev/null; sleep 1; \
         umount -R {dir}/exec {dir}/data 2>/dev/null; rm -rf {dir}",
        me = std::process::id(),
        dir = dir.display(),
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the dockerd watcher: {e}"))?;
    // Reap dockerd if it dies while this process lives (no zombie).
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if answers(&socket) {
            eprintln!(
                "started dockerd (pid {daemon_pid}) on {}; it stops when this test process exits",
                socket.display()
            );
            return Ok(Daemon {
                socket,
                started_here: true,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
    let tail: String = log
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(format!(
        "dockerd did not answer within {START_TIMEOUT:?}; its log ends:\n{tail}"
    ))
}

impl Daemon {
    /// `DOCKER_HOST` for this daemon (`unix://<socket>`).
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A `docker` command for this daemon.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", self.host())
            // The classic builder: FROM scratch needs nothing else (no buildx plugin).
            .env("DOCKER_BUILDKIT", "0");
        cmd
    }

    /// Runs `docker <args>` (bounded by [`COMMAND_TIMEOUT`]) and returns its trimmed
    /// stdout.
    ///
    /// # Errors
    /// Its stderr when it fails.
    pub fn docker(&self, args: &[&str]) -> Result<String, String> {
        let (ok, out, err) = run_bounded(self.command().args(args), COMMAND_TIMEOUT)
            .ok_or_else(|| "cannot run docker".to_owned())?;
        if ok {
            Ok(out.trim().to_owned())
        } else {
            Err(format!("docker {}: {}", args.join(" "), err.trim()))
        }
    }

    /// `docker run -d <args>`: the new container's ID.
    ///
    /// # Errors
    /// As [`Self::docker`].
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["run", "-d", "--network", "none"];
        all.extend_from_slice(args);
        self.docker(&all)
    }

    /// The host pid of a running container's first process.
    ///
    /// # Errors
    /// As [`Self::docker`], or when the container is not running.
    pub fn pid_of(&self, container: &str) -> Result<i32, String> {
        let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
        match pid.parse::<i32>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("container {container} is not running (pid {pid})")),
        }
    }

    /// Builds image `tag` `FROM scratch` holding `binary` at `/<file name>` (its entry
    /// point), the shared libraries `ldd` lists for it at their paths, and `extra` files
    /// (host path, path in the image). Returns `tag`.
    ///
    /// # Errors
    /// What failed: `ldd`, a copy, or the build.
    pub fn scratch_image(
        &self,
        tag: &str,
        binary: &Path,
        extra: &[(&Path, &str)],
    ) -> Result<String, String> {
        let ctx = tempfile::tempdir().map_err(|e| e.to_string())?;
        let name = binary
            .file_name()
            .ok_or("binary has no file name")?
            .to_string_lossy()
            .into_owned();
        let mut files: Vec<(PathBuf, String)> = vec![(binary.to_owned(), format!("/{name}"))];
        for lib in shared_libraries(binary)? {
            let inside = lib.display().to_string();
            files.push((lib, inside));
        }
        for (host, inside) in extra {
            files.push(((*host).to_owned(), (*inside).to_owned()));
        }
        for (host, inside) in &files {
            let to = ctx.path().join("root").join(inside.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().ok_or("no parent")?).map_err(|e| e.to_string())?;
            std::fs::copy(host, &to).map_err(|e| format!("{}: {e}", host.display()))?;
        }
        std::fs::create_dir_all(ctx.path().join("root/tmp")).map_err(|e| e.to_string())?;
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM scratch\nCOPY root/ /\nENTRYPOINT [\"/{name}\"]\n"),
        )
        .map_err(|e| e.to_string())?;
        let ctx_path = ctx.path().display().to_string();
        self.docker(&["build", "-q", "-t", tag, &ctx_path])?;
        Ok(tag.to_owned())
    }
}

/// The shared libraries (and the loader) `ldd` lists for `binary`, resolved paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let (ok, out, err) = run_bounded(Command::new("ldd").arg(binary), Duration::from_secs(30))
        .ok_or("cannot run ldd")?;
    if !ok {
        // A static binary: "not a dynamic executable".
        if err.contains("not a dynamic") || out.contains("not a dynamic") {
            return Ok(Vec::new());
        }
        return Err(format!("ldd {}: {err}", binary.display()));
    }
    Ok(out
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ldd_of_this_test_binary() {
        let me = std::env::current_exe().unwrap();
        let libs = super::shared_libraries(&me).unwrap();
        assert!(libs.iter().all(|l| l.is_absolute()), "{libs:?}");
    }
}
