//! The demo's `sub_agent` program: see [`writ_examples::roles::sub_agent`].

fn main() -> std::process::ExitCode {
    writ_examples::roles::sub_agent::main()
}
