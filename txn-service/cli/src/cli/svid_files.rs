//! `writ api watch --write DIR`: SVID files for software that reads files (nginx, a
//! Python service), kept fresh across rotations, as spiffe-helper does for SPIRE.
//!
//! At the first response of the Workload API stream and at every response whose content
//! changed, for each SVID `N` (the default first) it writes every file to a temporary
//! file in DIR and fsyncs it, then renames them into place one after the other (then
//! fsyncs DIR), in this order:
//!
//! 1. `bundle.N.pem` (the SVID's trust domain's CA certificates) and
//!    `federated_bundle.<trust domain>.pem` for every federated bundle (0644);
//! 2. `svid.N.key` (PKCS#8, 0600);
//! 3. `svid.N.pem` (the chain, leaf first, 0644);
//! 4. `svid.N.combined.pem` (key then chain in one file, 0600): a reader that may load
//!    at any moment (not only after the reload this command triggers) names this one
//!    file as both certificate and key and never sees a mismatched pair.
//!
//! Then `jwt_svid.<audience>.token` (0600) for every `--jwt-audience`, refreshed at half
//! its lifetime. Only after all renames does it run `--reload-cmd` (argv split on
//! spaces, no shell unless `--reload-shell`; at most `--reload-timeout`, then killed;
//! a failure is logged, never fatal) or send `--signal` to `--signal-pid`/`--pid-file`.
//! When the agent is unreachable the last files stay in place and it reconnects with
//! back-off.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::Digest as _;
use writ_identity::clock::{Clock, SystemClock};
use writ_sdk::workload::{WorkloadClient, X509Context};

use super::out::{errln, outln};

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The first wait after a failed connection.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The retry delay after a failed JWT-SVID fetch.
const JWT_RETRY: Duration = Duration::from_secs(5);
/// The longest audience part of a JWT-SVID file name.
const MAX_AUDIENCE_NAME: usize = 64;

/// What to do after the files changed.
#[derive(Debug, Clone)]
pub(crate) enum Notify {
    /// Run a program.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Longest run before it is killed.
        timeout: Duration,
    },
    /// Signal a process.
    Signal {
        /// Where the pid comes from.
        target: PidSource,
        /// The signal.
        signal: rustix::process::Signal,
    },
}

/// The process to signal.
#[derive(Debug, Clone)]
pub(crate) enum PidSource {
    /// A fixed pid.
    Pid(i32),
    /// A pid file, read at every notification (nginx rewrites it at restart).
    File(PathBuf),
}

/// `--write` options.
#[derive(Debug, Clone)]
pub(crate) struct WriteOptions {
    /// The directory.
    pub(crate) dir: PathBuf,
    /// JWT-SVID audiences and their file names.
    pub(crate) jwt_svids: Vec<(String, String)>,
    /// File names of the default SVID (chain, key, bundle) instead of `svid.0.pem`,
    /// `svid.0.key`, `bundle.0.pem` (a config file's `svid_file_name` ...).
    pub(crate) names: Option<[String; 3]>,
    /// What to do after a change.
    pub(crate) notify: Option<Notify>,
    /// Write once and exit (spiffe-helper's `daemon_mode = false`).
    pub(crate) once: bool,
    /// Print one JSON object per write.
    pub(crate) json: bool,
}

/// The JWT-SVID file for an audience given on the command line.
pub(crate) fn jwt_file_name(audience: &str) -> String {
    format!("jwt_svid.{}.token", audience_file_part(audience))
}

/// Largest helper configuration file read.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Most JWT-SVIDs one configuration asks for.
const MAX_JWT_SVIDS: usize = 32;

/// A helper configuration file with spiffe-helper's keys (`helper.conf`), in TOML: a
/// `helper.conf` of `key = "value"` lines and `jwt_svids = [{ ... }]` reads the same.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HelperConf {
    /// The Workload API socket (`unix:///path` or a path).
    pub(crate) agent_address: Option<String>,
    /// The reload program.
    cmd: Option<String>,
    /// Its arguments, split on spaces.
    cmd_args: Option<String>,
    /// The directory to write.
    cert_dir: Option<PathBuf>,
    /// The default SVID's chain file.
    svid_file_name: Option<String>,
    /// Its key file.
    svid_key_file_name: Option<String>,
    /// Its bundle file.
    svid_bundle_file_name: Option<String>,
    /// JWT-SVIDs to keep.
    #[serde(default)]
    jwt_svids: Vec<HelperJwt>,
    /// The signal for `pid_file_name`.
    renew_signal: Option<String>,
    /// The pid file of the process to signal.
    pid_file_name: Option<PathBuf>,
    /// `false`: write once and exit.
    daemon_mode: Option<bool>,
}

/// One `jwt_svids` item.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HelperJwt {
    jwt_audience: String,
    jwt_svid_file_name: String,
}

/// A plain file name in the directory: no separator, not `.` or `..`, at most 255 bytes.
fn file_name(key: &str, name: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 255
            && !name.contains(['/', '\0'])
            && name != "."
            && name != "..",
        "{key}: {name:?} is not a plain file name"
    );
    Ok(name.to_owned())
}

impl HelperConf {
    /// Reads and checks a configuration file.
    ///
    /// # Errors
    /// The file is unreadable, too large, not TOML, has unknown keys or bad values.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        anyhow::ensure!(
            size <= MAX_CONFIG_BYTES,
            "{}: larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let conf: Self = toml::from_str(text)?;
        anyhow::ensure!(
            conf.jwt_svids.len() <= MAX_JWT_SVIDS,
            "jwt_svids: at most {MAX_JWT_SVIDS}"
        );
        Ok(conf)
    }

    /// The write options it describes.
    ///
    /// # Errors
    /// A missing `cert_dir`, a file name that is not plain, an unknown signal.
    pub(crate) fn options(self, json: bool) -> anyhow::Result<WriteOptions> {
        let dir = self.cert_dir.context("cert_dir is required")?;
        let names = match (
            self.svid_file_name,
            self.svid_key_file_name,
            self.svid_bundle_file_name,
        ) {
            (None, None, None) => None,
            (Some(c), Some(k), Some(b)) => Some([
                file_name("svid_file_name", &c)?,
                file_name("svid_key_file_name", &k)?,
                file_name("svid_bundle_file_name", &b)?,
            ]),
            _ => anyhow::bail!(
                "svid_file_name, svid_key_file_name and svid_bundle_file_name go together"
            ),
        };
        let mut jwt_svids = Vec::new();
        for j in self.jwt_svids {
            anyhow::ensure!(
                !j.jwt_audience.is_empty() && j.jwt_audience.len() <= 256,
                "jwt_audience must be 1 to 256 bytes"
            );
            let file = file_name("jwt_svid_file_name", &j.jwt_svid_file_name)?;
            jwt_svids.push((j.jwt_audience, file));
        }
        let notify = match (self.cmd, self.pid_file_name) {
            (Some(cmd), _) => {
                let mut argv = vec![cmd];
                argv.extend(
                    self.cmd_args
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_owned),
                );
                Some(Notify::Command {
                    argv,
                    timeout: Duration::from_secs(30),
                })
            }
            (None, Some(file)) => Some(Notify::Signal {
                target: PidSource::File(file),
                signal: parse_signal(self.renew_signal.as_deref().unwrap_or("HUP"))?,
            }),
            (None, None) => None,
        };
        Ok(WriteOptions {
            dir,
            jwt_svids,
            names,
            notify,
            once: self.daemon_mode == Some(false),
            json,
        })
    }
}

/// Parses a signal name (`HUP`, `SIGHUP`, `USR1`, ...).
pub(crate) fn parse_signal(name: &str) -> anyhow::Result<rustix::process::Signal> {
    use rustix::process::Signal;
    let upper = name.trim().to_ascii_uppercase();
    Ok(match upper.trim_start_matches("SIG") {
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "WINCH" => Signal::WINCH,
        _ => anyhow::bail!("--signal {name:?}: one of HUP, USR1, USR2, TERM, INT, QUIT, WINCH"),
    })
}

/// A file name part for an audience: `[A-Za-z0-9._-]` kept, others `_`, at most 64
/// characters, never `.` or `..`.
pub(crate) fn audience_file_part(audience: &str) -> String {
    let mut out: String = audience
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_AUDIENCE_NAME)
        .collect();
    if out.chars().all(|c| c == '.') {
        out = out.replace('.', "_");
    }
    out
}

/// A trust domain ID (`spiffe://other.org`) as a file name part (`other.org`).
fn trust_domain_file_part(id: &str) -> String {
    audience_file_part(id.strip_prefix("spiffe://").unwrap_or(id))
}

fn pem(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| ::pem::encode(&::pem::Pem::new(tag, d.clone())))
        .collect()
}

/// A file written and fsynced under a temporary name in its directory, waiting to be
/// renamed into place.
struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

/// Writes `bytes` with `mode` to a temporary file in `dir` and fsyncs it.
fn stage(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<Staged> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", tmp.path().display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    Ok(Staged {
        tmp,
        path: dir.join(name),
    })
}

/// Renames staged files into place in their order; returns their paths.
fn commit(staged: Vec<Staged>) -> anyhow::Result<Vec<PathBuf>> {
    staged
        .into_iter()
        .map(|s| {
            s.tmp
                .persist(&s.path)
                .with_context(|| format!("cannot rename into {}", s.path.display()))?;
            Ok(s.path)
        })
        .collect()
}

/// Writes `bytes` to `dir/name` atomically with `mode`: a reader sees the old file or
/// the new one, never part of one.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<PathBuf> {
    let staged = stage(dir, name, bytes, mode)?;
    let path = staged.path.clone();
    commit(vec![staged])?;
    Ok(path)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Writes every file of `ctx` into `dir` in the documented order; returns the paths.
///
/// # Errors
/// The first file that cannot be written.
pub(crate) fn write_x509_files(
    dir: &Path,
    ctx: &X509Context,
    names: Option<&[String; 3]>,
) -> anyhow::Result<Vec<PathBuf>> {
    let name = |i: usize, which: usize, default: String| match (i, names) {
        (0, Some(n)) => n.get(which).cloned().unwrap_or(default),
        _ => default,
    };
    // Every file is written and fsynced first; the renames then follow one another in
    // the documented order, so the window between the key's and the chain's rename is
    // only that of a rename.
    let mut staged = Vec::new();
    for (i, s) in ctx.svids.iter().enumerate() {
        staged.push(stage(
            dir,
            &name(i, 2, format!("bundle.{i}.pem")),
            pem("CERTIFICATE", &s.bundle).as_bytes(),
            0o644,
        )?);
    }
    for (td, certs) in &ctx.federated {
        staged.push(stage(
            dir,
            &format!("federated_bundle.{}.pem", trust_domain_file_part(td)),
            pem("CERTIFICATE", certs).as_bytes(),
            0o644,
        )?);
    }
    for (i, s) in ctx.svids.iter().enumerate() {
        let key = zeroize::Zeroizing::new(pem("PRIVATE KEY", std::slice::from_ref(&s.private_key)));
        let chain = pem("CERTIFICATE", &s.cert_chain);
        staged.push(stage(
            dir,
            &name(i, 1, format!("svid.{i}.key")),
            key.as_bytes(),
            0o600,
        )?);
        staged.push(stage(
            dir,
            &name(i, 0, format!("svid.{i}.pem")),
            chain.as_bytes(),
            0o644,
        )?);
        let combined = zeroize::Zeroizing::new(format!("{}{chain}", key.as_str()));
        staged.push(stage(
            dir,
            &format!("svid.{i}.combined.pem"),
            combined.as_bytes(),
            0o600,
        )?);
    }
    let written = commit(staged)?;
    sync_dir(dir)?;
    Ok(written)
}

/// A digest of what the files would hold, to skip a response that changes nothing.
fn digest(ctx: &X509Context) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for s in &ctx.svids {
        h.update(s.spiffe_id.to_string().as_bytes());
        for part in s.cert_chain.iter().chain(&s.bundle) {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(sha2::Sha256::digest(&s.private_key));
    }
    for (td, certs) in &ctx.federated {
        h.update(td.as_bytes());
        for c in certs {
            h.update((c.len() as u64).to_be_bytes());
            h.update(c);
        }
    }
    h.finalize().into()
}

/// The `exp` and `iat` of a JWT (not verified: the agent just issued it).
fn jwt_times(token: &str) -> Option<(i64, i64)> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((claims.get("exp")?.as_i64()?, claims.get("iat")?.as_i64()?))
}

/// Fetches and writes the JWT-SVIDs; returns when to refresh them (half of the shortest
/// lifetime from now).
async fn write_jwts(client: &mut WorkloadClient, opts: &WriteOptions) -> anyhow::Result<Duration> {
    let now = SystemClock.unix_seconds();
    let mut next = None::<i64>;
    for (audience, file) in &opts.jwt_svids {
        let svids = client
            .fetch_jwt(std::slice::from_ref(audience), None)
            .await
            .with_context(|| format!("JWT-SVID for {audience:?}"))?;
        let (_, token) = svids
            .first()
            .with_context(|| format!("no JWT-SVID for {audience:?}"))?;
        write_atomic(&opts.dir, file, token.as_bytes(), 0o600)?;
        let half = match jwt_times(token) {
            Some((exp, iat)) => iat + (exp - iat) / 2 - now,
            None => 30,
        };
        next = Some(next.map_or(half, |n| n.min(half)));
    }
    sync_dir(&opts.dir)?;
    let secs = u64::try_from(next.unwrap_or(3600).max(1)).unwrap_or(1);
    Ok(Duration::from_secs(secs))
}

/// Runs the reload command or sends the signal; a failure is reported, not returned.
async fn notify(notify: &Notify) -> String {
    match notify {
        Notify::Command { argv, timeout } => {
            let Some((program, args)) = argv.split_first() else {
                return "empty command".into();
            };
            let child = tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => return format!("cannot run {program}: {e}"),
            };
            match tokio::time::timeout(*timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => "ok".into(),
                Ok(Ok(status)) => format!("{program} exited with {status}"),
                Ok(Err(e)) => format!("{program}: {e}"),
                Err(_) => {
                    let _ = child.kill().await;
                    format!("{program} did not finish within {timeout:?}; killed")
                }
            }
        }
        Notify::Signal { target, signal } => {
            let pid = match target {
                PidSource::Pid(p) => Ok(*p),
                PidSource::File(f) => std::fs::read_to_string(f)
                    .map_err(|e| format!("{}: {e}", f.display()))
                    .and_then(|t| {
                        t.trim()
                            .parse::<i32>()
                            .map_err(|e| format!("{}: {e}", f.display()))
                    }),
            };
            let pid = match pid {
                Ok(p) => p,
                Err(e) => return e,
            };
            let Some(pid) = rustix::process::Pid::from_raw(pid) else {
                return format!("{pid} is not a process id");
            };
            match rustix::process::kill_process(pid, *signal) {
                Ok(()) => "ok".into(),
                Err(e) => format!("signal to {}: {e}", pid.as_raw_nonzero()),
            }
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Stop {
    /// The agent is unreachable or the stream failed: reconnect.
    Agent(anyhow::Error),
    /// A file could not be written: reconnecting would not help.
    Files(anyhow::Error),
}

fn agent_err(e: impl Into<anyhow::Error>) -> Stop {
    Stop::Agent(super::api::explain_no_identity(e.into()))
}

/// One connection: writes at every change until the stream fails (an error) or the
/// process is told to stop (`Ok(())`).
async fn session(
    endpoint: &str,
    opts: &WriteOptions,
    last: &mut Option<[u8; 32]>,
    backoff: &mut Duration,
) -> Result<(), Stop> {
    let mut client = WorkloadClient::connect(endpoint).await.map_err(agent_err)?;
    let mut watch = client.watch_x509().await.map_err(agent_err)?;
    let mut jwt_client = client.clone();
    let mut jwt_due: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            next = watch.next() => {
                let ctx = next.map_err(agent_err)?;
                let received = Instant::now();
                *backoff = FIRST_BACKOFF;
                let d = digest(&ctx);
                if *last == Some(d) {
                    continue;
                }
                let files = write_x509_files(&opts.dir, &ctx, opts.names.as_ref()).map_err(Stop::Files)?;
                let write_us = received.elapsed().as_micros();
                *last = Some(d);
                if !opts.jwt_svids.is_empty() && jwt_due.is_none() {
                    jwt_due = Some(match write_jwts(&mut jwt_client, opts).await {
                        Ok(after) => tokio::time::Instant::now() + after,
                        Err(e) => {
                            errln!("writ: {e:#}; retrying in {JWT_RETRY:?}");
                            tokio::time::Instant::now() + JWT_RETRY
                        }
                    });
                }
                let reload = match &opts.notify {
                    Some(n) => Some(notify(n).await),
                    None => None,
                };
                if let Some(r) = reload.as_deref().filter(|r| *r != "ok") {
                    errln!("writ: reload failed: {r}");
                }
                report(opts, &ctx, &files, write_us, reload.as_deref()).map_err(Stop::Files)?;
                if opts.once {
                    return Ok(());
                }
            }
            () = sleep_until(jwt_due) => {
                jwt_due = Some(match write_jwts(&mut jwt_client, opts).await {
                    Ok(after) => tokio::time::Instant::now() + after,
                    Err(e) => {
                        errln!("writ: {e:#}; keeping the last JWT-SVID files, retrying in {JWT_RETRY:?}");
                        tokio::time::Instant::now() + JWT_RETRY
                    }
                });
            }
            () = super::server::shutdown_signal() => return Ok(()),
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn serial(ctx: &X509Context) -> Option<String> {
    let leaf = ctx.svids.first()?.cert_chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.raw_serial_as_string())
}

fn report(
    opts: &WriteOptions,
    ctx: &X509Context,
    files: &[PathBuf],
    write_us: u128,
    reload: Option<&str>,
) -> anyhow::Result<()> {
    if opts.json {
        outln!(
            "{}",
            serde_json::json!({
                "spiffe_ids": ctx.svids.iter().map(|s| s.spiffe_id.to_string()).collect::<Vec<_>>(),
                "serial": serial(ctx),
                "files": files,
                "write_us": write_us,
                "reload": reload,
            })
        )?;
    } else {
        let first = ctx
            .svids
            .first()
            .map(|s| s.spiffe_id.to_string())
            .unwrap_or_default();
        outln!(
            "Wrote {} files for {first} to {} in {write_us} us{}",
            files.len(),
            opts.dir.display(),
            reload
                .map(|r| format!(" (reload: {r})"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Keeps `opts.dir` fresh from the Workload API at `endpoint` until stopped,
/// reconnecting with back-off (with `once`: until the first write, failing on the first
/// error).
///
/// # Errors
/// The directory cannot be created, a file cannot be written, or (with `once`) the
/// agent fails.
pub(crate) async fn watch(endpoint: &str, opts: WriteOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let mut last = None;
    let mut backoff = FIRST_BACKOFF;
    let mut failures = BTreeMap::<String, u32>::new();
    loop {
        match session(endpoint, &opts, &mut last, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(Stop::Files(e)) => return Err(e),
            Err(Stop::Agent(e)) if opts.once => return Err(e),
            Err(Stop::Agent(e)) => {
                let count = failures.entry(format!("{e:#}")).or_default();
                *count += 1;
                if *count == 1 || count.is_power_of_two() {
                    errln!("writ: {e:#}; keeping the last files, retrying in {backoff:?}");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = super::server::shutdown_signal() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_become_safe_file_names() {
        assert_eq!(
            audience_file_part("https://sts.amazonaws.com"),
            "https___sts.amazonaws.com"
        );
        assert_eq!(audience_file_part("../etc"), ".._etc");
        assert_eq!(audience_file_part(".."), "__");
        assert_eq!(
            audience_file_part(&"x".repeat(500)).len(),
            MAX_AUDIENCE_NAME
        );
        assert_eq!(trust_domain_file_part("spiffe://other.org"), "other.org");
    }

    #[test]
    fn a_spiffe_helper_conf_reads_and_garbage_is_refused() {
        let conf = HelperConf::parse(
            r#"
agent_address = "/tmp/writ/agent.sock"
cmd = "nginx"
cmd_args = "-s reload"
cert_dir = "/run/writ/nginx"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
renew_signal = "SIGHUP"
daemon_mode = false
jwt_svids = [{ jwt_audience = "sts.amazonaws.com", jwt_svid_file_name = "aws.token" }]
"#,
        )
        .unwrap();
        assert_eq!(conf.agent_address.as_deref(), Some("/tmp/writ/agent.sock"));
        let o = conf.options(false).unwrap();
        assert!(o.once);
        assert_eq!(
            o.names.unwrap(),
            ["svid.pem", "svid_key.pem", "svid_bundle.pem"].map(String::from)
        );
        assert_eq!(
            o.jwt_svids,
            [("sts.amazonaws.com".to_owned(), "aws.token".to_owned())]
        );
        match o.notify {
            Some(Notify::Command { argv, .. }) => assert_eq!(argv, ["nginx", "-s", "reload"]),
            other => panic!("{other:?}"),
        }
        for bad in [
            "cert_dir = 3",
            "nonsense = true",
            "cert_dir = \"/x\"\nsvid_file_name = \"../etc/passwd\"\nsvid_key_file_name = \"k\"\nsvid_bundle_file_name = \"b\"",
            "cert_dir = \"/x\"\nsvid_file_name = \"a\"",
            "cert_dir = \"/x\"\npid_file_name = \"/p\"\nrenew_signal = \"SIGNOPE\"",
            "\u{0}\u{1}garbage [[[",
            "daemon_mode = false",
        ] {
            let refused = HelperConf::parse(bad).and_then(|c| c.options(false));
            assert!(refused.is_err(), "{bad:?}");
        }
        let many = format!(
            "cert_dir = \"/x\"\njwt_svids = [{}]",
            vec!["{ jwt_audience = \"a\", jwt_svid_file_name = \"f\" }"; 40].join(",")
        );
        assert!(HelperConf::parse(&many).is_err());
    }

    #[test]
    fn signals_parse() {
        assert_eq!(parse_signal("hup").unwrap(), rustix::process::Signal::HUP);
        assert_eq!(
            parse_signal("SIGUSR1").unwrap(),
            rustix::process::Signal::USR1
        );
        assert!(parse_signal("KILLALL").is_err());
    }

    #[test]
    fn atomic_writes_set_the_mode_and_leave_no_temporary_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = write_atomic(dir.path(), "svid.0.key", b"secret", 0o600).unwrap();
        write_atomic(dir.path(), "svid.0.key", b"secret2", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"secret2");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn jwt_times_read_garbage_as_none() {
        assert_eq!(jwt_times("garbage"), None);
        assert_eq!(jwt_times("a.b.c"), None);
        assert_eq!(jwt_times("a.eyJleHAiOjEwLCJpYXQiOjR9.c"), Some((10, 4)));
    }

    #[tokio::test]
    async fn signals_reach_the_process_and_a_hung_command_is_killed() {
        use rustix::process::Signal;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let sent = notify(&Notify::Signal {
            target: PidSource::Pid(pid),
            signal: Signal::TERM,
        })
        .await;
        assert_eq!(sent, "ok");
        assert!(!child.wait().unwrap().success());

        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("nginx.pid");
        std::fs::write(&pid_file, "not a pid\n").unwrap();
        let bad = notify(&Notify::Signal {
            target: PidSource::File(pid_file.clone()),
            signal: Signal::HUP,
        })
        .await;
        assert!(bad.contains("nginx.pid"), "{bad}");
        std::fs::remove_file(&pid_file).unwrap();
        let missing = notify(&Notify::Signal {
            target: PidSource::File(pid_file),
            signal: Signal::HUP,
        })
        .await;
        assert!(missing.contains("nginx.pid"), "{missing}");

        let hung = notify(&Notify::Command {
            argv: vec!["sleep".into(), "30".into()],
            timeout: Duration::from_millis(200),
        })
        .await;
        assert!(hung.contains("killed"), "{hung}");
        let failed = notify(&Notify::Command {
            argv: vec!["false".into()],
            timeout: Duration::from_secs(30),
        })
        .await;
        assert!(failed.contains("exited with"), "{failed}");
    }
}
