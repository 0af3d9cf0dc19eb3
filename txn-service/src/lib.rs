//! The Writ transaction token service (arriving in a later release) and the `writ`
//! command-line tool that starts and administers every part of Writ.
#![forbid(unsafe_code)]

pub mod cli;
pub mod exchange;
pub mod oidc;
pub mod policy;
pub mod txn_token;
