//! `writ bench exchange` and `writ bench workload-api` run end to end with tiny budgets:
//! every `--json` line parses and carries the fields a script holds a figure by. No
//! assertion on the figures themselves (benches are judged by hand, in release builds).

use std::process::{Command, Output};

use serde_json::Value;

use crate::common::WRIT;

fn writ(args: &[&str]) -> Output {
    Command::new(WRIT)
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap()
}

/// The JSON lines of a successful run, each checked for the required fields.
fn json_lines(output: &Output, required: &[&str]) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "status {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no report line");
    for line in &lines {
        for key in required {
            assert!(line.get(*key).is_some(), "{key} missing from {line}");
        }
        assert!(line["ops_per_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["bound_ops_per_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["ratio"].as_f64().is_some(), "{line}");
        assert!(line["p50_ms"].as_f64().is_some(), "{line}");
    }
    lines
}

const EXCHANGE_FIELDS: [&str; 9] = [
    "bench",
    "mode",
    "subject_alg",
    "ops_per_s",
    "p50_ms",
    "p99_ms",
    "bound_ops_per_s",
    "ratio",
    "cpu_us_per_op",
];

#[test]
fn exchange_reports_every_algorithm_and_mode() {
    let output = writ(&[
        "bench",
        "exchange",
        "--json",
        "--requests",
        "50",
        "--duration",
        "5s",
        "--subject-alg",
        "all",
    ]);
    let lines = json_lines(&output, &EXCHANGE_FIELDS);
    let mut cases: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["bench"], "exchange");
            (
                l["subject_alg"].as_str().unwrap().to_owned(),
                l["mode"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    cases.sort();
    let mut expected = Vec::new();
    for alg in ["ES256", "EdDSA", "RS256"] {
        for mode in ["fresh", "half-peak", "repeated"] {
            expected.push((alg.to_owned(), mode.to_owned()));
        }
    }
    assert_eq!(cases, expected);
    // The targets travel with the fresh cases.
    for l in &lines {
        if l["mode"] == "fresh" {
            let target = if l["subject_alg"] == "RS256" {
                0.5
            } else {
                0.7
            };
            assert_eq!(l["target_ratio"].as_f64(), Some(target), "{l}");
        }
    }
}

#[test]
fn exchange_from_a_separate_generator_process() {
    let output = writ(&[
        "bench",
        "exchange",
        "--json",
        "--requests",
        "30",
        "--duration",
        "5s",
        "--subject-alg",
        "es256",
        "--modes",
        "fresh",
        "--clients",
        "2",
        "--separate-process",
    ]);
    let lines = json_lines(&output, &EXCHANGE_FIELDS);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["clients"], 2);
    let note = lines[0]["note"].as_str().unwrap();
    assert!(note.contains("separate load generator"), "{note}");
}

#[test]
fn workload_api_reports_every_mode() {
    let output = writ(&["bench", "workload-api", "--json", "--requests", "50"]);
    let lines = json_lines(
        &output,
        &[
            "bench",
            "mode",
            "ops_per_s",
            "p50_ms",
            "p99_ms",
            "bound_ops_per_s",
            "ratio",
        ],
    );
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(
        modes,
        ["x509", "jwt-cached", "jwt-bundles", "jwt-fresh", "validate"]
    );
    assert!(lines.iter().all(|l| l["bench"] == "workload-api"));
}

#[test]
fn garbage_arguments_are_refused_clearly() {
    for (args, words) in [
        (
            &["bench", "exchange", "--clients", "0"][..],
            &["--clients", "0"][..],
        ),
        (
            &["bench", "exchange", "--subject-alg", "rs512"],
            &["rs512", "rs256", "es256", "eddsa"],
        ),
        (
            &["bench", "exchange", "--modes", "fresh,sometimes"],
            &["sometimes", "repeated"],
        ),
        (
            &["bench", "workload-api", "--clients", "100000"],
            &["--clients", "100000"],
        ),
    ] {
        let output = writ(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        for word in words {
            assert!(stderr.contains(word), "{args:?}: {word} not in\n{stderr}");
        }
    }
}
