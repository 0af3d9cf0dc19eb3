//! The tests of the examples, linked as one test binary: the deployment files and doc
//! snippets against the real loaders (`deploy`), and the example programs run as a user
//! runs them (`examples`). Run one with `cargo test -p writ-examples --test suite deploy::`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

mod deploy;
mod examples;
