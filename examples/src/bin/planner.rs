//! The demo's `planner` program: see [`writ_examples::roles::planner`].

fn main() -> std::process::ExitCode {
    writ_examples::roles::planner::main()
}
