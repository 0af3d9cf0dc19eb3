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
pub mod k8s;
pub mod unix;

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
