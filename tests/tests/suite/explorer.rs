//! The chain explorer page in a real headless Chromium against [`FakeApi`]: the list
//! renders, search filters, the keyboard opens a transaction, the tree shows its four
//! hops with their decisions, data with HTML in it stays text, API errors show, and a
//! live change appears after a poll. Screenshots go to `target/explorer-screenshots/`.

use std::time::Duration;

use serde_json::json;
use writ_tests::explorer::{
    Driver, FakeApi, FakeData, GATEWAY, PLANNER, SUB_AGENT, TOOL, assert_png, four_hops, refused,
    screenshot_dir,
};

const START: u64 = 1_790_000_000_000;
const XSS_SUB: &str = r#"<script>window.__xss=1</script><img src=x onerror="window.__xss=1">"#;

#[test]
fn the_page_lists_searches_opens_and_updates_in_chromium() {
    let Some(driver) = Driver::find() else {
        return;
    };
    let mut data = FakeData::new();
    // A long list: more transactions than the page shows.
    data.fill(150, START);
    data.push(refused("txn-refused-0001", "bob", START + 200_000));
    data.push(four_hops("txn-xss-0001", XSS_SUB, START + 201_000));
    data.push(four_hops(
        "2d1b6a0e-4c1f-4f7e-9a51-6c0f3e2b9d10",
        "alice",
        START + 202_000,
    ));
    let api = FakeApi::start(data);
    let screenshots = screenshot_dir();
    let result = driver.run(
        "page",
        json!({
            "url": api.base_url,
            "screenshots": screenshots,
            "expect_rows": 100,
            "newest": "2d1b6a0e-4c1f-4f7e-9a51-6c0f3e2b9d10",
            "tree_txn": "2d1b6a0e-4c1f-4f7e-9a51-6c0f3e2b9d10",
            "refused_txn": "txn-refused-0001",
            "xss_txn": "txn-xss-0001",
            "xss_sub": XSS_SUB,
            "gateway": GATEWAY,
            "planner": PLANNER,
            "sub_agent": SUB_AGENT,
            "tool": TOOL,
        }),
        Duration::from_secs(240),
    );
    let shots = result["screenshots"].as_array().unwrap();
    assert_eq!(shots.len(), 4, "{result}");
    for shot in shots {
        assert_png(std::path::Path::new(shot.as_str().unwrap()));
    }
}
