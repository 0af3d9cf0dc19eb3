//! The integration tests of `writ-identity`, linked as one test binary: one module per
//! area, each driving the public API. Run one area with
//! `cargo test -p writ-identity --test suite <module>::`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

mod admin;
mod bundle;
mod ca;
mod jwt_svid;
mod spawn_rate;
mod spiffe_id;
mod store;
mod unix_attestor;
