//! The SPIFFE core of Writ: what a workload needs to hold and check identities, and
//! nothing of the server. Identity servers and agents (`writ-identity`) and the SDK
//! (`writ-sdk`) both build on it, so a SPIFFE ID, a bundle or an SVID has one type
//! everywhere.
//!
//! | module | owns | feature |
//! |---|---|---|
//! | [`spiffe_id`] | SPIFFE IDs and trust domains | always |
//! | [`clock`] | the injected clock every expiry reads | always |
//! | [`duration`] | the one duration syntax of configuration files and flags | always |
//! | [`fingerprint`] | SHA-256 names for tokens and certificates | always |
//! | [`process`] | `/proc/<pid>/stat`: a process's start time and state | always |
//! | [`revocation`] | the kill switch's targets, entries, feed pages and the set verifiers keep | always |
//! | `bundle` | SPIFFE bundles and JWKs | `svid` |
//! | `svid` | X509-SVID and JWT-SVID types and validation | `svid` |
//! | `key` | private keys, zeroized and redacted | `svid` |
//! | `numeric_date` | JWT NumericDate and time-window rules | `svid` |
//! | `tls` | rustls verifiers and authorizers for SVIDs | `tls` |
//! | `proto` | Workload API and sub-agent API messages and stubs | `workload-api` |
//! | `accept` | listener admission that no client can hold hostage | `accept` (`grpc-server` adds tonic glue) |
//!
//! `default = []`: with no feature this crate depends on `thiserror`, `serde`, `sha2` and `hex`
//! only. The generated proto code is committed, so no protoc runs for users.
//!
//! ```
//! use writ_spiffe::spiffe_id::{SpiffeId, TrustDomain};
//!
//! let id = SpiffeId::new("spiffe://example.org/agents/planner")?;
//! assert_eq!(id.trust_domain(), TrustDomain::new("example.org")?);
//! assert_eq!(id.path(), "/agents/planner");
//! # Ok::<(), writ_spiffe::spiffe_id::SpiffeIdError>(())
//! ```
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "unit tests see the dev-dependencies of the integration tests"
    )
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod duration;
pub mod fingerprint;
pub mod process;
pub mod revocation;
pub mod spiffe_id;

#[cfg(feature = "accept")]
pub mod accept;
#[cfg(feature = "svid")]
pub mod bundle;
#[cfg(feature = "svid")]
pub mod key;
#[cfg(feature = "svid")]
pub mod numeric_date;
#[cfg(feature = "svid")]
pub mod svid;
#[cfg(feature = "tls")]
pub mod tls;

/// Generated gRPC code (committed; `tests/proto.rs` checks it against `specs/proto`).
#[cfg(feature = "workload-api")]
pub mod proto {
    /// The SPIFFE Workload API (no proto package, as the standard defines it).
    #[expect(
        missing_docs,
        clippy::pedantic,
        clippy::allow_attributes,
        clippy::allow_attributes_without_reason,
        reason = "generated code"
    )]
    pub mod workload {
        include!("proto/workload.rs");
    }
    /// `writ.delegation.v1`: sub-agent leases, served next to the Workload API on the
    /// agent socket.
    #[expect(
        missing_docs,
        clippy::pedantic,
        clippy::allow_attributes,
        clippy::allow_attributes_without_reason,
        reason = "generated code"
    )]
    pub mod delegation {
        include!("proto/delegation.rs");
    }
}
