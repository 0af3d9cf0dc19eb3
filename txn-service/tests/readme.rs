//! The README cannot drift from the CLI: its two quick-start commands are the ones the
//! project runs, and every `writ ...` command it shows exists (`--help` succeeds for its
//! subcommand path).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const WRIT: &str = env!("CARGO_BIN_EXE_writ");

fn workspace_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The bodies of the ```sh blocks, with `\` continuations joined.
fn shell_lines(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = line.split(" #").next().unwrap_or("").trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
        } else {
            pending.push_str(code);
            out.push(std::mem::take(&mut pending));
        }
    }
    out
}

/// Every `writ` invocation in a shell line, as its subcommand path (`["entry", "create"]`).
fn commands(line: &str) -> Vec<Vec<String>> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let mut found = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let token = token.trim_start_matches("$(").trim_start_matches('"');
        if token != "writ" && !token.ends_with("/writ") {
            continue;
        }
        let path: Vec<String> = tokens[i + 1..]
            .iter()
            .skip_while(|t| **t == "--") // `cargo run --bin writ -- demo`
            .take_while(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !t.starts_with('-')
            })
            .map(|t| (*t).to_owned())
            .collect();
        found.push(path);
    }
    found
}

#[test]
fn the_quick_start_is_the_demo_and_the_test_command_ci_runs() {
    let readme = workspace_file("README.md");
    let lines = shell_lines(&readme);
    assert_eq!(lines[0], "cargo run --release --bin writ -- demo");
    assert_eq!(lines[1], "cargo test --workspace");
    let ci = workspace_file(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "cargo test --workspace"),
        ".ci/run runs the README's test command"
    );
}

#[test]
fn every_writ_command_in_the_readme_and_guides_exists() {
    let mut paths = BTreeSet::new();
    for doc in [
        "README.md",
        "docs/dev.md",
        "docs/subagents.md",
        "docs/txn.md",
    ] {
        for line in shell_lines(&workspace_file(doc)) {
            for path in commands(&line) {
                paths.insert((doc, path));
            }
        }
    }
    let distinct: BTreeSet<&Vec<String>> = paths.iter().map(|(_, p)| p).collect();
    assert!(distinct.len() >= 20, "found only {distinct:?}");
    for needed in [
        vec!["demo"],
        vec!["dev"],
        vec!["dev", "login"],
        vec!["entry", "create"],
        vec!["exchange"],
        vec!["api", "spawn"],
    ] {
        let needed: Vec<String> = needed.iter().map(|s| (*s).to_owned()).collect();
        assert!(
            distinct.contains(&needed),
            "the README shows `writ {}`",
            needed.join(" ")
        );
    }
    for (doc, path) in &paths {
        let out = Command::new(WRIT)
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{doc}: `writ {} --help` failed: {}",
            path.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check can fail: an unknown subcommand's --help is refused.
    let out = Command::new(WRIT)
        .args(["entry", "frobnicate", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
