//! The `unix` workload attestor: selectors from the kernel's view of a process, as SPIRE's
//! `unix` workload attestor writes them.
//!
//! | selector | source |
//! |---|---|
//! | `unix:uid:<uid>`, `unix:gid:<gid>` | the [`Caller`] (`SO_PEERCRED`), never `/proc` |
//! | `unix:user:<name>`, `unix:group:<name>` | the passwd and group files |
//! | `unix:supplementary_gid:<gid>` | the `Groups:` line of `/proc/<pid>/status` |
//! | `unix:supplementary_group:<name>` | the group file, for those gids |
//! | `unix:path:<path>` | the target of `/proc/<pid>/exe` |
//! | `unix:sha256:<hex>` | the bytes read through `/proc/<pid>/exe` (up to a size limit) |
//!
//! # Pid reuse
//!
//! The start time of the process (field 22 of `/proc/<pid>/stat`) is read before any
//! selector is collected and again after the last one; if it changed, the pid was reused
//! and attestation fails with [`AttestError::ProcessChanged`]. If the process is gone,
//! it fails with [`AttestError::ProcessGone`].
//!
//! # Limits
//!
//! - Pid reuse *before* the first read (between the connect and the attestation) cannot
//!   be seen here; keep that window short, or compare against a start time read at
//!   accept time with [`verify_start_time`].
//! - `exec` keeps the pid and the start time: a process that connects and then execs
//!   another binary is attested as that binary. Combine `path`/`sha256` selectors with
//!   `uid` selectors in registration entries.
//! - Paths are as the process sees them; in another mount namespace they name files
//!   inside that namespace.
//!
//! # Only what an entry can use
//!
//! Through [`WorkloadAttestor::attest_for`] the agent says which selector types its
//! entries use ([`SelectorDemand`]). Beyond `uid` and `gid` (free: they come with the
//! socket), a type is computed only when an entry that could still match the caller
//! uses it, cheapest first: the `status` file, the account files and the `exe` link,
//! then, last, `sha256`. A caller that matches no entry's `uid` is never hashed.
//! Hashing is bounded: executables above a size are not hashed, at most
//! [`DEFAULT_MAX_CONCURRENT_HASHES`] hashes run at once, and digests are remembered by
//! file identity (device, inode, size, mtime, ctime).
//!
//! Selectors that cannot be formed (a path with a control character, a name longer than
//! [`crate::selector::MAX_VALUE_LEN`]) and facts that cannot be read (an unreadable
//! `exe` for an agent that is not root, a missing passwd file) are left out and logged:
//! fewer selectors can only match fewer registration entries.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{
    AllSelectors, AttestError, Attestation, Caller, SelectorDemand, SelectorTypes, WorkloadAttestor,
};
use crate::selector::Selector;
pub use writ_spiffe::process::ProcStat;
use writ_spiffe::process::{self, ProcError, process_is_gone, read_bounded};

/// Where `/proc` is mounted unless configured otherwise.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// The passwd file read unless configured otherwise.
pub const DEFAULT_PASSWD_FILE: &str = "/etc/passwd";
/// The group file read unless configured otherwise.
pub const DEFAULT_GROUP_FILE: &str = "/etc/group";
/// Largest executable hashed for `unix:sha256` unless configured otherwise (64 MiB).
pub const DEFAULT_MAX_HASH_BYTES: u64 = 64 * 1024 * 1024;
/// Most executables hashed at the same time unless configured otherwise.
pub const DEFAULT_MAX_CONCURRENT_HASHES: usize = 1;
/// Most bytes read from `/proc/<pid>/stat`.
pub use writ_spiffe::process::MAX_STAT_BYTES;
/// Most bytes read from `/proc/<pid>/status`.
pub const MAX_STATUS_BYTES: u64 = 64 * 1024;
/// Most bytes read from the passwd or group file; entries past it are not seen.
pub const MAX_ACCOUNT_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The selector type this attestor produces.
const KIND: &str = "unix";
/// Fields in a passwd line (`name:pw:uid:gid:gecos:dir:shell`).
const PASSWD_FIELDS: usize = 7;
/// Fields in a group line (`name:pw:gid:members`).
const GROUP_FIELDS: usize = 4;
/// Read size while hashing.
const HASH_CHUNK: usize = 64 * 1024;

/// Settings for a [`UnixAttestor`]; start from [`UnixAttestor::builder`].
#[derive(Debug, Clone)]
pub struct UnixAttestorBuilder {
    proc_root: PathBuf,
    passwd_file: PathBuf,
    group_file: PathBuf,
    max_hash_bytes: u64,
    max_concurrent_hashes: usize,
}

impl Default for UnixAttestorBuilder {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from(DEFAULT_PROC_ROOT),
            passwd_file: PathBuf::from(DEFAULT_PASSWD_FILE),
            group_file: PathBuf::from(DEFAULT_GROUP_FILE),
            max_hash_bytes: DEFAULT_MAX_HASH_BYTES,
            max_concurrent_hashes: DEFAULT_MAX_CONCURRENT_HASHES,
        }
    }
}

impl UnixAttestorBuilder {
    /// Where procfs is mounted (default [`DEFAULT_PROC_ROOT`]).
    #[must_use]
    pub fn proc_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.proc_root = path.into();
        self
    }

    /// The passwd file for `unix:user` (default [`DEFAULT_PASSWD_FILE`]).
    #[must_use]
    pub fn passwd_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.passwd_file = path.into();
        self
    }

    /// The group file for `unix:group` and `unix:supplementary_group` (default
    /// [`DEFAULT_GROUP_FILE`]).
    #[must_use]
    pub fn group_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.group_file = path.into();
        self
    }

    /// Largest executable, in bytes, that gets a `unix:sha256` selector (default
    /// [`DEFAULT_MAX_HASH_BYTES`]). Larger executables get none; `0` hashes only empty
    /// files.
    #[must_use]
    pub fn max_hash_bytes(mut self, max: u64) -> Self {
        self.max_hash_bytes = max;
        self
    }

    /// Most executables hashed at the same time (default
    /// [`DEFAULT_MAX_CONCURRENT_HASHES`]; `0` counts as 1); other callers that need a
    /// hash wait, so hashing never takes more than this many cores.
    #[must_use]
    pub fn max_concurrent_hashes(mut self, max: usize) -> Self {
        self.max_concurrent_hashes = max.max(1);
        self
    }

    /// The attestor.
    pub fn build(self) -> UnixAttestor {
        UnixAttestor {
            settings: Arc::new(self),
            digests: Arc::default(),
        }
    }
}

/// Attests local processes from `/proc`, the passwd file and the group file.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    settings: Arc<UnixAttestorBuilder>,
    digests: Arc<DigestCache>,
}

/// Most executable digests remembered.
const MAX_CACHED_DIGESTS: usize = 1024;

/// SHA-256 digests of executables by file identity (device, inode, size, mtime, ctime of
/// the file the process runs), so a workload's binary is hashed once, not on every call;
/// a binary changed in place has a new mtime/ctime and is hashed again.
#[derive(Debug, Default)]
struct DigestCache {
    digests: std::sync::Mutex<std::collections::HashMap<FileIdentity, String>>,
    /// Hashes running now, under [`UnixAttestorBuilder::max_concurrent_hashes`].
    running: std::sync::Mutex<usize>,
    /// Signalled when a hash finishes.
    finished: std::sync::Condvar,
    /// Executables hashed since the attestor was built (cache hits not counted).
    computed: std::sync::atomic::AtomicU64,
}

/// One of the permitted concurrent hashes; released on drop.
struct HashPermit<'a>(&'a DigestCache);

impl Drop for HashPermit<'_> {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|e| e.into_inner());
        *running = running.saturating_sub(1);
        self.0.finished.notify_one();
    }
}

type FileIdentity = (u64, u64, u64, i64, i64, i64, i64);

impl DigestCache {
    fn get(&self, id: &FileIdentity) -> Option<String> {
        self.digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn put(&self, id: FileIdentity, digest: String) {
        let mut map = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CACHED_DIGESTS {
            map.clear();
        }
        map.insert(id, digest);
    }

    /// Waits (blocking) until fewer than `max` hashes run, and takes a slot.
    fn permit(&self, max: usize) -> HashPermit<'_> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= max.max(1) {
            running = self
                .finished
                .wait(running)
                .unwrap_or_else(|e| e.into_inner());
        }
        *running = running.saturating_add(1);
        HashPermit(self)
    }
}

impl Default for UnixAttestor {
    fn default() -> Self {
        UnixAttestorBuilder::default().build()
    }
}

impl UnixAttestor {
    /// Settings with the defaults, to change and [`build`](UnixAttestorBuilder::build).
    pub fn builder() -> UnixAttestorBuilder {
        UnixAttestorBuilder::default()
    }

    /// Where this attestor reads procfs.
    pub fn proc_root(&self) -> &Path {
        &self.settings.proc_root
    }

    /// The selectors for `caller`, read on the calling thread (blocking file I/O).
    /// [`WorkloadAttestor::attest`] runs this on tokio's blocking pool.
    ///
    /// # Errors
    /// [`AttestError::InvalidPid`], [`AttestError::ProcessGone`],
    /// [`AttestError::ProcessChanged`], or a `/proc` file that cannot be read or parsed.
    pub fn attest_blocking(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        attest_process(&self.settings, &self.digests, *caller, &AllSelectors).map(|a| a.selectors)
    }

    /// The selectors for `caller` that `demand` wants (see
    /// [`WorkloadAttestor::attest_for`]), read on the calling thread.
    ///
    /// # Errors
    /// As [`Self::attest_blocking`].
    pub fn attest_for_blocking(
        &self,
        caller: &Caller,
        demand: &dyn SelectorDemand,
    ) -> Result<Attestation, AttestError> {
        attest_process(&self.settings, &self.digests, *caller, demand)
    }

    /// How many executables this attestor (and its clones) has hashed: digests served
    /// from the cache do not count. For tests and metrics.
    pub fn hashes_computed(&self) -> u64 {
        self.digests
            .computed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for UnixAttestor {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let this = self.clone();
        let caller = *caller;
        tokio::task::spawn_blocking(move || this.attest_blocking(&caller))
            .await
            .map_err(AttestError::TaskFailed)?
    }

    async fn attest_for(
        &self,
        caller: &Caller,
        demand: Arc<dyn SelectorDemand>,
    ) -> Result<Attestation, AttestError> {
        let this = self.clone();
        let caller = *caller;
        tokio::task::spawn_blocking(move || this.attest_for_blocking(&caller, demand.as_ref()))
            .await
            .map_err(AttestError::TaskFailed)?
    }
}

/// Parses a `/proc/<pid>/stat` line (see [`writ_spiffe::process::parse_stat`]).
///
/// # Errors
/// [`AttestError::MalformedStat`] when the line is not in that form.
pub fn parse_stat(stat: &[u8]) -> Result<ProcStat, AttestError> {
    Ok(process::parse_stat(stat)?)
}

/// Reads and parses `<proc_root>/<pid>/stat`. Blocking.
///
/// # Errors
/// [`AttestError::InvalidPid`] for `pid <= 0`, [`AttestError::ProcessGone`] if there is
/// no such process, [`AttestError::MalformedStat`], or the I/O error.
pub fn read_stat(proc_root: &Path, pid: i32) -> Result<ProcStat, AttestError> {
    Ok(process::read_stat(proc_root, pid)?)
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`, clock ticks since
/// boot): with the pid, it names one process across pid reuse. Blocking.
///
/// # Errors
/// As [`read_stat`].
pub fn process_start_time(proc_root: &Path, pid: i32) -> Result<u64, AttestError> {
    read_stat(proc_root, pid).map(|s| s.start_time())
}

/// The parent of process `pid` (field 4 of `/proc/<pid>/stat`). Blocking.
///
/// # Errors
/// As [`read_stat`].
pub fn parent_pid(proc_root: &Path, pid: i32) -> Result<i32, AttestError> {
    read_stat(proc_root, pid).map(|s| s.ppid())
}

/// Checks that `pid` still names the process that had start time `expected`. Blocking.
///
/// # Errors
/// [`AttestError::ProcessChanged`] if the start time differs, [`AttestError::ProcessGone`]
/// if the process exited, or the errors of [`read_stat`].
pub fn verify_start_time(proc_root: &Path, pid: i32, expected: u64) -> Result<(), AttestError> {
    if process_start_time(proc_root, pid)? == expected {
        Ok(())
    } else {
        Err(AttestError::ProcessChanged { pid })
    }
}

/// The selector types this attestor computes after `uid`/`gid`, in rounds of growing
/// cost: the demand is asked again before each round.
const CHEAP_TYPES: [&str; 5] = [
    "supplementary_gid",
    "supplementary_group",
    "user",
    "group",
    "path",
];
/// The last, costly round.
const COSTLY_TYPES: [&str; 1] = ["sha256"];

/// The whole attestation, on the calling thread, computing only what `demand` wants.
fn attest_process(
    settings: &UnixAttestorBuilder,
    digests: &DigestCache,
    caller: Caller,
    demand: &dyn SelectorDemand,
) -> Result<Attestation, AttestError> {
    let pid = caller.pid;
    let start_time = process_start_time(&settings.proc_root, pid)?;
    let dir = proc_dir(&settings.proc_root, pid)?;
    let mut out = Selectors::default();
    let mut computed = SelectorTypes::default();
    let mut skipped = SelectorTypes::default();

    out.push("uid", &caller.uid.to_string());
    out.push("gid", &caller.gid.to_string());
    computed.insert(KIND, "uid");
    computed.insert(KIND, "gid");

    let wanted = demand.wanted(&out.0, &computed);
    let want = |name: &str| wanted.contains(KIND, name);
    let supplementary = if want("supplementary_gid") || want("supplementary_group") {
        supplementary_gids(&dir, pid)?
    } else {
        BTreeSet::new()
    };
    if want("supplementary_gid") {
        for gid in &supplementary {
            out.push("supplementary_gid", &gid.to_string());
        }
    }
    if want("user") {
        let users = account_names(
            &settings.passwd_file,
            PASSWD_FIELDS,
            &BTreeSet::from([caller.uid]),
        );
        if let Some(name) = users.get(&caller.uid) {
            out.push("user", name);
        }
    }
    if want("group") || want("supplementary_group") {
        let mut gids = BTreeSet::new();
        if want("group") {
            gids.insert(caller.gid);
        }
        if want("supplementary_group") {
            gids.extend(supplementary.iter().copied());
        }
        let groups = account_names(&settings.group_file, GROUP_FIELDS, &gids);
        if want("group")
            && let Some(name) = groups.get(&caller.gid)
        {
            out.push("group", name);
        }
        if want("supplementary_group") {
            for name in supplementary.iter().filter_map(|gid| groups.get(gid)) {
                out.push("supplementary_group", name);
            }
        }
    }
    let exe = dir.join("exe");
    if want("path")
        && let Some(path) = exe_path(&exe, pid)?
    {
        out.push("path", &path);
    }
    for name in CHEAP_TYPES {
        if want(name) {
            computed.insert(KIND, name);
        } else {
            skipped.insert(KIND, name);
        }
    }

    let wanted = demand.wanted(&out.0, &computed);
    if wanted.contains(KIND, "sha256") {
        if let Some(digest) = exe_sha256(&exe, pid, settings, digests)? {
            out.push("sha256", &digest);
        }
    } else {
        for name in COSTLY_TYPES {
            skipped.insert(KIND, name);
        }
    }

    match verify_start_time(&settings.proc_root, pid, start_time) {
        Ok(()) => {}
        // A malformed or unreadable stat now, after a good one before: not the same process.
        Err(AttestError::MalformedStat { .. }) => return Err(AttestError::ProcessChanged { pid }),
        Err(e) => return Err(e),
    }
    Ok(Attestation {
        selectors: out.finish(),
        skipped,
    })
}

/// Collects selectors, leaving out (and logging) those that break the selector rules.
#[derive(Default)]
struct Selectors(Vec<Selector>);

impl Selectors {
    fn push(&mut self, name: &str, value: &str) {
        match Selector::new(KIND, &format!("{name}:{value}")) {
            Ok(s) => self.0.push(s),
            Err(e) => tracing::debug!(selector = name, error = %e, "selector left out"),
        }
    }

    fn finish(mut self) -> Vec<Selector> {
        self.0.sort();
        self.0.dedup();
        self.0
    }
}

/// `<proc_root>/<pid>`, for a positive pid.
fn proc_dir(proc_root: &Path, pid: i32) -> Result<PathBuf, AttestError> {
    if pid <= 0 {
        return Err(AttestError::InvalidPid { pid });
    }
    Ok(proc_root.join(pid.to_string()))
}

/// A failed read below `/proc/<pid>`: gone if the process is gone.
fn proc_error(pid: i32, e: ProcError) -> AttestError {
    match e {
        ProcError::Io { source, .. } if process_is_gone(&source) => {
            AttestError::ProcessGone { pid }
        }
        other => other.into(),
    }
}

/// The supplementary group ids from the `Groups:` line of `/proc/<pid>/status`. Tokens
/// that are not group ids are skipped.
fn supplementary_gids(dir: &Path, pid: i32) -> Result<BTreeSet<u32>, AttestError> {
    let status =
        read_bounded(&dir.join("status"), MAX_STATUS_BYTES).map_err(|e| proc_error(pid, e))?;
    let Some(groups) = status
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"Groups:"))
    else {
        tracing::debug!(pid, "no Groups: line in /proc status");
        return Ok(BTreeSet::new());
    };
    Ok(groups
        .split(u8::is_ascii_whitespace)
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            let gid = parse_decimal(t).and_then(|g| u32::try_from(g).ok());
            if gid.is_none() {
                tracing::debug!(pid, "malformed gid in /proc status Groups: line skipped");
            }
            gid
        })
        .collect())
}

/// The target of `/proc/<pid>/exe`, if it is an absolute UTF-8 path of a file that still
/// exists.
fn exe_path(exe: &Path, pid: i32) -> Result<Option<String>, AttestError> {
    let target = match std::fs::read_link(exe) {
        Ok(target) => target,
        Err(e) if process_is_gone(&e) => return Err(AttestError::ProcessGone { pid }),
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot read /proc exe link; no path selector");
            return Ok(None);
        }
    };
    let Some(path) = target.to_str() else {
        tracing::debug!(pid, "executable path is not UTF-8; no path selector");
        return Ok(None);
    };
    if !path.starts_with('/') {
        tracing::debug!(pid, "executable path is not absolute; no path selector");
        return Ok(None);
    }
    // The kernel marks an unlinked executable this way; the name no longer names it.
    if path.ends_with(" (deleted)") {
        tracing::debug!(pid, "executable was deleted or replaced; no path selector");
        return Ok(None);
    }
    Ok(Some(path.to_owned()))
}

/// The lowercase hex SHA-256 of the executable, read through `/proc/<pid>/exe` so that a
/// file put at the same path later is not what gets hashed. `None` past `max` bytes.
fn exe_sha256(
    exe: &Path,
    pid: i32,
    settings: &UnixAttestorBuilder,
    digests: &DigestCache,
) -> Result<Option<String>, AttestError> {
    let max = settings.max_hash_bytes;
    let file = match File::open(exe) {
        Ok(file) => file,
        Err(e) if process_is_gone(&e) => return Err(AttestError::ProcessGone { pid }),
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot open executable; no sha256 selector");
            return Ok(None);
        }
    };
    let too_big = |size: u64| {
        tracing::debug!(
            pid,
            size,
            max,
            "executable larger than the hash limit; no sha256 selector"
        );
    };
    let meta = file.metadata().map_err(|source| AttestError::Io {
        path: exe.to_path_buf(),
        source,
    })?;
    let size = meta.len();
    if size > max {
        too_big(size);
        return Ok(None);
    }
    let identity: FileIdentity = {
        use std::os::unix::fs::MetadataExt;
        (
            meta.dev(),
            meta.ino(),
            size,
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        )
    };
    if let Some(digest) = digests.get(&identity) {
        return Ok(Some(digest));
    }
    let _permit = digests.permit(settings.max_concurrent_hashes);
    // Another caller may have hashed the same file while this one waited.
    if let Some(digest) = digests.get(&identity) {
        return Ok(Some(digest));
    }
    digests
        .computed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut reader = file.take(max.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(AttestError::Io {
                    path: exe.to_path_buf(),
                    source,
                });
            }
        };
        hasher.update(buf.get(..n).unwrap_or_default());
        total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    // The file grew while it was read.
    if total > max {
        too_big(total);
        return Ok(None);
    }
    let digest = hex::encode(hasher.finalize());
    digests.put(identity, digest.clone());
    Ok(Some(digest))
}

/// Names for `wanted` ids from a passwd-style file (`name:pw:id:...` with `fields`
/// fields), the first line for each id winning. Reading stops once every id is named.
/// Malformed lines are skipped; a file that cannot be read names nothing (logged).
fn account_names(path: &Path, fields: usize, wanted: &BTreeSet<u32>) -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    if let Err(e) = scan_account_file(path, fields, wanted, &mut found) {
        tracing::warn!(path = %path.display(), error = %e, "cannot read account file; names left out");
    }
    found
}

fn scan_account_file(
    path: &Path,
    fields: usize,
    wanted: &BTreeSet<u32>,
    found: &mut BTreeMap<u32, String>,
) -> io::Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let mut reader = BufReader::new(File::open(path)?.take(MAX_ACCOUNT_FILE_BYTES));
    let mut line = Vec::new();
    let mut read: u64 = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        read = read.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        if !line.ends_with(b"\n") && read >= MAX_ACCOUNT_FILE_BYTES {
            tracing::warn!(path = %path.display(), max = MAX_ACCOUNT_FILE_BYTES,
                "account file larger than the limit; the rest is ignored");
            break;
        }
        let Some((id, name)) = parse_account_line(&line, fields) else {
            continue;
        };
        if wanted.contains(&id) && !found.contains_key(&id) {
            found.insert(id, name.to_owned());
            if found.len() == wanted.len() {
                break;
            }
        }
    }
    Ok(())
}

/// `(id, name)` from one passwd or group line with exactly `fields` fields; `None` for
/// comments, NIS `+`/`-` lines and anything malformed.
fn parse_account_line(line: &[u8], fields: usize) -> Option<(u32, &str)> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b':');
    let name = parts.next()?;
    let _password = parts.next()?;
    let id = parts.next()?;
    if parts.count().checked_add(3)? != fields {
        return None;
    }
    if name.is_empty() || matches!(name.first(), Some(b'#' | b'+' | b'-')) {
        return None;
    }
    let id = u32::try_from(parse_decimal(id)?).ok()?;
    let name = std::str::from_utf8(name).ok()?;
    Some((id, name))
}

/// A non-empty run of ASCII digits as a number (no sign, no spaces).
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_lines() {
        assert_eq!(
            parse_account_line(b"root:x:0:0:root:/root:/bin/bash\n", PASSWD_FIELDS),
            Some((0, "root"))
        );
        assert_eq!(
            parse_account_line(b"wheel:x:10:alice,bob\r\n", GROUP_FIELDS),
            Some((10, "wheel"))
        );
        for bad in [
            &b""[..],
            b"\n",
            b"garbage",
            b"a:x:1",
            b"a:x:+1:0:::",
            b"a:x:-1:0:::",
            b"a:x: 1:0:::",
            b"a:x::0:::",
            b"a:x:99999999999:0:::",
            b":x:1:0:::",
            b"#a:x:1:0:::",
            b"+a:x:1:0:::",
            b"a:x:1:0::::extra",
            b"\xff\xfe:x:1:0:::",
        ] {
            assert_eq!(parse_account_line(bad, PASSWD_FIELDS), None, "{bad:?}");
        }
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"+1"), None);
        assert_eq!(parse_decimal(b"1 "), None);
    }

    #[test]
    fn invalid_pid() {
        assert!(matches!(
            read_stat(Path::new("/proc"), 0),
            Err(AttestError::InvalidPid { pid: 0 })
        ));
        assert!(matches!(
            parent_pid(Path::new("/proc"), -5),
            Err(AttestError::InvalidPid { pid: -5 })
        ));
    }
}
