//! The demo's `tool_server` program: see [`writ_examples::roles::tool_server`].
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

fn main() -> std::process::ExitCode {
    writ_examples::roles::tool_server::main()
}
