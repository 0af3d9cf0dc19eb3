//! The four programs of `writ demo`, as library modules: each `main` parses the process's
//! arguments and runs the role. The binaries in `src/bin/` call them, and so does the
//! `writ` binary itself when it is started under a role's name (`writ demo` stages copies
//! of itself named `gateway`, `planner`, `sub_agent` and `tool_server`, so that each
//! role has its own path to attest and the demo needs no other program).

pub mod gateway;
pub mod planner;
pub mod sub_agent;
pub mod tool_server;

/// A role's entry point.
pub type RoleMain = fn() -> std::process::ExitCode;

/// Each role's program name and entry point.
pub const ALL: [(&str, RoleMain); 4] = [
    ("gateway", gateway::main),
    ("planner", planner::main),
    ("sub_agent", sub_agent::main),
    ("tool_server", tool_server::main),
];
