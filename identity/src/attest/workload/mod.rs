//! Workload attestation: which selectors describe the process that connected to the
//! Workload API socket.
//!
//! The agent learns the peer's pid, uid and gid from the kernel (`SO_PEERCRED`) and hands
//! them to a [`WorkloadAttestor`] as a [`Caller`]. The attestor must not trust anything
//! the process says about itself; [`UnixAttestor`] reads only the kernel's view under
//! `/proc` and the system account files.
//!
//! ```no_run
//! use writ_identity::attest::workload::{Caller, UnixAttestor, WorkloadAttestor};
//! # async fn demo() -> Result<(), writ_identity::attest::workload::AttestError> {
//! let attestor = UnixAttestor::builder().max_hash_bytes(16 * 1024 * 1024).build();
//! let caller = Caller { pid: 4242, uid: 1000, gid: 1000 };
//! for selector in attestor.attest(&caller).await? {
//!     println!("{selector}"); // unix:uid:1000, unix:user:alice, unix:path:/usr/bin/app, ...
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::selector::Selector;

pub mod cgroup;
pub mod docker;
pub mod k8s;
pub mod unix;

pub use docker::{DockerAttestor, DockerAttestorConfig};
pub use unix::{
    ProcStat, UnixAttestor, UnixAttestorBuilder, parent_pid, parse_stat, process_start_time,
    read_stat, verify_start_time,
};

/// The process on the other end of the Workload API socket, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Process id (the thread group id) of the peer when it connected.
    pub pid: i32,
    /// Effective user id of the peer when it connected.
    pub uid: u32,
    /// Effective group id of the peer when it connected.
    pub gid: u32,
}

/// Finds the selectors that describe a workload.
#[async_trait::async_trait]
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The selectors that describe the caller. Must not trust anything the caller says.
    ///
    /// # Errors
    /// [`AttestError`] when the caller cannot be attested; the Workload API then issues
    /// no identity.
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError>;

    /// The selectors of the caller that `demand` can use: an attestor may leave out a
    /// costly selector type (`unix:sha256`, `unix:path`, ...) that no entry which could
    /// still match the caller uses, and reports what it left out in
    /// [`Attestation::skipped`]. The default computes every selector ([`Self::attest`]).
    ///
    /// # Errors
    /// As [`Self::attest`].
    async fn attest_for(
        &self,
        caller: &Caller,
        demand: Arc<dyn SelectorDemand>,
    ) -> Result<Attestation, AttestError> {
        let _ = demand;
        Ok(Attestation {
            selectors: self.attest(caller).await?,
            skipped: SelectorTypes::default(),
        })
    }
}

/// What [`WorkloadAttestor::attest_for`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attestation {
    /// The selectors computed.
    pub selectors: Vec<Selector>,
    /// Selector types the attestor could have computed but left out, because no entry
    /// that could match the caller used them. If the entries change, the caller must be
    /// attested again when a candidate entry now uses one of them.
    pub skipped: SelectorTypes,
}

/// Which selectors are worth computing for a caller, asked by an attestor before each
/// costly step. The agent's entry cache answers it from its entries' selectors.
pub trait SelectorDemand: Send + Sync + std::fmt::Debug {
    /// The selector types, among those not in `computed`, used by some entry that could
    /// still match: an entry whose every selector of a type in `computed` is in `found`.
    fn wanted(&self, found: &[Selector], computed: &SelectorTypes) -> SelectorTypes;
}

/// Every selector type is wanted: attestation computes everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllSelectors;

impl SelectorDemand for AllSelectors {
    fn wanted(&self, _found: &[Selector], _computed: &SelectorTypes) -> SelectorTypes {
        SelectorTypes::all()
    }
}

/// A set of selector types: `unix:uid`, `unix:sha256` (the selector's kind and the part
/// of its value before the first `:`), or every type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectorTypes {
    all: bool,
    types: BTreeSet<(String, String)>,
}

impl SelectorTypes {
    /// Every selector type.
    pub fn all() -> Self {
        Self {
            all: true,
            types: BTreeSet::new(),
        }
    }

    /// The types of `selectors`.
    pub fn of<'a>(selectors: impl IntoIterator<Item = &'a Selector>) -> Self {
        let mut out = Self::default();
        for s in selectors {
            out.insert_type_of(s);
        }
        out
    }

    /// The type of `selector`: its kind and the part of its value before the first `:`.
    fn type_of(selector: &Selector) -> (&str, &str) {
        let value = selector.value();
        let name = value.split_once(':').map_or(value, |(name, _)| name);
        (selector.kind(), name)
    }

    /// Adds the type `kind:name`.
    pub fn insert(&mut self, kind: &str, name: &str) {
        if !self.all {
            self.types.insert((kind.to_owned(), name.to_owned()));
        }
    }

    /// Adds the type of `selector`.
    pub fn insert_type_of(&mut self, selector: &Selector) {
        let (kind, name) = Self::type_of(selector);
        if !self.all && !self.contains(kind, name) {
            self.insert(kind, name);
        }
    }

    /// Whether the type `kind:name` is in the set.
    pub fn contains(&self, kind: &str, name: &str) -> bool {
        self.all
            || self
                .types
                .iter()
                .any(|(k, n)| k.as_str() == kind && n.as_str() == name)
    }

    /// Whether the type of `selector` is in the set.
    pub fn contains_type_of(&self, selector: &Selector) -> bool {
        let (kind, name) = Self::type_of(selector);
        self.contains(kind, name)
    }

    /// Whether every type in `self` is in `other`.
    pub fn is_subset_of(&self, other: &Self) -> bool {
        if self.all {
            return other.all;
        }
        self.types.iter().all(|(k, n)| other.contains(k, n))
    }

    /// Whether a type is in both sets.
    pub fn intersects(&self, other: &Self) -> bool {
        match (self.all, other.all) {
            (true, true) => true,
            (true, false) => !other.types.is_empty(),
            (false, true) => !self.types.is_empty(),
            (false, false) => self.types.iter().any(|(k, n)| other.contains(k, n)),
        }
    }

    /// Adds every type of `other`.
    pub fn extend(&mut self, other: &Self) {
        if other.all {
            *self = Self::all();
        } else if !self.all {
            self.types.extend(other.types.iter().cloned());
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        !self.all && self.types.is_empty()
    }

    /// The types, as `kind:name` strings (`["*"]` for every type), for logs.
    pub fn names(&self) -> Vec<String> {
        if self.all {
            return vec!["*".to_owned()];
        }
        self.types.iter().map(|(k, n)| format!("{k}:{n}")).collect()
    }
}

/// The attestor chain: named [`WorkloadAttestor`]s run one after another for each
/// caller, their selectors concatenated. Each one is asked through
/// [`WorkloadAttestor::attest_for`] with a [`SelectorDemand`] that already knows the
/// selectors found before it, so a costly attestor (Docker, Kubernetes) is skipped when
/// no entry that could still match the caller uses its types. The first error fails the
/// attestation (an attestor that cannot reach its source should give no selectors
/// rather than fail, as [`docker::DockerAttestor`] does).
///
/// ```
/// use std::sync::Arc;
/// use writ_identity::attest::workload::{Attestors, UnixAttestor};
/// let chain = Attestors::new().with("unix", Arc::new(UnixAttestor::default()));
/// assert_eq!(chain.names(), ["unix"]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Attestors {
    list: Vec<(String, Arc<dyn WorkloadAttestor>)>,
}

impl Attestors {
    /// An empty chain (it attests every caller with no selectors).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `attestor` under `name` (for logs) at the end of the chain.
    #[must_use]
    pub fn with(mut self, name: &str, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        self.list.push((name.to_owned(), attestor));
        self
    }

    /// The names of the attestors, in order.
    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// The demand seen by an attestor in a chain: the caller's demand, with the selectors
/// the attestors before it found counted as found (and their types as computed).
#[derive(Debug)]
struct ChainDemand {
    inner: Arc<dyn SelectorDemand>,
    found: Vec<Selector>,
    computed: SelectorTypes,
}

impl SelectorDemand for ChainDemand {
    fn wanted(&self, found: &[Selector], computed: &SelectorTypes) -> SelectorTypes {
        let mut all = self.found.clone();
        all.extend_from_slice(found);
        let mut types = self.computed.clone();
        types.extend(computed);
        self.inner.wanted(&all, &types)
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for Attestors {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let mut selectors = Vec::new();
        for (_, attestor) in &self.list {
            selectors.extend(attestor.attest(caller).await?);
        }
        Ok(selectors)
    }

    async fn attest_for(
        &self,
        caller: &Caller,
        demand: Arc<dyn SelectorDemand>,
    ) -> Result<Attestation, AttestError> {
        let mut out = Attestation::default();
        for (_, attestor) in &self.list {
            // Only the types of selectors found count as computed: an entry that needs a
            // selector the caller lacks stays a candidate, which can only ask for more.
            let step = Arc::new(ChainDemand {
                inner: demand.clone(),
                computed: SelectorTypes::of(&out.selectors),
                found: out.selectors.clone(),
            });
            let found = attestor.attest_for(caller, step).await?;
            out.selectors.extend(found.selectors);
            out.skipped.extend(&found.skipped);
        }
        Ok(out)
    }
}

/// Why a workload could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The pid is not a positive number, so it names no process.
    #[error("pid {pid} is not a valid process id")]
    InvalidPid {
        /// The pid given.
        pid: i32,
    },
    /// The process exited (or became a zombie) before attestation finished.
    #[error("process {pid} exited during attestation")]
    ProcessGone {
        /// The pid of the process.
        pid: i32,
    },
    /// The pid names a different process at the end of attestation than at the start
    /// (its start time changed): the pid was reused.
    #[error("process {pid} was replaced by another process during attestation")]
    ProcessChanged {
        /// The reused pid.
        pid: i32,
    },
    /// `/proc/<pid>/stat` is not in the kernel's format.
    #[error("malformed /proc stat line: {reason}")]
    MalformedStat {
        /// What was wrong.
        reason: &'static str,
    },
    /// A file was larger than the limit for that file.
    #[error("{path} is larger than {max} bytes")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The limit, in bytes.
        max: u64,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task that reads `/proc` panicked or was cancelled.
    #[error("attestation task failed: {0}")]
    TaskFailed(#[source] tokio::task::JoinError),
}

impl From<writ_spiffe::process::ProcError> for AttestError {
    fn from(e: writ_spiffe::process::ProcError) -> Self {
        use writ_spiffe::process::ProcError;
        match e {
            ProcError::InvalidPid { pid } => Self::InvalidPid { pid },
            ProcError::ProcessGone { pid } => Self::ProcessGone { pid },
            ProcError::MalformedStat { reason } => Self::MalformedStat { reason },
            ProcError::FileTooLarge { path, max } => Self::FileTooLarge { path, max },
            ProcError::Io { path, source } => Self::Io { path, source },
            other => Self::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }
}

/// A [`WorkloadAttestor`] that returns fixed selectors, for tests of what sits on top of
/// attestation (the Workload API server, delegation).
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Default)]
pub struct StaticAttestor {
    default: Vec<Selector>,
    by_pid: std::collections::BTreeMap<i32, Vec<Selector>>,
}

#[cfg(any(test, feature = "test-util"))]
impl StaticAttestor {
    /// An attestor that gives every caller `selectors`.
    pub fn new(selectors: Vec<Selector>) -> Self {
        Self {
            default: selectors,
            by_pid: std::collections::BTreeMap::new(),
        }
    }

    /// Gives the caller with `pid` these selectors instead of the default ones.
    #[must_use]
    pub fn with_pid(mut self, pid: i32, selectors: Vec<Selector>) -> Self {
        self.by_pid.insert(pid, selectors);
        self
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait::async_trait]
impl WorkloadAttestor for StaticAttestor {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        Ok(self
            .by_pid
            .get(&caller.pid)
            .unwrap_or(&self.default)
            .clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    /// Wants `docker:*` only from callers with `unix:uid:0` (as an entry
    /// `unix:uid:0 + docker:label:app:a` would).
    #[derive(Debug)]
    struct DockerForRoot;
    impl SelectorDemand for DockerForRoot {
        fn wanted(&self, found: &[Selector], computed: &SelectorTypes) -> SelectorTypes {
            let mut t = SelectorTypes::default();
            if !computed.contains("unix", "uid") || found.contains(&sel("unix:uid:0")) {
                t.insert("docker", "label");
            }
            t
        }
    }

    /// Counts its calls; gives `docker:label:app:a` when asked.
    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);
    #[async_trait::async_trait]
    impl WorkloadAttestor for Counting {
        async fn attest(&self, _: &Caller) -> Result<Vec<Selector>, AttestError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(vec![sel("docker:label:app:a")])
        }
        async fn attest_for(
            &self,
            caller: &Caller,
            demand: Arc<dyn SelectorDemand>,
        ) -> Result<Attestation, AttestError> {
            if !demand
                .wanted(&[], &SelectorTypes::default())
                .contains("docker", "label")
            {
                let mut skipped = SelectorTypes::default();
                skipped.insert("docker", "label");
                return Ok(Attestation {
                    selectors: vec![],
                    skipped,
                });
            }
            Ok(Attestation {
                selectors: self.attest(caller).await?,
                skipped: SelectorTypes::default(),
            })
        }
    }

    #[tokio::test]
    async fn chain_concatenates_and_passes_what_it_found() {
        let caller = Caller {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let docker = Arc::new(Counting::default());
        let root = Attestors::new()
            .with(
                "unix",
                Arc::new(StaticAttestor::new(vec![sel("unix:uid:0")])),
            )
            .with("docker", docker.clone());
        assert_eq!(root.names(), ["unix", "docker"]);
        let got = root
            .attest_for(&caller, Arc::new(DockerForRoot))
            .await
            .unwrap();
        assert_eq!(
            got.selectors,
            [sel("unix:uid:0"), sel("docker:label:app:a")]
        );
        assert!(got.skipped.is_empty());
        assert_eq!(docker.0.load(std::sync::atomic::Ordering::Relaxed), 1);

        // uid 1000 matches no entry that uses docker selectors: docker is not asked.
        let user = Attestors::new()
            .with(
                "unix",
                Arc::new(StaticAttestor::new(vec![sel("unix:uid:1000")])),
            )
            .with("docker", docker.clone());
        let got = user
            .attest_for(&caller, Arc::new(DockerForRoot))
            .await
            .unwrap();
        assert_eq!(got.selectors, [sel("unix:uid:1000")]);
        assert!(got.skipped.contains("docker", "label"));
        assert_eq!(docker.0.load(std::sync::atomic::Ordering::Relaxed), 1);

        // attest() asks everyone.
        assert_eq!(user.attest(&caller).await.unwrap().len(), 2);
    }

    #[test]
    fn selector_types_extend() {
        let mut a = SelectorTypes::default();
        a.insert("unix", "uid");
        let mut b = SelectorTypes::default();
        b.insert("docker", "label");
        a.extend(&b);
        assert!(a.contains("docker", "label") && a.contains("unix", "uid"));
        a.extend(&SelectorTypes::all());
        assert!(a.contains("k8s", "ns"));
    }
}
