//! The `writ` command's tests, linked as one test binary: one module per area, each
//! running the real binary (`CARGO_BIN_EXE_writ`). Run one area with
//! `cargo test -p writ-cli --test suite <module>::`.
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

mod bench;
mod cli_agent;
mod cli_audit;
mod cli_server;
mod cli_spawn;
mod cli_templates;
mod cli_txn;
mod cli_unix;
mod common;
mod compose;
mod demo;
mod dev;
mod docker;
mod explorer;
mod federation;
mod fleet;
mod helper;
mod observability;
mod oidc_discovery;
mod readme;
mod recipes;
mod revocation;
mod tls_names;
mod trust_domain;
