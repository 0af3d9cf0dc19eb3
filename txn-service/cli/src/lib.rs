//! The `writ` command: one binary for every part of Writ. It starts and administers the
//! identity server and agent (`writ server`, `writ agent`, `writ entry`, `writ api`,
//! `writ x509`/`writ jwt`), the transaction token service (`writ txn`), and runs the
//! whole system on one machine (`writ dev`) and its end-to-end demonstration
//! (`writ demo`, with the demo's programs built into this binary).
//!
//! This package is the only one that uses `clap` and `anyhow`; the libraries it drives
//! (`writ-identity`, `writ-txn-service`, `writ-sdk`) have typed errors.
//!
//! ```no_run
//! use clap::Parser as _;
//! let cli = writ_cli::cli::Cli::parse_from(["writ", "dev", "--help"]);
//! # let _ = cli;
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "unit tests see the dev-dependencies of the integration tests"
    )
)]

pub mod bench;
pub mod cli;
pub mod dev;
