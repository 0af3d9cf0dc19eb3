//! The tests of the examples, linked as one test binary: the deployment files and doc
//! snippets against the real loaders (`deploy`), and the example programs run as a user
//! runs them (`examples`). Run one with `cargo test -p writ-examples --test suite deploy::`.
#![expect(
    unused_crate_dependencies,
    reason = "an integration-test target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed setup step should abort the test loudly"
)]

mod deploy;
mod examples;
