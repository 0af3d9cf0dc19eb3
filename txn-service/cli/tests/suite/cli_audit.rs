//! `writ audit`: the real binary names an edited or removed row of the hash chain, and
//! prints a transaction as its delegation tree.

use std::path::Path;
use std::process::Command;

use writ_identity::store::Store;
use writ_identity::store::audit::AuditEvent;
use writ_identity::store::sqlite::SqliteStore;

use crate::common::WRIT;

const GW: &str = "spiffe://example.org/demo/gateway";
const PLANNER: &str = "spiffe://example.org/demo/planner";

fn event(kind: &str, caller: &str, act: &[&str], at_ms: i64) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: kind.into(),
        decision: "allow".into(),
        txn: "txn-cli".into(),
        sub: "alice".into(),
        caller: caller.into(),
        service: String::new(),
        lease: String::new(),
        record: serde_json::json!({"act": act, "granted_scope": "orders.read"}).to_string(),
    }
}

/// A store with five chained rows.
async fn store_with_rows(path: &Path) {
    let store = SqliteStore::open(path).await.unwrap();
    store
        .append_audit(&[
            event("grant", GW, &[], 1_790_000_000_000),
            event("replacement", PLANNER, &[PLANNER, GW], 1_790_000_000_100),
        ])
        .await
        .unwrap();
    for i in 0..3 {
        store
            .append_audit(&[event("grant", GW, &[], 1_790_000_001_000 + i)])
            .await
            .unwrap();
    }
    store.close().await;
}

fn writ_audit(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(WRIT).arg("audit").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sqlite3(db: &Path, sql: &str) -> bool {
    Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn verify_names_an_edited_or_removed_row() {
    if !writ_tests::env::available(
        "sqlite3",
        Command::new("sqlite3").arg("-version").output().is_ok(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("datastore.sqlite3");
    store_with_rows(&original).await;
    let path = |name: &str| dir.path().join(name);
    let (ok, out, err) = writ_audit(&["verify", "--datastore", original.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("audit chain intact: 5 rows"), "{out}");

    let tamper: [(&str, &str, &str); 5] = [
        (
            "edited",
            "UPDATE audit_events SET sub = 'mallory' WHERE seq = 3",
            "row 3 was edited",
        ),
        (
            "middle",
            "DELETE FROM audit_events WHERE seq = 2",
            "row 2 was removed",
        ),
        (
            "first",
            "DELETE FROM audit_events WHERE seq = 1",
            "row 1 was removed",
        ),
        (
            "head",
            "DELETE FROM audit_events WHERE seq = 5",
            "row 5 was removed",
        ),
        (
            "scope",
            "UPDATE audit_events SET record = replace(record, 'orders.read', 'orders.write') WHERE seq = 4",
            "row 4 was edited",
        ),
    ];
    for (name, sql, expected) in tamper {
        let copy = path(&format!("{name}.sqlite3"));
        assert!(
            sqlite3(&original, &format!(".backup '{}'", copy.display())),
            "{name}: backup"
        );
        assert!(sqlite3(&copy, sql), "{name}: {sql}");
        let (ok, out, err) = writ_audit(&["verify", "--datastore", copy.to_str().unwrap()]);
        assert!(!ok, "{name}: verify must fail: {out}");
        assert!(err.contains(expected), "{name}: {err}");
        let (_, json, _) = writ_audit(&["verify", "--json", "--datastore", copy.to_str().unwrap()]);
        assert!(json.contains("\"ok\":false"), "{name}: {json}");
    }

    // Retention: the pruned prefix is accepted, a removal after it is not.
    let pruned = path("pruned.sqlite3");
    assert!(sqlite3(
        &original,
        &format!(".backup '{}'", pruned.display())
    ));
    let store = SqliteStore::open(&pruned).await.unwrap();
    assert_eq!(store.prune_audit(1_790_000_000_500).await.unwrap(), 2);
    store.close().await;
    let (ok, out, err) = writ_audit(&["verify", "--datastore", pruned.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("3 rows, seq 3..5 (2 pruned"), "{out}");
    assert!(sqlite3(&pruned, "DELETE FROM audit_events WHERE seq = 3"));
    let (ok, _, err) = writ_audit(&["verify", "--datastore", pruned.to_str().unwrap()]);
    assert!(!ok && err.contains("row 3 was removed"), "{err}");
}

#[tokio::test]
async fn txn_prints_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    store_with_rows(&dir.path().join("datastore.sqlite3")).await;
    let data_dir = dir.path().to_str().unwrap();
    let (ok, out, err) = writ_audit(&["txn", "txn-cli", "--data-dir", data_dir]);
    assert!(ok, "{err}");
    assert!(out.contains("user user:alice"), "{out}");
    assert!(out.contains(&format!("  workload {GW}")), "{out}");
    assert!(out.contains(&format!("    workload {PLANNER}")), "{out}");
    assert!(out.contains("replacement allow"), "{out}");
    let (ok, json, _) = writ_audit(&["txn", "txn-cli", "--json", "--data-dir", data_dir]);
    assert!(ok);
    let tree: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(tree["root"]["children"][0]["children"][0]["id"], PLANNER);
    let (ok, _, err) = writ_audit(&["txn", "nope", "--data-dir", data_dir]);
    assert!(!ok && err.contains("no transaction"), "{err}");
    let (ok, _, _) = writ_audit(&["txn", "bad\u{1}id", "--data-dir", data_dir]);
    assert!(!ok);
    let (ok, out, _) = writ_audit(&["list", "--sub", "alice", "--data-dir", data_dir]);
    assert!(ok && out.contains("txn-cli"), "{out}");
    let (ok, _, err) = writ_audit(&["verify"]);
    assert!(!ok && err.contains("name the store"), "{err}");
}
