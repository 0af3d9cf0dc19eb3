//! The README and the guides cannot drift from the CLI: the two quick-start commands are
//! the ones the project runs; every `writ ...` command in a shell block of README.md and
//! docs/*.md exists with the flags it shows; the files the README hands to `openssl`
//! are the ones `writ api fetch x509 --write` makes (the command is run for real); no
//! doc tells users to skip TLS verification (`curl -k`) or to open the node API to the
//! network in a one-machine recipe.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use writ_tests::env::workspace_root;

use crate::common::{Server, WRIT, start_agent, uid};

fn workspace_file(name: &str) -> String {
    let path = workspace_root().join(name);
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
        if token != "writ" && !token.ends_with("/writ") || after_namespace_flag(&tokens, i) {
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
    for doc in docs() {
        let doc: &str = Box::leak(doc.into_boxed_str());
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

/// README.md and every docs/*.md.
fn docs() -> Vec<String> {
    let dir = workspace_root().join("docs");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    out.sort();
    out.insert(0, "README.md".to_owned());
    out
}

/// Every `writ` invocation in a shell line: its subcommand path and the `--flags` it
/// passes (up to a `--`, a pipe, `;`, `&&` or the end of a `$(...)`).
fn invocations(line: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let mut found = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let token = token.trim_start_matches("$(").trim_start_matches('"');
        // `cargo build --bin writ --bin other`: a build target, not a command.
        if token != "writ" || after_namespace_flag(&tokens, i) || i > 0 && tokens[i - 1] == "--bin"
        {
            continue;
        }
        let rest = &tokens[i + 1..];
        let path: Vec<String> = rest
            .iter()
            .take_while(|t| {
                !t.is_empty()
                    && !t.starts_with('-')
                    && t.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
            .map(|t| (*t).to_owned())
            .collect();
        let flags: Vec<String> = rest
            .iter()
            .take_while(|t| !matches!(**t, "--" | "|" | ";" | "&&" | "&" | "||" | ">" | "<"))
            .take_while(|t| !t.contains(')') && !t.contains('`'))
            .filter(|t| t.starts_with("--") && t.len() > 2)
            .map(|t| t.split('=').next().unwrap().to_owned())
            .collect();
        found.push((path, flags));
    }
    found
}

#[test]
fn every_flag_the_docs_pass_to_writ_exists() {
    let mut checked = 0;
    for doc in docs() {
        for line in shell_lines(&workspace_file(&doc)) {
            for (path, flags) in invocations(&line) {
                if flags.is_empty() {
                    continue;
                }
                let out = Command::new(WRIT)
                    .args(&path)
                    .arg("--help")
                    .output()
                    .unwrap();
                let help = String::from_utf8_lossy(&out.stdout);
                for flag in &flags {
                    assert!(
                        help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                        "{doc}: `writ {}` has no flag {flag} (line: {line})",
                        path.join(" ")
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 40, "checked only {checked} flags");
}

/// What in `text` turns off server verification: curl's `-k`/`--insecure` (alone or
/// in a cluster such as `-sSk`), Python's `verify=False`, `CERT_NONE` or
/// `check_hostname = False`, Node's `rejectUnauthorized: false` or
/// `NODE_TLS_REJECT_UNAUTHORIZED`.
fn skips_tls_checks(text: &str) -> Option<String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    for bad in [
        "verify=False",
        "CERT_NONE",
        "check_hostname=False",
        "rejectUnauthorized:false",
        "NODE_TLS_REJECT_UNAUTHORIZED",
        "InsecureSkipVerify",
    ] {
        if compact.contains(bad) {
            return Some(bad.to_owned());
        }
    }
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        for (i, token) in tokens.iter().enumerate() {
            if !token
                .trim_matches(|c| c == '`' || c == '"' || c == '(')
                .ends_with("curl")
            {
                continue;
            }
            for flag in tokens.iter().skip(i + 1) {
                let flag = flag.trim_matches(|c| c == '`' || c == '"');
                let short = flag.starts_with('-') && !flag.starts_with("--");
                if flag == "--insecure" || short && flag.contains('k') {
                    return Some(format!("curl {flag}"));
                }
            }
        }
    }
    None
}

/// Every text file under `examples/` (manifests, configs, recipes, their READMEs).
fn example_files() -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "node_modules" && name != "target" && name != "__pycache__" {
                    walk(&path, out);
                }
            } else if std::fs::read_to_string(&path).is_ok() {
                out.push(path);
            }
        }
    }
    let root = workspace_root();
    let mut paths = Vec::new();
    walk(&root.join("examples"), &mut paths);
    let mut out: Vec<String> = paths
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    out.sort();
    out
}

#[test]
fn no_doc_example_or_manifest_turns_off_server_verification() {
    let files: Vec<String> = docs().into_iter().chain(example_files()).collect();
    assert!(
        files.iter().any(|f| f.ends_with("kubernetes/txn.yaml")),
        "the walk reaches the manifests: {files:?}"
    );
    for file in &files {
        if let Some(bad) = skips_tls_checks(&workspace_file(file)) {
            panic!("{file} turns off server verification: `{bad}`");
        }
    }
    // The check can fail.
    for bad in [
        "curl -sSk https://x",
        "curl --insecure https://x",
        "`curl -k`",
        "requests.post(url, verify=False)",
        "ctx.verify_mode = ssl.CERT_NONE",
        "ctx.check_hostname = False",
        "https.request({ rejectUnauthorized: false })",
        "NODE_TLS_REJECT_UNAUTHORIZED=0 node gw.js",
    ] {
        assert!(skips_tls_checks(bad).is_some(), "{bad}");
    }
    for fine in [
        "curl -sS --cacert bundle.pem https://x",
        "curl --fail-with-body -H 'k: v' https://x",
    ] {
        assert_eq!(skips_tls_checks(fine), None, "{fine}");
    }
}

#[test]
fn no_doc_skips_tls_checks_or_opens_the_node_api_in_a_one_machine_recipe() {
    for doc in docs() {
        let text = workspace_file(&doc);
        for bad in ["curl -k", "curl --insecure", "curl -sk", "curl -ks"] {
            assert!(!text.contains(bad), "{doc} tells users `{bad}`");
        }
        for line in shell_lines(&text) {
            for (path, flags) in invocations(&line) {
                if path != ["server", "run"] || flags.iter().any(|f| f == "--config") {
                    continue; // a config file says where it binds
                }
                let bind = line
                    .split_whitespace()
                    .skip_while(|t| *t != "--bind-address")
                    .nth(1)
                    .unwrap_or_else(|| {
                        panic!("{doc}: `{line}` leaves the node API on 0.0.0.0:8081")
                    });
                assert!(
                    bind.starts_with("127.") || bind.starts_with("[::1]") || bind == "\"\"",
                    "{doc}: `{line}` binds the node API on {bind}"
                );
            }
        }
    }
}

/// The README's `openssl verify` names the files `writ api fetch x509 --write` makes:
/// the commands run for real, the verify included.
#[test]
fn the_readme_openssl_verify_runs_on_what_writ_writes() {
    let readme = workspace_file("README.md");
    let lines = shell_lines(&readme);
    let write_dir = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("writ api fetch x509 --write ")
                .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
        })
        .expect("the README shows `writ api fetch x509 --write DIR`");
    let verify = lines
        .iter()
        .find(|l| l.starts_with("openssl verify"))
        .expect("the README shows `openssl verify`");

    let server = Server::start();
    let (_agent, socket, agent_id) = start_agent(&server);
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/me",
        "--parent-id",
        &agent_id,
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
    let cwd = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(WRIT)
            .current_dir(cwd.path())
            .args(["api", "fetch", "x509", "--write", &write_dir])
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", socket.display()),
            )
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "no SVID");
        std::thread::sleep(Duration::from_millis(100));
    }
    let args: Vec<&str> = verify.split_whitespace().skip(1).collect();
    let out = Command::new("openssl")
        .current_dir(cwd.path())
        .args(&args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "README `{verify}`: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kubectl -n writ ...`: `writ` there is a namespace, not the command.
fn after_namespace_flag(tokens: &[&str], i: usize) -> bool {
    i > 0 && matches!(tokens[i - 1], "-n" | "--namespace")
}
