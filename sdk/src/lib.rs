//! Writ SDK: what a workload links.
//!
//! - [`workload`]: the SPIFFE Workload API client; [`workload::X509Source`], the
//!   workload's X509-SVID and bundles kept current across rotations, and
//!   [`workload::JwtSource`], JWT-SVIDs per audience;
//! - [`tls`]: rustls server and client configs with SPIFFE-ID [`tls::Authorizer`]s;
//! - [`listener`]: serving axum over SPIFFE mTLS, with the caller's ID per connection;
//! - [`txn_token`]: the Txn-Token claims type and [`txn_token::TxnVerifier`];
//! - [`middleware`]: [`middleware::TxnLayer`] and the [`middleware::Verified`]
//!   extractor, which check the caller and its Txn-Token together;
//! - [`exchange`]: the RFC 8693 client of the transaction token service;
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
#![forbid(unsafe_code)]

pub mod exchange;
pub mod listener;
pub mod middleware;
pub mod spawn;
pub mod tls;
pub mod txn_token;
pub mod workload;

pub use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
