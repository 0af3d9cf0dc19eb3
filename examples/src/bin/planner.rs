//! The demo's `planner` program: see [`writ_examples::roles::planner`].
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

fn main() -> std::process::ExitCode {
    writ_examples::roles::planner::main()
}
