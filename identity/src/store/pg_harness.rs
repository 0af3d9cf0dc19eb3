//! A private PostgreSQL server for tests: `initdb` in a fresh temporary directory, trust
//! authentication, stopped and deleted on drop. It listens on no TCP port at all, only on
//! a Unix socket in that directory, so servers started side by side cannot race for a
//! port (no "bind port 0, release it, hand it to the server" window).
//!
//! ```no_run
//! # async fn demo() -> Result<(), String> {
//! use writ_identity::store::pg_harness::TempPostgres;
//! let Some(pg) = TempPostgres::start()? else { return Ok(()) }; // no PostgreSQL here
//! let store = writ_identity::store::postgres::PostgresStore::connect(&pg.url())
//!     .await
//!     .map_err(|e| e.to_string())?;
//! # drop(store); Ok(()) }
//! ```
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the harness hands the
//! temporary directory to `nobody` and runs `initdb` and `pg_ctl` as that user (through
//! `runuser`, or `su` where `runuser` is missing).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Set to `1` to turn "PostgreSQL is not installed" from a skip into a failure.
pub const REQUIRE_ALL_ENV: &str = "WRIT_REQUIRE_ALL";

/// The unprivileged account the server runs as when the tests run as root.
const UNPRIVILEGED_USER: &str = "nobody";

/// The database the harness creates for the test.
const DATABASE: &str = "writ";

/// The port in the socket's name (`.s.PGSQL.<port>`); no TCP port is opened. Set in
/// the configuration and in the URL alike, so `PGPORT` in the environment changes neither.
const PORT: u16 = 5432;

/// A running throw-away PostgreSQL server.
#[derive(Debug)]
pub struct TempPostgres {
    dir: PathBuf,
    pg_ctl: PathBuf,
    run_as: Option<String>,
}

impl TempPostgres {
    /// Starts a server, or returns `Ok(None)` (after printing why) when no PostgreSQL
    /// binaries are installed, unless `WRIT_REQUIRE_ALL=1`.
    ///
    /// # Errors
    /// A description of the step that failed (with the server log where there is one),
    /// or of the missing binaries when `WRIT_REQUIRE_ALL=1`.
    pub fn start() -> Result<Option<Self>, String> {
        let Some(bin) = find_bin_dir() else {
            let why = "initdb not found on PATH or in /usr/lib/postgresql/*/bin";
            if std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1") {
                return Err(format!("{why} (and {REQUIRE_ALL_ENV}=1)"));
            }
            eprintln!("skipping PostgreSQL tests: {why}");
            return Ok(None);
        };
        let dir = make_temp_dir()?;
        match Self::start_in(&bin, dir.clone()) {
            Ok(pg) => Ok(Some(pg)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn start_in(bin: &Path, dir: PathBuf) -> Result<Self, String> {
        let run_as = if owner_is_root(&dir)? {
            give_to_unprivileged_user(&dir)?;
            Some(UNPRIVILEGED_USER.to_owned())
        } else {
            None
        };
        let data = dir.join("data");
        let initdb = bin.join("initdb");
        let mut init = command(run_as.as_deref(), &initdb);
        init.arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run(&mut init, "initdb")?;

        let settings = format!(
            "\n# written by writ's test harness\n\
             listen_addresses = ''\n\
             port = {PORT}\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &settings)?;

        let pg = Self {
            dir,
            pg_ctl: bin.join("pg_ctl"),
            run_as,
        };
        let mut start = pg.pg_ctl_command();
        start
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.join("server.log"));
        run(&mut start, "pg_ctl start").map_err(|e| format!("{e}\nserver log:\n{}", pg.log()))?;
        let mut create = Command::new(bin.join("createdb"));
        create
            .arg("-h")
            .arg(&pg.dir)
            .args(["-p", &PORT.to_string(), "-U", "postgres", DATABASE]);
        run(&mut create, "createdb")?;
        Ok(pg)
    }

    /// `postgres://postgres@localhost:5432/writ?host=<temp dir>`: the Unix socket in the
    /// server's directory, as sqlx and libpq read a `host` that is a path.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost:{PORT}/{DATABASE}?host={}",
            self.dir.display()
        )
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `pg_ctl restart` (fast shutdown, which ends every session, then start), waiting
    /// until it accepts connections again.
    ///
    /// # Errors
    /// What `pg_ctl` said, with the server log.
    pub fn restart(&self) -> Result<(), String> {
        let mut restart = self.pg_ctl_command();
        restart
            .args(["restart", "-w", "-t", "60", "-m", "fast", "-D"])
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"));
        run(&mut restart, "pg_ctl restart").map_err(|e| format!("{e}\nserver log:\n{}", self.log()))
    }

    fn pg_ctl_command(&self) -> Command {
        command(self.run_as.as_deref(), &self.pg_ctl)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let mut stop = self.pg_ctl_command();
        stop.arg("stop")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w"]);
        if let Err(e) = run(&mut stop, "pg_ctl stop") {
            eprintln!("stopping the test PostgreSQL server failed: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory holding `initdb`, `pg_ctl` and `createdb`: the one on `PATH` first,
/// then the newest `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut installed: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|d| d.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    // Newest major version first (numeric, so 15 comes before 9).
    installed.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(Path::file_name)
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    on_path
        .into_iter()
        .chain(installed)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .map(|dir| {
            // Follow a symlink to the real installation so that `createdb` is found next
            // to it even when only `initdb` and `pg_ctl` are linked onto PATH.
            std::fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|real| real.parent().map(Path::to_path_buf))
                .unwrap_or(dir)
        })
}

/// A new directory under the system temp dir, private to its owner.
fn make_temp_dir() -> Result<PathBuf, String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "writ-pg-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Whether we run as root, judged by the owner of a directory we just created.
fn owner_is_root(dir: &Path) -> Result<bool, String> {
    std::fs::metadata(dir)
        .map(|m| m.uid() == 0)
        .map_err(|e| format!("reading {}: {e}", dir.display()))
}

/// Hands `dir` to [`UNPRIVILEGED_USER`] so that PostgreSQL, run as that user, can write
/// its data directory, log and socket there.
fn give_to_unprivileged_user(dir: &Path) -> Result<(), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("reading /etc/passwd to find {UNPRIVILEGED_USER}: {e}"))?;
    let (uid, gid) = passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            if fields.next() != Some(UNPRIVILEGED_USER) {
                return None;
            }
            let uid = fields.nth(1)?.parse::<u32>().ok()?;
            let gid = fields.next()?.parse::<u32>().ok()?;
            Some((uid, gid))
        })
        .ok_or_else(|| {
            format!("running as root and no user {UNPRIVILEGED_USER:?} to run PostgreSQL as")
        })?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(|e| format!("handing {} to {UNPRIVILEGED_USER}: {e}", dir.display()))
}

/// `program` as a command, run as `user` when given: through `runuser`, or `su` where
/// `runuser` is missing.
fn command(user: Option<&str>, program: &Path) -> Command {
    let Some(user) = user else {
        return Command::new(program);
    };
    if let Some(runuser) = find_program("runuser") {
        let mut cmd = Command::new(runuser);
        cmd.args(["-u", user, "--"]).arg(program);
        return cmd;
    }
    // `su -s /bin/sh -c 'exec "$0" "$@"' USER -- PROGRAM ARGS...`: the arguments after
    // `--` reach the shell as $0, $1, ... without being parsed again.
    let mut cmd = Command::new(find_program("su").unwrap_or_else(|| PathBuf::from("su")));
    cmd.args(["-s", "/bin/sh", "-c", r#"exec "$0" "$@""#, user, "--"])
        .arg(program);
    cmd
}

/// `name` on `PATH` or in the system binary directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `cmd` to completion; a failure carries its output.
fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let output: Output = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}
