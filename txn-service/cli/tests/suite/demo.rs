//! `writ demo`, the README's first command, run as a user runs it: the real binary with
//! its built-in programs (and, with `--bin-dir`, the four example programs that
//! `cargo test --workspace` builds next to it), asserting the exit code and the chain it
//! prints.
use std::path::Path;
use std::process::Command;

use writ_tests::available;

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const PROGRAMS: [&str; 4] = ["gateway", "planner", "sub_agent", "tool_server"];

#[test]
fn the_demo_prints_the_verified_chain_and_exits_0() {
    // No cargo, no source tree: the programs are built into `writ`, which runs from a
    // directory of its own here.
    let alone = tempfile::tempdir().unwrap();
    let writ = alone.path().join("writ");
    std::fs::copy(WRIT, &writ).unwrap();
    let out = Command::new(&writ)
        .arg("demo")
        .env_remove("CARGO")
        .env_remove("CARGO_MANIFEST_DIR")
        .current_dir(alone.path())
        .output()
        .unwrap();
    assert_demo_passed(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("example programs in /"), "{stdout}");
    assert!(!stdout.contains("cargo"), "{stdout}");
}

#[test]
fn the_demo_runs_separately_built_programs_from_bin_dir() {
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
    assert_demo_passed(&out);
}

/// Exit 0, the six steps, the four hops, the chain as a tree and every check passed.
fn assert_demo_passed(out: &std::process::Output) {
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
