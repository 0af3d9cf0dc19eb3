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

pub mod bundle;
pub mod ca;
pub mod clock;
pub mod entry;
pub mod key_manager;
pub mod selector;
pub mod server;
pub mod spiffe_id;
pub mod store;
pub mod svid;

/// Generated gRPC code for the protos under `specs/proto`.
pub mod proto {
    /// `writ.admin.v1`: the identity server's admin API.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod admin {
        tonic::include_proto!("writ.admin.v1");
    }
}
