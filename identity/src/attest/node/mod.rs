//! Node attestation beyond join tokens: how the server learns which node an agent runs
//! on from evidence the agent cannot forge.
//!
//! - [`k8s_psat`]: the agent's projected service-account token, checked with the
//!   cluster's TokenReview API, as SPIRE's `k8s_psat` node attestor.

pub mod k8s_psat;
