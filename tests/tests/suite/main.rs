//! The cross-crate end-to-end and interop tests, linked as one test binary: one module
//! per area, on the `writ-tests` harness. Run one area with
//! `cargo test -p writ-tests --test suite <module>::`.
#![expect(
    unused_crate_dependencies,
    reason = "an integration-test target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

mod explorer;
mod hostage;
mod node_api;
mod node_trust;
mod openapi;
mod py_spiffe;
mod sdk_audit;
mod sdk_jwt_source;
mod sdk_mtls;
mod sdk_revocation;
mod sds;
mod split_agent;
mod streams;
mod subagents;
mod support;
mod tts;
mod txn_verifier;
mod workload_api;
mod wpt;
