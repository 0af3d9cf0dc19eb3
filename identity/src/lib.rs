//! The Writ identity server and agent: the CA with rotation, key managers, the
//! registration store (SQLite, PostgreSQL), node and workload attestation, the
//! server<->agent protocol, the Workload API server and child-SVID delegation. The SPIFFE
//! types they share with workloads (IDs, bundles, SVIDs, TLS verifiers) live in
//! `writ-spiffe` and are re-exported here under their usual paths; the transaction
//! token service (`writ-txn-service`), the workload SDK (`writ-sdk`) and the `writ`
//! command (`writ-cli`) are other packages.
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
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "unit tests see the dev-dependencies of the integration tests"
    )
)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod attest;
pub mod ca;
pub mod entry;
pub mod key_manager;
pub mod ops;
pub mod rate_limit;
pub mod selector;
pub mod server;
pub mod store;

// The SPIFFE core, re-exported so that server code and its users name one type: a
// `writ_identity::spiffe_id::SpiffeId` is a `writ_spiffe::spiffe_id::SpiffeId`.
pub use writ_spiffe::{
    accept, bundle, clock, duration, fingerprint, numeric_date, spiffe_id, svid, tls,
};

/// Generated gRPC code for the protos under `specs/proto` (the Workload API and the
/// sub-agent API come from `writ-spiffe`, where their generated code is committed).
#[expect(
    missing_docs,
    clippy::pedantic,
    clippy::allow_attributes,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]
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
    /// `envoy.*`: the subset of Envoy's API the agent's SDS serves (see
    /// [`crate::agent::sds`]), trimmed from the official protos (same packages, names
    /// and field numbers).
    pub mod envoy {
        /// `envoy.config.*`.
        pub mod config {
            /// `envoy.config.core.*`.
            pub mod core {
                /// `envoy.config.core.v3`: `Node`, `DataSource`, `TypedExtensionConfig`.
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        /// `envoy.extensions.*`.
        pub mod extensions {
            /// `envoy.extensions.transport_sockets.*`.
            pub mod transport_sockets {
                /// `envoy.extensions.transport_sockets.tls.*`.
                pub mod tls {
                    /// `envoy.extensions.transport_sockets.tls.v3`: `Secret` and what it holds.
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                    }
                }
            }
        }
        /// `envoy.service.*`.
        pub mod service {
            /// `envoy.service.discovery.*`.
            pub mod discovery {
                /// `envoy.service.discovery.v3`: the xDS discovery messages.
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
            /// `envoy.service.secret.*`.
            pub mod secret {
                /// `envoy.service.secret.v3`: the Secret Discovery Service.
                pub mod v3 {
                    tonic::include_proto!("envoy.service.secret.v3");
                }
            }
        }
    }
    /// `google.*` messages the Envoy API uses.
    pub mod google {
        /// `google.rpc`: `Status` (an xDS NACK's error).
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
    pub use writ::admin::v1 as admin;
    pub use writ::node::v1 as node;
    pub use writ_spiffe::proto::{delegation, workload};
}
