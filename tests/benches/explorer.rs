//! Explorer page load in a real headless Chromium with 10,000 transactions behind the
//! API (the harness's `FakeApi`, so the figure is the page's own cost: fetch, JSON,
//! rendering): time from navigation to the list rendered, from opening a transaction to
//! its tree rendered, and from a search to its list rendered.
//!
//! `cargo bench -p writ-tests --bench explorer` (skips with a message without Chromium,
//! node or npm).
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "bench code: a failed setup step should abort loudly"
)]

use std::time::Duration;

use serde_json::{Value, json};
use writ_tests::explorer::{Driver, FakeApi, FakeData};

const TRANSACTIONS: usize = 10_000;
const RUNS: u64 = 20;

fn main() {
    let Some(driver) = Driver::find() else {
        return;
    };
    let mut data = FakeData::new();
    data.fill(TRANSACTIONS, 1_790_000_000_000);
    let api = FakeApi::start(data);
    let result = driver.run(
        "bench",
        json!({
            "url": format!("{}/explorer", api.base_url),
            "runs": RUNS,
            "expect_rows": 100,
            "txn": "filler-05000",
            "query": "user-0999",
        }),
        Duration::from_secs(600),
    );
    println!(
        "explorer page, {TRANSACTIONS} transactions behind the API, {RUNS} runs in {}",
        result["browser"].as_str().unwrap_or("Chromium")
    );
    let line = |what: &str, s: &Value| {
        println!(
            "  {what:<34} median {:>7.1} ms  p90 {:>7.1} ms  min {:>7.1} ms  max {:>7.1} ms",
            s["median"].as_f64().unwrap(),
            s["p90"].as_f64().unwrap(),
            s["min"].as_f64().unwrap(),
            s["max"].as_f64().unwrap()
        );
    };
    line("navigation -> list (100 rows)", &result["list_ms"]);
    line("  of which the API answering", &result["list_api_ms"]);
    line("open -> tree rendered", &result["tree_ms"]);
    line("search (10 hits) -> list rendered", &result["search_ms"]);
    line("  of which the API answering", &result["search_api_ms"]);
}
