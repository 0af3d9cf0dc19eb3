//! Writ SDK: what a workload links.
//!
//! Today: a SPIFFE Workload API client ([`workload`]) and the Txn-Token claims type with
//! an offline verifier ([`txn_token`]). X509Source/JwtSource with rotation, SPIFFE mTLS
//! configs and the middleware follow.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_sdk::workload::WorkloadError> {
//! let mut client = writ_sdk::workload::WorkloadClient::connect_env().await?;
//! let x509 = client.fetch_x509().await?;
//! println!("I am {}", x509.svids[0].spiffe_id);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod txn_token;
pub mod workload;

pub use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
