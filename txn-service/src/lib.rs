//! The Writ transaction token service. The `writ` command that starts it is in the
//! `writ-cli` package; the Txn-Token claims type and verifier it shares with workloads,
//! and the exchange client, are in `writ-sdk`.
//!
//! The service ([`config::TxnServer`], started by `writ txn run --config txn.toml`) is
//! an RFC 8693 token exchange endpoint reached over mTLS with the caller's X509-SVID
//! ([`listener`]). It validates ingress OIDC tokens ([`oidc`]), applies a deny-by-default
//! issuance [`policy`], mints Txn-Tokens (draft-ietf-oauth-transaction-tokens-11) with
//! rotating keys ([`txn_token`]), replaces them down a delegation chain ([`exchange`]),
//! and writes one [`audit`] line per decision. Replicas behind one issuer URL share
//! their public keys through the identity server's store ([`replica`]).
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "unit tests see the dev-dependencies of the integration tests"
    )
)]
#![forbid(unsafe_code)]

pub mod audit;
pub mod client_assertion;
pub mod config;
pub mod exchange;
pub mod explorer;
pub mod lease;
pub mod listener;
pub mod metrics;
pub mod oidc;
pub mod ops;
pub mod policy;
pub mod rate_limit;
pub mod replica;
pub mod revocation;
pub mod server_name;
pub mod shed;
pub mod subject;
pub mod txn_token;
