//! Per-caller token buckets, shared with the identity server (which limits sub-agent
//! spawning with the same buckets): see [`writ_identity::rate_limit`].

pub use writ_identity::rate_limit::{Rate, RateLimiter};
