//! The token service's tests against its public API, linked as one test binary. Run one
//! area with `cargo test -p writ-txn-service --test suite <module>::`.
#![expect(
    unused_crate_dependencies,
    reason = "an integration-test target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

mod audit;
mod conditions;
mod conformance;
mod exchange;
mod oidc;
mod oidc_token_kinds;
mod overload;
mod replicas;
mod txn_token;
