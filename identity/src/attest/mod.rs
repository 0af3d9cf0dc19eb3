//! Attestation: turning "who is on the other end" into [selectors](crate::selector) that
//! registration entries match against, from facts the attested party cannot forge.
//!
//! - [`workload`]: the process behind a Workload API connection (`unix:uid:1000`,
//!   `unix:path:/usr/bin/app`, `unix:sha256:...`), as SPIRE's `unix` workload attestor.

pub mod workload;
