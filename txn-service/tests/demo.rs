//! `writ demo`, the README's first command, run as a user runs it: the real binary and
//! the four example programs (built next to it by `cargo test --workspace`), asserting the
//! exit code and the chain it prints.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

use std::path::Path;
use std::process::Command;

use writ_tests::available;

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const PROGRAMS: [&str; 4] = ["gateway", "planner", "sub_agent", "tool_server"];

#[test]
fn the_demo_prints_the_verified_chain_and_exits_0() {
    let bin_dir = Path::new(WRIT).parent().unwrap();
    let built = PROGRAMS.iter().all(|p| bin_dir.join(p).is_file());
    if !available(
        "the example programs (`cargo test --workspace` or `cargo build -p writ-examples` builds them)",
        built,
    ) {
        return;
    }
    let out = Command::new(WRIT)
        .args(["demo", "--bin-dir"])
        .arg(bin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Progress while it builds up, then every hop, then the chain as a tree.
    for step in 1..=6 {
        assert!(stdout.contains(&format!("[{step}/6]")), "{stdout}");
    }
    for hop in 1..=4 {
        assert!(stdout.contains(&format!("hop {hop} ")), "{stdout}");
    }
    let lines: Vec<&str> = stdout.lines().collect();
    let tree = lines
        .iter()
        .position(|l| l.starts_with("delegation chain (txn "))
        .expect("a chain header");
    assert!(
        lines[tree].contains("user alice, scope \"docs.read\""),
        "{}",
        lines[tree]
    );
    assert_eq!(lines[tree + 1], "alice");
    assert_eq!(lines[tree + 2], "└── spiffe://example.org/demo/gateway");
    assert_eq!(lines[tree + 3], "    └── spiffe://example.org/demo/planner");
    assert!(
        lines[tree + 4].starts_with("        └── spiffe://example.org/demo/planner/sub/summarize-"),
        "{}",
        lines[tree + 4]
    );
    assert_eq!(
        lines[tree + 5],
        "            └── tool: spiffe://example.org/demo/tool-server"
    );
    assert!(stdout.contains("11 checks passed of 11"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert_eq!(
        lines.last().copied(),
        Some("demo: the delegation chain verified end to end")
    );
}

#[test]
fn missing_programs_are_named_with_how_to_build_them() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(WRIT)
        .args(["demo", "--bin-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cargo build --release -p writ-examples"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}
