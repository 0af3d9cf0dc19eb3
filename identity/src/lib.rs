//! Writ identity core: SPIFFE IDs and trust domains, X509-SVIDs and JWT-SVIDs (issue and
//! validate), SPIFFE bundles, the CA with rotation, the registration store, and the
//! identity server with its admin API.
//!
//! ```no_run
//! use std::sync::Arc;
//! use writ_identity::{ca::{CaConfig, CertificateAuthority}, clock::SystemClock,
//!     key_manager::MemoryKeyManager, spiffe_id::{SpiffeId, TrustDomain},
//!     store::sqlite::SqliteStore};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let td = TrustDomain::new("example.org")?;
//! let store = Arc::new(SqliteStore::open_in_memory().await?);
//! let ca = CertificateAuthority::load(CaConfig::new(td), Arc::new(SystemClock),
//!     Arc::new(MemoryKeyManager::new()), store).await?;
//! let svid = ca.mint_x509_svid(&SpiffeId::new("spiffe://example.org/agents/planner")?, None, &[])?;
//! println!("{}", svid.chain_pem());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod accept;
pub mod agent;
pub mod attest;
pub mod bundle;
pub mod ca;
pub mod clock;
pub mod entry;
pub mod key_manager;
pub mod numeric_date;
pub mod rate_limit;
pub mod selector;
pub mod server;
pub mod spiffe_id;
pub mod store;
pub mod svid;
pub mod tls;

/// Generated gRPC code for the protos under `specs/proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// Writ's own APIs, by proto package.
    pub mod writ {
        /// `writ.admin.*`.
        pub mod admin {
            /// `writ.admin.v1`: the identity server's admin API.
            pub mod v1 {
                tonic::include_proto!("writ.admin.v1");
            }
        }
        /// `writ.delegation.*`.
        pub mod delegation {
            /// `writ.delegation.v1`: sub-agent leases on the agent socket.
            pub mod v1 {
                tonic::include_proto!("writ.delegation.v1");
            }
        }
        /// `writ.node.*`.
        pub mod node {
            /// `writ.node.v1`: the server's API for agents.
            pub mod v1 {
                tonic::include_proto!("writ.node.v1");
            }
        }
    }
    /// `grpc.*`: standard gRPC services.
    pub mod grpc {
        /// `grpc.health.*`.
        pub mod health {
            /// `grpc.health.v1`: the standard health checking protocol (`Check` only),
            /// served by the agent on its Workload API socket.
            pub mod v1 {
                tonic::include_proto!("grpc.health.v1");
            }
        }
    }
    /// The SPIFFE Workload API (no proto package, as the standard defines it).
    pub mod workload {
        tonic::include_proto!("_");
    }
    pub use writ::admin::v1 as admin;
    pub use writ::delegation::v1 as delegation;
    pub use writ::node::v1 as node;
}
