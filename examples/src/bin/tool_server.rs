//! The demo's `tool_server` program: see [`writ_examples::roles::tool_server`].

fn main() -> std::process::ExitCode {
    writ_examples::roles::tool_server::main()
}
