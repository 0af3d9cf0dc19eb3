//! Every `writ bench` mode runs end to end with tiny budgets:
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

/// The stdout lines of a run that succeeded, each parsed as JSON.
fn parsed_lines(output: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "status {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The JSON lines of a successful run, each checked for the required fields.
fn json_lines(output: &Output, required: &[&str]) -> Vec<Value> {
    let lines = parsed_lines(output);
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
    // The issue's targets travel with the fresh cases.
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

/// A short `writ bench exchange --json` (at most 30 exchanges or 5 s a case) with
/// `args`; its report lines, each with every exchange field.
fn short_exchange(args: &[&str]) -> Vec<Value> {
    let mut all = vec![
        "bench",
        "exchange",
        "--json",
        "--requests",
        "30",
        "--duration",
        "5s",
    ];
    all.extend_from_slice(args);
    json_lines(&writ(&all), &EXCHANGE_FIELDS)
}

#[test]
fn exchange_from_a_separate_generator_process() {
    let lines = short_exchange(&[
        "--subject-alg",
        "es256",
        "--modes",
        "fresh,transport",
        "--clients",
        "2",
        "--separate-process",
        "--wire",
    ]);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(line["clients"], 2);
        // The lean client timed the requests (the bench checks the audit log holds
        // every exchange as granted, and nothing for the metadata requests).
        assert_eq!(line["client"], "wire");
        assert_eq!(line["protocol"], "http/1.1");
        let note = line["note"].as_str().unwrap();
        assert!(note.contains("separate load generator"), "{note}");
    }
    // The transport alone: the same bound, and the ceiling it leaves an exchange.
    let (fresh, transport) = (&lines[0], &lines[1]);
    assert_eq!(
        (fresh["mode"].as_str(), transport["mode"].as_str()),
        (Some("fresh"), Some("transport"))
    );
    assert!(fresh.get("ceiling").is_none(), "{fresh}");
    assert_eq!(transport["bound_ops_per_s"], fresh["bound_ops_per_s"]);
    let ceiling = transport["ceiling"].as_f64().unwrap();
    assert!(ceiling > 0.0 && ceiling < 1.0, "{transport}");
    let note = transport["note"].as_str().unwrap();
    assert!(note.contains(&format!("at most {ceiling:.2}")), "{note}");
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
        (
            &["bench", "overload", "--wire", "--http2"],
            &["--wire", "--http2", "cannot be used with"],
        ),
        (
            &["bench", "exchange", "--modes", "transport"],
            &["transport", "needs --wire"],
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

/// The lines of a run, each with `bench`, `mode`, a throughput and its latencies;
/// `bound_ops_per_s` and `ratio` where the mode holds the case to a bound.
fn report_lines(output: &Output, bench: &str) -> Vec<Value> {
    let lines = parsed_lines(output);
    for line in &lines {
        assert_eq!(line["bench"], bench, "{line}");
        assert!(line["ops_per_s"].as_f64().unwrap() > 0.0, "{line}");
        for key in ["mode", "p50_ms", "p99_ms", "p999_ms", "seconds", "ops"] {
            assert!(line.get(key).is_some(), "{key} missing from {line}");
        }
        if let Some(bound) = line.get("bound_ops_per_s") {
            assert!(bound.as_f64().unwrap() > 0.0, "{line}");
            assert!(line["ratio"].as_f64().is_some(), "{line}");
        }
    }
    lines
}

fn modes(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let alg = l.get("subject_alg").and_then(Value::as_str);
            match alg {
                Some(alg) => format!("{} {alg}", l["mode"].as_str().unwrap()),
                None => l["mode"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

#[test]
fn verify_issue_and_handshake_report_their_cases_against_their_bounds() {
    let small = ["--json", "--requests", "40", "--duration", "3s"];
    let run = |mode: &[&str]| writ(&[&["bench"][..], mode, &small[..]].concat());

    let lines = report_lines(&run(&["verify"]), "verify");
    assert_eq!(modes(&lines), ["uncached ES256", "cached ES256"]);
    assert!(lines.iter().all(|l| l["target_ratio"].as_f64().is_some()));
    let lines = report_lines(&run(&["verify", "--alg", "eddsa"]), "verify");
    assert_eq!(modes(&lines), ["uncached EdDSA", "cached EdDSA"]);
    // The deepest chain the SDK accepts, and a larger token: still verified (the bench
    // checks every verification), and the note says the token's shape.
    let args = ["verify", "--chain-depth", "16", "--tctx-bytes", "4096"];
    let lines = report_lines(&run(&args), "verify");
    let note = lines[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("act chain depth 16, tctx 4096 bytes"),
        "{note}"
    );
    let bytes: usize = note
        .strip_prefix("token ")
        .and_then(|n| n.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(bytes > 4096 * 4 / 3, "{note}");

    let lines = report_lines(&run(&["issue"]), "issue");
    assert_eq!(modes(&lines), ["x509", "jwt ES256"]);
    assert!(lines.iter().all(|l| l["ratio"].as_f64().is_some()));

    let lines = report_lines(&run(&["handshake", "--clients", "2"]), "handshake");
    let mut names = modes(&lines);
    names.sort();
    assert_eq!(names, ["rustls", "writ"]);
    let writ_line = lines.iter().find(|l| l["mode"] == "writ").unwrap();
    assert_eq!(writ_line["target_ratio"], 0.8);
    assert!(writ_line["ratio"].as_f64().is_some(), "{writ_line}");
}

#[test]
fn exchange_with_eddsa_txn_tokens() {
    let lines = short_exchange(&[
        "--subject-alg",
        "eddsa",
        "--modes",
        "fresh",
        "--clients",
        "2",
        "--txn-alg",
        "eddsa",
    ]);
    assert_eq!(modes(&lines), ["fresh EdDSA"]);
    assert_eq!(lines[0]["protocol"], "http/1.1");
}

/// Over one HTTP/2 connection, with every grant also a row of the durable audit chain
/// (the bench fails unless the chain holds one row per exchange).
#[test]
fn exchange_over_http2_with_the_durable_audit_trail() {
    let lines = short_exchange(&[
        "--subject-alg",
        "es256",
        "--modes",
        "fresh,repeated",
        "--clients",
        "4",
        "--http2",
        "--durable-audit",
    ]);
    assert_eq!(modes(&lines), ["fresh ES256", "repeated ES256"]);
    for line in &lines {
        assert_eq!(line["protocol"], "h2", "{line}");
    }
}

/// `writ bench overload` against a tiny limit (one slot, no queue, 16 connections) with
/// `extra` arguments; its `10x` report.
fn overload_with_a_tiny_limit(extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "overload",
        "--json",
        "--requests",
        "60",
        "--duration",
        "2s",
        "--max-in-flight",
        "1",
        "--max-queue",
        "0",
        "--connections",
        "16",
    ];
    args.extend_from_slice(extra);
    let lines = report_lines(&writ(&args), "overload");
    assert_eq!(modes(&lines), ["peak", "0.5x", "10x"]);
    let ten = lines[2].clone();
    assert!(ten["ratio"].as_f64().is_some(), "{ten}");
    ten
}

#[test]
fn overload_sheds_beyond_a_tiny_limit_and_reports_admitted_latency() {
    let ten = overload_with_a_tiny_limit(&[]);
    assert!(ten.get("refused").is_some(), "{ten}");
    assert_eq!(ten["client"], "sdk");
}

#[test]
fn overload_over_http2_is_shed() {
    let ten = overload_with_a_tiny_limit(&["--http2"]);
    assert_eq!(ten["protocol"], "h2");
    // Sixteen streams outstanding against one slot and no queue: most are refused.
    assert!(ten["refused"].as_u64().unwrap_or(0) > 0, "{ten}");
}

#[test]
fn overload_from_a_separate_generator_process_is_shed() {
    let ten = overload_with_a_tiny_limit(&["--separate-process", "--wire"]);
    // Sixteen requests outstanding against one slot and no queue: most are refused, and
    // the lean client tells a shed from a grant.
    assert!(ten["refused"].as_u64().unwrap_or(0) > 0, "{ten}");
    assert!(ten["ops"].as_u64().unwrap_or(0) > 0, "{ten}");
    assert_eq!(ten["client"], "wire");
    let note = ten["note"].as_str().unwrap_or_default();
    assert!(note.contains("separate process"), "{note}");
    // Every answer, shed or granted, held against Little's law.
    assert!(note.contains("every answer"), "{note}");
    assert!(note.contains("connections / answer rate"), "{note}");
}
