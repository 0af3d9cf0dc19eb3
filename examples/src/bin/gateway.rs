//! The demo's `gateway` program: see [`writ_examples::roles::gateway`].
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

fn main() -> std::process::ExitCode {
    writ_examples::roles::gateway::main()
}
