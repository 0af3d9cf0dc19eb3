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

use std::path::PathBuf;

use crate::selector::Selector;

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
