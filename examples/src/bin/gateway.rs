//! The demo's `gateway` program: see [`writ_examples::roles::gateway`].

fn main() -> std::process::ExitCode {
    writ_examples::roles::gateway::main()
}
