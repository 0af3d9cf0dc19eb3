//! Test harness shared by the cross-crate suites.
