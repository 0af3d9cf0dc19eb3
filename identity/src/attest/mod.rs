//! Attestation: turning "who is on the other end" into [selectors](crate::selector) that
//! registration entries match against, from facts the attested party cannot forge.
//!
//! - [`workload`]: the process behind a Workload API connection (`unix:uid:1000`,
//!   `unix:path:/usr/bin/app`, `unix:sha256:...`), as SPIRE's `unix` workload attestor.
//! - [`node`]: the node an agent runs on (`k8s_psat:cluster:prod`, ...), for agents that
//!   attest with more than a join token.

pub mod node;
pub mod workload;
