//! Writ SDK: what a workload links. The Workload API client, SPIFFE mTLS and Txn-Token verification arrive in later releases; today it re-exports the identity types a workload needs.
#![forbid(unsafe_code)]

pub use writ_identity::{spiffe_id::SpiffeId, spiffe_id::TrustDomain};
