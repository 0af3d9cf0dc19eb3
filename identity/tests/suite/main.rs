//! The integration tests of `writ-identity`, linked as one test binary: one module per
//! area, each driving the public API. Run one area with
//! `cargo test -p writ-identity --test suite <module>::`.
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

mod admin;
mod bundle;
mod ca;
mod entry_cache;
mod failover;
mod federation;
mod fleet;
mod jwt_svid;
mod k8s;
mod revocation;
mod revoked_workload;
mod spawn_rate;
mod spiffe_id;
mod store;
mod templates;
mod unix_attestor;
mod wit_svid;
