//! The demo's `sub_agent` program: see [`writ_examples::roles::sub_agent`].
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

fn main() -> std::process::ExitCode {
    writ_examples::roles::sub_agent::main()
}
