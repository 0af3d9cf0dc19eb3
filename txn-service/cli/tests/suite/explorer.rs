//! The chain explorer end to end in a real headless Chromium: `writ demo --keep` runs the
//! demo's request through gateway -> planner -> sub-agent -> tool and keeps its data dir;
//! `writ dev` restarted on that data dir serves the durable audit trail, and the page at
//! `explorer_url` (from its `dev.json`) shows the demo's transaction with its four hops
//! and their decisions. Screenshots go to `target/explorer-screenshots/demo-*.png`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use writ_tests::explorer::{Driver, assert_png, screenshot_dir};

use crate::common::WRIT;

/// The demo's kept data dir, removed on drop.
struct Kept(PathBuf);

impl Drop for Kept {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `writ dev` on a kept data dir, killed on drop.
struct KeptDev(Child);

impl Drop for KeptDev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `writ dev` on `dir` on free ports and waits for its banner's last line.
fn start_dev(dir: &Path) -> KeptDev {
    let mut child = Command::new(WRIT)
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--tts-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let dev = KeptDev(child);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("writ dev printed nothing for 60 s");
        if line.starts_with("Ctrl-C stops") {
            return dev;
        }
    }
}

#[test]
fn the_explorer_shows_the_demo_transaction_with_its_four_hops() {
    let Some(driver) = Driver::find() else {
        return;
    };
    let out = Command::new(WRIT)
        .args(["demo", "--keep"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kept = stdout
        .lines()
        .find_map(|l| l.strip_prefix("data dir kept: "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no kept data dir:\n{stdout}"));
    let _cleanup = Kept(kept.clone());
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let txn = stdout
        .lines()
        .find_map(|l| l.strip_prefix("delegation chain (txn "))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no txn in the demo's output:\n{stdout}"))
        .to_owned();

    let dev = start_dev(&kept);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(kept.join("dev.json")).unwrap()).unwrap();
    let url = state["explorer_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no explorer_url in dev.json: {state}"))
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let result = driver.run(
        "e2e",
        json!({"url": url, "txn": txn, "min_items": 5, "screenshots": screenshot_dir()}),
        Duration::from_secs(180),
    );
    let items = result["items"].as_array().unwrap();
    let hops: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|i| {
            (
                i["kind"].as_str().unwrap(),
                i["id"].as_str().unwrap(),
                i["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(hops.len(), 5, "user and four hops: {hops:?}");
    assert_eq!(hops[0].0, "user", "{hops:?}");
    assert!(hops[0].1.ends_with("alice"), "{hops:?}");
    assert_eq!(
        hops[1],
        ("workload", "spiffe://example.org/demo/gateway", "allow")
    );
    assert_eq!(
        hops[2],
        ("workload", "spiffe://example.org/demo/planner", "allow")
    );
    assert_eq!(hops[3].0, "workload", "{hops:?}");
    assert!(
        hops[3]
            .1
            .starts_with("spiffe://example.org/demo/planner/sub/summarize-"),
        "{hops:?}"
    );
    assert_eq!(hops[3].2, "allow", "{hops:?}");
    assert_eq!(
        hops[4],
        ("service", "spiffe://example.org/demo/tool-server", "allow")
    );
    let levels: Vec<u64> = items.iter().map(|i| i["level"].as_u64().unwrap()).collect();
    assert_eq!(levels, [1, 2, 3, 4, 5], "one level per hop");
    let kinds = |i: usize| -> Vec<&str> {
        items[i]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect()
    };
    assert!(kinds(1).contains(&"grant"), "{:?}", kinds(1));
    assert!(kinds(3).contains(&"spawn"), "{:?}", kinds(3));
    assert!(kinds(4).contains(&"verification"), "{:?}", kinds(4));
    for shot in result["screenshots"].as_array().unwrap() {
        assert_png(Path::new(shot.as_str().unwrap()));
    }
    drop(dev);
}
