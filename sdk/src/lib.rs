//! Writ SDK: what a workload links.
//!
//! - [`workload`]: the SPIFFE Workload API client; [`workload::X509Source`], the
//!   workload's X509-SVID and bundles kept current across rotations, and
//!   [`workload::JwtSource`], JWT-SVIDs per audience;
//! - [`tls`]: rustls server and client configs with SPIFFE-ID [`tls::Authorizer`]s;
//! - [`listener`]: serving axum over SPIFFE mTLS, with the caller's ID per connection;
//! - [`txn_token`]: the Txn-Token claims type and [`txn_token::TxnVerifier`], which
//!   gets its keys through [`jwks`], the one fetch/cache/refetch of remote key sets;
//! - [`middleware`]: [`middleware::TxnLayer`] and the [`middleware::Verified`]
//!   extractor, which check the caller and its Txn-Token together;
//! - [`exchange`]: the RFC 8693 client of the transaction token service, and [`oauth`],
//!   its vocabulary (token types, grant type), available without any feature;
//! - [`spawn`]: sub-agents, child processes with a short-lived identity under this
//!   workload's, released with it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_sdk::workload::WorkloadError> {
//! let mut client = writ_sdk::workload::WorkloadClient::connect_env().await?;
//! let x509 = client.fetch_x509().await?;
//! println!("I am {}", x509.svids[0].spiffe_id);
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

#[cfg(feature = "exchange")]
pub mod exchange;
#[cfg(feature = "txn-verify")]
pub mod jwks;
#[cfg(feature = "axum")]
pub mod listener;
#[cfg(feature = "axum")]
pub mod middleware;
pub mod oauth;
#[cfg(feature = "spawn")]
pub mod spawn;
#[cfg(feature = "x509-source")]
pub mod tls;
#[cfg(feature = "txn-verify")]
pub mod txn_token;
#[cfg(feature = "workload-api")]
pub mod workload;

/// The SPIFFE core the SDK is built on (bundles, SVIDs, the clock, fingerprints), for
/// the types its signatures name.
pub use writ_spiffe as spiffe;
pub use writ_spiffe::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
