//! Writ SDK: what a workload links. It owns the workload side of Writ (Workload API
//! client, SVID sources, SPIFFE mTLS configs and authorizers, Txn-Token verification,
//! axum serving and middleware, the token-exchange client, sub-agent spawning); it does
//! not own the SPIFFE types themselves (`writ-spiffe`, re-exported as [`spiffe`]) nor
//! anything of the identity server, agent or token service.
//!
//! Every capability is a feature, and `default = []` gives only [`SpiffeId`] and
//! [`TrustDomain`]:
//!
//! | feature | modules |
//! |---|---|
//! | `workload-api` | [`workload`]: `WorkloadClient`, the SPIFFE Workload API client |
//! | `x509-source` | `workload::X509Source`, the workload's X509-SVID and bundles kept current across rotations; [`tls`]: rustls configs with SPIFFE-ID `Authorizer`s |
//! | `jwt-source` | `workload::JwtSource`: JWT-SVIDs per audience |
//! | `txn-verify` | [`txn_token`]: the Txn-Token claims type and `TxnVerifier`; [`audit`]: the record a service keeps of each verification and the sinks it goes to (`LogSink`, `JsonLinesSink`; with `exchange` also `TtsSink`, sent to the token service); [`jwks`]: the one fetch/cache/refetch of remote key sets (the token service's OIDC ingress uses it too) |
//! | `txn-verify` | [`revocation`]: `RevocationFeed`, the kill switch's revocations followed from the token service, for `TxnVerifier`, `TxnLayer` and `tls::Authorizer::not_revoked` |
//! | `axum` | [`listener`]: axum over SPIFFE mTLS; [`middleware`]: `TxnLayer` and `Verified`, which check the caller and its Txn-Token together |
//! | `wpt` | [`wpt`]: WIT-SVIDs and WIMSE Workload Proof Tokens, made and verified, for hops without mTLS end to end (`TxnLayer::with_proof`) |
//! | `exchange` | [`exchange`]: `TxnClient`, the RFC 8693 client of the token service |
//! | `otel` | `trace::TraceContext`'s OpenTelemetry bridge: `TxnLayer`'s span joins the incoming `traceparent`, outgoing calls carry the current span's context |
//! | `spawn` | [`spawn`]: sub-agents, child processes with a short-lived identity under this workload's |
//!
//! [`oauth`] (token types, the token-exchange grant type) and [`trace`] (W3C Trace
//! Context, `traceparent`) need no feature.
//!
//! The crate's `README.md` shows each feature's Cargo line and a quick start;
//! `docs/sdk.md` is the guide.
//!
//! ```no_run
//! # #[cfg(feature = "workload-api")]
//! # async fn demo() -> Result<(), writ_sdk::workload::WorkloadError> {
//! // The socket SPIFFE_ENDPOINT_SOCKET names (the SDK has no default socket).
//! let mut client = writ_sdk::workload::WorkloadClient::connect_env().await?;
//! let x509 = client.fetch_x509().await?;
//! for svid in &x509.svids {
//!     println!("I am {}", svid.spiffe_id);
//! }
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

#[cfg(feature = "txn-verify")]
pub mod audit;
#[cfg(feature = "exchange")]
pub mod exchange;
#[cfg(feature = "txn-verify")]
pub mod jwks;
#[cfg(feature = "axum")]
pub mod listener;
#[cfg(feature = "axum")]
pub mod middleware;
pub mod oauth;
#[cfg(feature = "txn-verify")]
pub mod revocation;
#[cfg(feature = "spawn")]
pub mod spawn;
#[cfg(feature = "x509-source")]
pub mod tls;
pub mod trace;
#[cfg(feature = "txn-verify")]
pub mod txn_token;
#[cfg(feature = "workload-api")]
pub mod workload;
#[cfg(feature = "wpt")]
pub mod wpt;

/// The SPIFFE core the SDK is built on (bundles, SVIDs, the clock, fingerprints), for
/// the types its signatures name.
pub use writ_spiffe as spiffe;
pub use writ_spiffe::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// The Rust snippets of `README.md` compile as doctests (with every feature on, as in
/// `cargo test -p writ-sdk --all-features` and the workspace's tests).
#[cfg(all(
    doctest,
    feature = "workload-api",
    feature = "x509-source",
    feature = "jwt-source",
    feature = "txn-verify",
    feature = "axum",
    feature = "exchange",
    feature = "spawn"
))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
