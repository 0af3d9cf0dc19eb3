//! A transaction as its delegation tree: the user at the root, each workload under the
//! one it acts for (the `act` chain reversed), sub-agents under the parent that spawned
//! them, and the services that verified a caller's token under that caller. The
//! explorer API (`GET /explorer/api/txns/{txn}`) and `writ audit txn` share it.
//!
//! ```
//! use writ_identity::store::audit::{AuditEvent, AuditRow, GENESIS_HASH};
//! use writ_txn_service::audit::tree::TxnTree;
//! let row = AuditRow::chain(1, GENESIS_HASH, AuditEvent {
//!     at_ms: 1_790_000_000_000, kind: "grant".into(), decision: "allow".into(),
//!     txn: "t1".into(), sub: "alice".into(), caller: "spiffe://example.org/gateway".into(),
//!     record: r#"{"granted_scope":"orders.read","act":[]}"#.into(), ..AuditEvent::default()
//! });
//! let tree = TxnTree::build(&[row]).unwrap();
//! assert_eq!(tree.root.children[0].id, "spiffe://example.org/gateway");
//! assert!(tree.to_text().contains("grant allow"));
//! ```

use serde::Serialize;
use serde_json::Value;
use writ_identity::store::audit::AuditRow;

/// The transaction (`writ audit txn TXN --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct TxnTree {
    /// The transaction id.
    pub txn: String,
    /// The user.
    pub sub: String,
    /// First event, Unix milliseconds.
    pub started_ms: i64,
    /// Last event, Unix milliseconds.
    pub last_ms: i64,
    /// The user's node.
    pub root: Node,
}

/// One party of the transaction.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// `user:<sub>` or a SPIFFE ID.
    pub id: String,
    /// `user`, `workload` or `service`.
    pub kind: &'static str,
    /// What happened at this node, in sequence order.
    pub events: Vec<Event>,
    /// The parties acting for (or verifying) this one.
    pub children: Vec<Node>,
}

/// One decision, as the explorer shows it (optional fields omitted when absent).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// The audit sequence number.
    pub seq: u64,
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// `grant`, `replacement`, `refusal`, `spawn` or `verification`.
    pub kind: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// RFC 6749 error code (refusal) or verification error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Granted (or, refused, requested) scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The calling workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The verifying service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The verified route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A sub-agent's lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// A sub-agent's parent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Verification latency, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Lifetime of the issued token, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    /// W3C trace context of the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

fn text(record: &Value, key: &str) -> Option<String> {
    record
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn list(record: &Value, key: &str) -> Vec<String> {
    record
        .get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl Event {
    fn from_row(row: &AuditRow, record: &Value) -> Self {
        let e = &row.event;
        let scope = match e.kind.as_str() {
            "refusal" => text(record, "requested_scope"),
            _ => text(record, "granted_scope"),
        };
        Self {
            seq: row.seq,
            at_ms: e.at_ms,
            kind: e.kind.clone(),
            decision: e.decision.clone(),
            error: text(record, "error"),
            reason: text(record, "reason"),
            scope,
            caller: non_empty(&e.caller),
            service: non_empty(&e.service),
            route: text(record, "route"),
            lease: non_empty(&e.lease),
            parent: text(record, "parent"),
            latency_us: record.get("latency_us").and_then(Value::as_u64),
            expires_in: record.get("expires_in").and_then(Value::as_i64),
            traceparent: text(record, "traceparent"),
        }
    }
}

impl Node {
    fn new(id: &str, kind: &'static str) -> Self {
        Self {
            id: id.to_owned(),
            kind,
            events: Vec::new(),
            children: Vec::new(),
        }
    }

    /// The child `id`, created (as `kind`) if missing.
    #[expect(
        clippy::indexing_slicing,
        reason = "the index was just found or pushed"
    )]
    fn child(&mut self, id: &str, kind: &'static str) -> &mut Node {
        let at = match self.children.iter().position(|c| c.id == id) {
            Some(at) => at,
            None => {
                self.children.push(Node::new(id, kind));
                self.children.len() - 1
            }
        };
        &mut self.children[at]
    }

    /// The path (child positions) to the first workload node `id`, depth first.
    fn find(&self, id: &str) -> Option<Vec<usize>> {
        for (i, c) in self.children.iter().enumerate() {
            if c.id == id && c.kind == "workload" {
                return Some(vec![i]);
            }
            if let Some(mut rest) = c.find(id) {
                rest.insert(0, i);
                return Some(rest);
            }
        }
        None
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "paths come from `find` on this tree"
    )]
    fn at_path(&mut self, path: &[usize]) -> &mut Node {
        let mut node = self;
        for &i in path {
            node = &mut node.children[i];
        }
        node
    }

    /// The workload node at the end of `chain` (outermost first), created as needed.
    fn walk(&mut self, chain: &[String]) -> &mut Node {
        let mut node = self;
        for id in chain {
            node = node.child(id, "workload");
        }
        node
    }

    /// The workload node `id` wherever it is, or a new one under the root.
    fn workload(&mut self, id: &str) -> &mut Node {
        match self.find(id) {
            Some(path) => self.at_path(&path),
            None => self.child(id, "workload"),
        }
    }
}

impl TxnTree {
    /// The tree of `rows` (one transaction's rows, in sequence order); `None` when there
    /// are none.
    pub fn build(rows: &[AuditRow]) -> Option<Self> {
        let first = rows.first()?;
        let sub = rows
            .iter()
            .map(|r| r.event.sub.as_str())
            .find(|s| !s.is_empty())
            .unwrap_or_default()
            .to_owned();
        let mut root = Node::new(&format!("user:{sub}"), "user");
        for row in rows {
            let record: Value = serde_json::from_str(&row.event.record).unwrap_or(Value::Null);
            let event = Event::from_row(row, &record);
            let e = &row.event;
            match e.kind.as_str() {
                "grant" | "replacement" => {
                    let mut chain = list(&record, "act");
                    chain.reverse();
                    if chain.is_empty() {
                        chain.push(e.caller.clone());
                    }
                    root.walk(&chain).events.push(event);
                }
                "spawn" => {
                    let parent = text(&record, "parent").unwrap_or_default();
                    let node = if root.find(&e.caller).is_some() || parent.is_empty() {
                        root.workload(&e.caller)
                    } else {
                        root.workload(&parent).child(&e.caller, "workload")
                    };
                    node.events.push(event);
                }
                "verification" => {
                    let mut chain = list(&record, "act");
                    chain.reverse();
                    let caller_node = if chain.is_empty() {
                        root.workload(&e.caller)
                    } else {
                        root.walk(&chain)
                    };
                    caller_node.child(&e.service, "service").events.push(event);
                }
                _ => {
                    // Refusals and anything newer: at the caller's node.
                    root.workload(&e.caller).events.push(event);
                }
            }
        }
        Some(Self {
            txn: first.event.txn.clone(),
            sub,
            started_ms: rows.iter().map(|r| r.event.at_ms).min().unwrap_or_default(),
            last_ms: rows.iter().map(|r| r.event.at_ms).max().unwrap_or_default(),
            root,
        })
    }

    /// The tree as indented text, one line per node and per event, with UTC times.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "txn {}  user {}  {} .. {}\n",
            self.txn,
            self.sub,
            time(self.started_ms),
            time(self.last_ms)
        );
        render(&self.root, 0, &mut out);
        out
    }
}

fn time(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn render(node: &Node, depth: usize, out: &mut String) {
    use std::fmt::Write;
    let pad = "  ".repeat(depth);
    let _ = writeln!(out, "{pad}{} {}", node.kind, node.id);
    for e in &node.events {
        let mut line = format!(
            "{pad}  - {} {} {} #{}",
            time(e.at_ms),
            e.kind,
            e.decision,
            e.seq
        );
        let extra = [
            ("scope", e.scope.clone()),
            ("route", e.route.clone()),
            ("lease", e.lease.clone()),
            ("parent", e.parent.clone()),
            ("error", e.error.clone()),
            ("reason", e.reason.clone()),
            ("expires_in", e.expires_in.map(|s| format!("{s}s"))),
            ("latency", e.latency_us.map(|u| format!("{u}us"))),
            ("traceparent", e.traceparent.clone()),
        ];
        for (k, v) in extra {
            if let Some(v) = v {
                let _ = write!(line, " {k}={v}");
            }
        }
        let _ = writeln!(out, "{line}");
    }
    for c in &node.children {
        render(c, depth + 1, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use writ_identity::store::audit::{AuditEvent, GENESIS_HASH};

    const GW: &str = "spiffe://example.org/demo/gateway";
    const PLANNER: &str = "spiffe://example.org/demo/planner";
    const SUBAGENT: &str = "spiffe://example.org/demo/planner/sub/1";
    const TOOL: &str = "spiffe://example.org/demo/tool";

    fn row(seq: u64, kind: &str, caller: &str, service: &str, record: Value) -> AuditRow {
        AuditRow::chain(
            seq,
            GENESIS_HASH,
            AuditEvent {
                at_ms: 1_790_000_000_000 + seq as i64,
                kind: kind.into(),
                decision: "allow".into(),
                txn: "t1".into(),
                sub: "alice".into(),
                caller: caller.into(),
                service: service.into(),
                lease: String::new(),
                record: record.to_string(),
            },
        )
    }

    #[test]
    fn the_demo_chain_is_user_gateway_planner_sub_agent_tool() {
        let rows = vec![
            row(
                1,
                "grant",
                GW,
                "",
                serde_json::json!({"act": [], "granted_scope": "orders.read"}),
            ),
            row(
                2,
                "replacement",
                PLANNER,
                "",
                serde_json::json!({"act": [PLANNER, GW]}),
            ),
            row(
                3,
                "spawn",
                SUBAGENT,
                "",
                serde_json::json!({"lease": "L1", "parent": PLANNER, "child": SUBAGENT}),
            ),
            row(
                4,
                "replacement",
                SUBAGENT,
                "",
                serde_json::json!({"act": [SUBAGENT, PLANNER, GW]}),
            ),
            row(
                5,
                "verification",
                SUBAGENT,
                TOOL,
                serde_json::json!({"act": [SUBAGENT, PLANNER, GW], "route": "GET /orders", "latency_us": 180}),
            ),
            row(
                6,
                "refusal",
                SUBAGENT,
                "",
                serde_json::json!({"error": "invalid_scope"}),
            ),
        ];
        let tree = TxnTree::build(&rows).unwrap();
        assert_eq!(tree.root.id, "user:alice");
        let gw = &tree.root.children[0];
        assert_eq!((gw.id.as_str(), gw.events.len()), (GW, 1));
        let planner = &gw.children[0];
        assert_eq!(planner.id, PLANNER);
        let sub = &planner.children[0];
        assert_eq!(sub.id, SUBAGENT);
        let kinds: Vec<_> = sub.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["spawn", "replacement", "refusal"]);
        let tool = &sub.children[0];
        assert_eq!((tool.id.as_str(), tool.kind), (TOOL, "service"));
        assert_eq!(tool.events[0].latency_us, Some(180));
        assert_eq!(tree.root.children.len(), 1, "no stray nodes");
        let text = tree.to_text();
        assert!(
            text.contains("        service spiffe://example.org/demo/tool"),
            "{text}"
        );
        let json = serde_json::to_value(&tree).unwrap();
        assert!(
            json["root"]["children"][0]["events"][0]
                .get("error")
                .is_none(),
            "absent fields omitted"
        );
    }

    #[test]
    fn garbage_records_still_build() {
        let mut bad = row(1, "grant", GW, "", Value::Null);
        bad.event.record = "not json{".into();
        let odd = row(2, "martian", "", "", serde_json::json!({"act": 7}));
        let tree = TxnTree::build(&[bad, odd]).unwrap();
        assert_eq!(tree.root.children.len(), 2);
        assert!(TxnTree::build(&[]).is_none());
    }
}
