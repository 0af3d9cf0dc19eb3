//! The cost of CEL policy conditions per exchange
//! (`cargo bench -p writ-txn-service --bench conditions`).
//!
//! Prints, for each expression: the time to check it when the policy loads
//! (`Condition::new`), the time to build the inputs an exchange hands it (`Input`: the
//! caller, the request, the subject token's claims, `tctx`, `rctx`, the lease), and the
//! time to evaluate it (only the variables the expression reads are converted, as in
//! the exchange), as mean and p99 over `WRIT_BENCH_OPS` (20000) evaluations; then a
//! markdown table for BENCHMARKS.md. The inputs are those of a typical replacement by a
//! sub-agent (an OIDC-like claim set of 10 claims, a small `tctx`), except the last row,
//! whose inputs sit at the limits (a claim list of 1024 strings) and whose expression is
//! near the cost ceiling: the worst an accepted condition can do.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step should abort the run loudly"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::LeaseRecord;
use writ_sdk::oauth::TokenType;
use writ_txn_service::policy::condition::{Condition, Input};

const CHILD: &str = "spiffe://example.org/agents/planner/sub/search-0a0b0c0d";

fn ops() -> usize {
    std::env::var("WRIT_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

struct Inputs {
    caller: SpiffeId,
    claims: Map<String, Value>,
    tctx: Map<String, Value>,
    rctx: BTreeMap<String, Value>,
    scope: BTreeSet<String>,
    lease: LeaseRecord,
}

impl Inputs {
    fn typical() -> Self {
        let claims = json!({
            "iss": "https://tts.example.org", "aud": "example.org", "sub": "alice",
            "txn": "0b9f2a8e-2c1d-4c43-9a36-6a3f7f0d2b11", "iat": 1_800_000_000,
            "exp": 1_800_000_300, "scope": "search.query mail.send",
            "req_wl": "spiffe://example.org/agents/planner",
            "groups": ["admins", "dev", "oncall"], "email_verified": true,
        });
        Self::with_claims(claims)
    }

    fn at_limits() -> Self {
        let groups: Vec<String> = (0..1024).map(|i| format!("group-{i:04}")).collect();
        Self::with_claims(json!({ "sub": "alice", "groups": groups }))
    }

    fn with_claims(claims: Value) -> Self {
        let Value::Object(claims) = claims else {
            unreachable!()
        };
        let Value::Object(tctx) = json!({"tool": "search", "order": 42, "tenant": "acme"}) else {
            unreachable!()
        };
        let caller = SpiffeId::new(CHILD).unwrap();
        Self {
            lease: LeaseRecord {
                id: "0b6d".into(),
                child_id: caller.clone(),
                parent_id: SpiffeId::new("spiffe://example.org/agents/planner").unwrap(),
                entry_id: "entry".into(),
                agent_id: SpiffeId::new("spiffe://example.org/writ/agent/a").unwrap(),
                depth: 1,
                task: "search".into(),
                child_pid: 4242,
                child_start_time: 1,
                created_at: 1_800_000_000,
                expires_at: 1_800_000_300,
                released_at: None,
            },
            caller,
            claims,
            tctx,
            rctx: BTreeMap::from([
                ("req_ip".to_owned(), json!("192.0.2.7")),
                ("transport".to_owned(), json!("mtls")),
            ]),
            scope: BTreeSet::from(["search.query".to_owned()]),
        }
    }

    /// What the exchange builds for one evaluation of `condition`: only the variables
    /// it reads are converted.
    fn build(&self, condition: &Condition) -> Input {
        let mut input = Input::new(1_800_000_100);
        input
            .only(condition.reads().iter().copied())
            .caller(&self.caller)
            .request(Some(&self.scope), "example.org", TokenType::TxnToken)
            .lease(&self.lease)
            .subject(&self.claims)
            .tctx(&self.tctx)
            .rctx(&self.rctx);
        input
    }
}

struct Row {
    name: &'static str,
    cost: u64,
    load: Duration,
    build: Duration,
    mean: Duration,
    p99: Duration,
}

fn measure(name: &'static str, source: &str, inputs: &Inputs, n: usize) -> Row {
    let started = Instant::now();
    let loads = 200;
    for _ in 0..loads {
        black_box(Condition::new(black_box(source)).unwrap());
    }
    let load = started.elapsed() / loads;
    let condition = Condition::new(source).unwrap();
    let started = Instant::now();
    for _ in 0..n.min(2000) {
        black_box(inputs.build(&condition));
    }
    let build = started.elapsed() / u32::try_from(n.min(2000)).unwrap();
    let input = inputs.build(&condition);
    assert_eq!(condition.evaluate(&input), Ok(true), "{name}: {source}");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        black_box(condition.evaluate(black_box(&input)).unwrap());
        samples.push(t.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / u32::try_from(n).unwrap();
    Row {
        name,
        cost: condition.cost(),
        load,
        build,
        mean,
        p99: percentile(&samples, 99.0),
    }
}

fn main() {
    let n = ops();
    let typical = Inputs::typical();
    let limits = Inputs::at_limits();
    let cases: [(&str, &str, &Inputs); 5] = [
        ("one comparison", r#"tctx.tool == "search""#, &typical),
        (
            "per-tool pin",
            r#"lease != null && lease.task == tctx.tool && request.scope.all(s, s.startsWith(lease.task + "."))"#,
            &typical,
        ),
        (
            "typical (6 clauses)",
            r#"caller.trust_domain == "example.org" && "admins" in subject.groups && subject.email_verified && tctx.order > 0 && rctx.transport == "mtls" && lease.expires_at - now > 60"#,
            &typical,
        ),
        (
            "regex",
            r#"subject.sub.matches("^[a-z]+$") && tctx.tenant in ["acme", "globex"]"#,
            &typical,
        ),
        (
            "worst accepted, inputs at limits",
            "subject.groups.map(g, g + g).filter(g, g.startsWith('group-1')).size() > 0 && subject.groups.exists_one(g, g == 'group-0007')",
            &limits,
        ),
    ];
    println!("CEL condition cost ({n} evaluations per row)\n");
    let rows: Vec<Row> = cases
        .iter()
        .map(|(name, source, inputs)| {
            let row = measure(name, source, inputs, n);
            println!(
                "{:<34} cost estimate {:>6}  load {:>12}  inputs {:>12}  eval mean {:>12}  p99 {:>12}",
                row.name,
                row.cost,
                micros(row.load),
                micros(row.build),
                micros(row.mean),
                micros(row.p99)
            );
            row
        })
        .collect();

    // What a refused pathological expression costs the loader.
    let refused = [
        "subject.groups.all(a, subject.groups.all(b, subject.groups.all(c, a == b)))",
        "subject.groups.all(x, subject.groups.exists(y, x + y == 'ab'))",
    ];
    for source in refused {
        let t = Instant::now();
        let err = Condition::new(source).unwrap_err();
        println!("refused at load in {}: {err}", micros(t.elapsed()));
    }

    println!(
        "\n| expression | cost estimate | load (check) | inputs per exchange | evaluation mean | evaluation p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            r.cost,
            micros(r.load),
            micros(r.build),
            micros(r.mean),
            micros(r.p99)
        );
    }
}
