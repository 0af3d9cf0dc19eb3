//! `writ demo`: a user's request through a gateway, a planner agent and the sub-agent it
//! spawns to a tool server, each a separate process with its own attested identity, on a
//! `writ dev` in a temporary data dir; then the delegation chain, checked.
//!
//! The four programs are `writ_examples::roles` (`examples/src/roles/`), built into this
//! binary: the demo copies `writ` into its data dir under each role's name (so that each
//! role is a separate program with its own path to attest) and `writ` started under a
//! role's name runs that role. Nothing is built or looked up at run time; `--bin-dir`
//! runs separately built programs instead (`cargo build -p writ-examples`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use writ_identity::proto::admin as pb;
use writ_identity::server::admin;

use super::{Dev, DevOptions, POLICY_FILE};

/// A progress line on standard output; a reader that went away (`writ demo | head`) is
/// no reason to panic or to stop the demo half-way.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The example programs' names (`writ_examples::roles`).
fn programs() -> impl Iterator<Item = &'static str> {
    writ_examples::roles::ALL.iter().map(|(name, _)| *name)
}

/// The role a program started as `argv0` runs, if its file name is a role's.
pub fn role_of_program(
    argv0: Option<std::ffi::OsString>,
) -> Option<fn() -> std::process::ExitCode> {
    let argv0 = argv0?;
    let name = Path::new(&argv0).file_name()?.to_str()?;
    writ_examples::roles::ALL
        .iter()
        .find(|(role, _)| *role == name)
        .map(|(_, main)| *main)
}
/// The demo user.
pub const USER: &str = "alice";
/// What the user's token grants.
pub const USER_SCOPE: &str = "docs.read docs.summarize";
/// What the sub-agent narrows the token to.
pub const SUB_AGENT_SCOPE: &str = "docs.read";
/// How long a program may take to say it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the request may take end to end.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the demo could not run (a failed check is not an error: see [`Outcome`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The example programs are missing from `--bin-dir`.
    #[error(
        "the example programs ({}) are not in {dir}: build them with `cargo build --release -p writ-examples`, or leave out --bin-dir",
        programs().collect::<Vec<_>>().join(", ")
    )]
    Programs {
        /// Where they were looked for.
        dir: String,
    },
    /// Staging the built-in programs failed.
    #[error("staging the demo programs in {dir}: {reason}")]
    Stage {
        /// Where.
        dir: String,
        /// Why.
        reason: String,
    },
    /// `writ dev` could not start.
    #[error(transparent)]
    Dev(#[from] super::DevError),
    /// A step failed.
    #[error("{step}: {reason}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why.
        reason: String,
    },
}

fn failed(step: &'static str, reason: impl std::fmt::Display) -> DemoError {
    DemoError::Step {
        step,
        reason: reason.to_string().replace('\n', " "),
    }
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Separately built example programs to run (default: the ones built into `writ`).
    pub bin_dir: Option<PathBuf>,
    /// Keep the data dir (its logs and audit log) instead of removing it.
    pub keep: bool,
}

/// The result: every check, and how long it took.
#[derive(Debug)]
pub struct Outcome {
    /// `(what was checked, passed)`.
    pub checks: Vec<(String, bool)>,
    /// From `writ dev` start to the checked chain.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, ok)| *ok)
    }
}

/// The example programs in `bin_dir`, all four present.
///
/// # Errors
/// [`DemoError::Programs`] if one is missing.
pub fn locate_programs(bin_dir: &Path) -> Result<PathBuf, DemoError> {
    if programs().all(|p| bin_dir.join(p).is_file()) {
        Ok(bin_dir.to_path_buf())
    } else {
        Err(DemoError::Programs {
            dir: bin_dir.display().to_string(),
        })
    }
}

/// Stages the built-in programs: `dir/<role>` for each role, a hard link to (or, across
/// file systems, a copy of) this `writ` binary, which runs the role named by its file
/// name.
///
/// # Errors
/// [`DemoError::Stage`] if the binary cannot be found or linked.
pub fn stage_programs(dir: &Path) -> Result<PathBuf, DemoError> {
    let fail = |reason: String| DemoError::Stage {
        dir: dir.display().to_string(),
        reason,
    };
    let exe = std::env::current_exe().map_err(|e| fail(format!("this binary: {e}")))?;
    writ_identity::key_manager::create_private_dir(dir).map_err(|e| fail(e.to_string()))?;
    for program in programs() {
        let target = dir.join(program);
        if std::fs::hard_link(&exe, &target).is_err() {
            std::fs::copy(&exe, &target).map_err(|e| fail(format!("{program}: {e}")))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// A started example program: killed when dropped.
struct Program {
    name: &'static str,
    child: tokio::process::Child,
    addr: String,
    spiffe_id: String,
}

/// How long a program may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Program {
    /// Stops the program as a supervisor would: SIGTERM, a bounded wait (in which the
    /// services flush their verification records to the token service), then SIGKILL.
    async fn stop(mut self) {
        let pid = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid
            && rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok()
            && tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_ok()
        {
            return;
        }
        let _ = self.child.kill().await;
    }
}

/// Starts `bin_dir/name` with `args`, logs to `logs/name.log`, and waits for its
/// `listening on <addr> as <SPIFFE ID>` line.
async fn start_program(
    bin_dir: &Path,
    logs: &Path,
    endpoint: &str,
    name: &'static str,
    args: &[String],
) -> Result<Program, DemoError> {
    let fail = |reason: String| failed("starting the example programs", reason);
    let log =
        std::fs::File::create(logs.join(format!("{name}.log"))).map_err(|e| fail(e.to_string()))?;
    let mut child = tokio::process::Command::new(bin_dir.join(name))
        .args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("{name}: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail(format!("{name}: no stdout")))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| fail(format!("{name} did not say it listens within 30 s")))?
        .map_err(|e| fail(format!("{name}: {e}")))?
        .ok_or_else(|| {
            fail(format!(
                "{name} exited before listening; see {}",
                logs.join(format!("{name}.log")).display()
            ))
        })?;
    // Keep draining stdout so the program never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (addr, spiffe_id) = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_once(" as "))
        .ok_or_else(|| fail(format!("{name} printed {line:?}")))?;
    Ok(Program {
        name,
        addr: addr.to_owned(),
        spiffe_id: spiffe_id.to_owned(),
        child,
    })
}

/// The demo's issuance policy: the gateway exchanges user tokens; the planner and its
/// sub-agents only replace Txn-Tokens.
fn demo_policy(td: &str) -> String {
    format!(
        r#"# policy.toml written by `writ demo`.
[[caller]]
id = "spiffe://{td}/demo/gateway"
subject_token_types = ["access_token"]
max_scope = ["docs.read", "docs.summarize"]

[[caller]]
prefix = "spiffe://{td}/demo/planner"        # the planner and its sub-agents
subject_token_types = ["txn_token"]
max_scope = ["docs.read", "docs.summarize"]
"#
    )
}

/// Runs the demo, printing each step and hop; returns the checks.
///
/// # Errors
/// [`DemoError`] if a part could not start or the request failed outright.
pub async fn run(options: DemoOptions) -> Result<Outcome, DemoError> {
    say!("writ demo: a user's request through gateway -> planner -> sub-agent -> tool server");
    let data = tempfile::Builder::new()
        .prefix("writ-demo-")
        .tempdir()
        .map_err(|e| failed("data dir", e))?;
    let bin_dir = match options.bin_dir.as_deref() {
        Some(dir) => locate_programs(dir)?,
        None => stage_programs(&data.path().join("bin"))?,
    };
    say!("[1/6] example programs in {}", bin_dir.display());
    let bin_dir = std::fs::canonicalize(&bin_dir).map_err(|e| failed("example programs", e))?;
    let started = Instant::now();
    let result = run_in(&bin_dir, data.path(), started).await;
    if options.keep {
        let kept = data.keep();
        say!("data dir kept: {}", kept.display());
    } else if let Err(DemoError::Step { .. }) = &result {
        say!(
            "(the programs' logs were in {}; run with --keep to keep them)",
            data.path().join("logs").display()
        );
    }
    result
}

async fn run_in(bin_dir: &Path, dir: &Path, started: Instant) -> Result<Outcome, DemoError> {
    let logs = dir.join("logs");
    writ_identity::key_manager::create_private_dir(&logs).map_err(|e| failed("data dir", e))?;
    let mut options = DevOptions::new(dir);
    options.tts_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let td = super::DEFAULT_TRUST_DOMAIN.to_owned();
    std::fs::write(dir.join(POLICY_FILE), demo_policy(&td)).map_err(|e| failed("policy", e))?;
    let dev = Dev::start(options).await?;
    let s = dev.state.clone();
    say!(
        "[2/6] writ dev on {}: ready in {} ms (token service {}, dev OIDC issuer {})",
        s.data_dir.display(),
        dev.startup.as_millis(),
        s.tts_url,
        s.oidc_issuer
    );

    let outcome = flow(&dev, bin_dir, &logs, started).await;
    dev.shutdown().await;
    outcome
}

async fn flow(
    dev: &Dev,
    bin_dir: &Path,
    logs: &Path,
    started: Instant,
) -> Result<Outcome, DemoError> {
    let s = &dev.state;
    let td = &s.trust_domain;
    let id = |path: &str| format!("spiffe://{td}{path}");
    let (gateway_id, planner_id, tool_id) = (
        id("/demo/gateway"),
        id("/demo/planner"),
        id("/demo/tool-server"),
    );
    let uid = super::current_uid().map_err(|e| failed("uid", e))?;

    // Register the programs by path (and uid) through the admin API, as a user would.
    let mut client = admin::connect(&s.server_socket)
        .await
        .map_err(|e| failed("admin API", e))?;
    for (spiffe_id, program, spawn) in [
        (&gateway_id, "gateway", false),
        (&planner_id, "planner", true),
        (&tool_id, "tool_server", false),
    ] {
        let entry = pb::Entry {
            spiffe_id: spiffe_id.clone(),
            selectors: vec![
                format!("unix:uid:{uid}"),
                format!("unix:path:{}", bin_dir.join(program).display()),
            ],
            x509_svid_ttl: 600,
            spawn_max_ttl: spawn.then_some(120),
            spawn_max_depth: spawn.then_some(1),
            spawn_max_children: spawn.then_some(4),
            ..pb::Entry::default()
        };
        client
            .create_entry(pb::CreateEntryRequest { entry: Some(entry) })
            .await
            .map_err(|e| failed("registering entries", e.message()))?;
    }
    say!(
        "[3/6] registered by unix:path (and unix:uid:{uid}) under {}:",
        s.agent_id
    );
    say!(
        "        {gateway_id:<44} <- {}",
        bin_dir.join("gateway").display()
    );
    say!(
        "        {planner_id:<44} <- {}  (may spawn: TTL <= 2m, depth 1)",
        bin_dir.join("planner").display()
    );
    say!(
        "        {tool_id:<44} <- {}",
        bin_dir.join("tool_server").display()
    );
    say!("        sub_agent has no entry: its identity is a lease under the planner's");

    let endpoint = &s.workload_api;
    let common = |more: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--tts-url",
            &s.tts_url,
            "--tts-id",
            &s.tts_id,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.extend(more.iter().map(|a| (*a).to_owned()));
        args
    };
    let tool = start_program(
        bin_dir,
        logs,
        endpoint,
        "tool_server",
        &common(&[
            "--trust-domain",
            td,
            "--caller-prefix",
            "/demo/planner/sub",
            "--scope",
            SUB_AGENT_SCOPE,
        ]),
    )
    .await?;
    let tool_url = format!("https://{}", tool.addr);
    let sub_agent = bin_dir.join("sub_agent").display().to_string();
    let planner = start_program(
        bin_dir,
        logs,
        endpoint,
        "planner",
        &common(&[
            "--trust-domain",
            td,
            "--gateway",
            &gateway_id,
            "--sub-agent",
            &sub_agent,
            "--tool-url",
            &tool_url,
            "--tool-id",
            &tool_id,
        ]),
    )
    .await?;
    let planner_url = format!("https://{}", planner.addr);
    let gateway = start_program(
        bin_dir,
        logs,
        endpoint,
        "gateway",
        &common(&[
            "--planner-url",
            &planner_url,
            "--planner-id",
            &planner_id,
            "--scope",
            USER_SCOPE,
        ]),
    )
    .await?;
    say!("[4/6] started, each with the SVID its entry gives it:");
    for p in [&tool, &planner, &gateway] {
        say!(
            "        {:<12} pid {:<7} {} as {}",
            p.name,
            p.child.id().unwrap_or(0),
            p.addr,
            p.spiffe_id
        );
    }

    let now = writ_identity::clock::Clock::unix_seconds(&writ_identity::clock::SystemClock);
    let user_token = dev
        .issuer()
        .access_token(USER, USER_SCOPE, Duration::from_secs(600), now)
        .map_err(|e| failed("login", e))?;
    say!("[5/6] {USER} logged in at the dev OIDC issuer: access token with scope \"{USER_SCOPE}\"");

    say!("[6/6] {USER} -> gateway: POST http://{}/ask", gateway.addr);
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| failed("HTTP client", e))?;
    let response = http
        .post(format!("http://{}/ask", gateway.addr))
        .bearer_auth(&user_token)
        .json(&serde_json::json!({ "question": "What changed in Q3?" }))
        .send()
        .await
        .map_err(|e| failed("calling the gateway", e))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| failed("calling the gateway", e))?;
    if !status.is_success() {
        return Err(failed("calling the gateway", format!("{status}: {body}")));
    }
    let report: Value =
        serde_json::from_str(&body).map_err(|e| failed("the gateway's answer", e))?;
    for program in [gateway, planner, tool] {
        program.stop().await;
    }
    let audit = std::fs::read_to_string(dev.audit_log()).unwrap_or_default();
    let outcome = check(
        &report,
        &audit,
        &Expected {
            gateway: &gateway_id,
            planner: &planner_id,
            tool: &tool_id,
        },
        started,
    );
    print_report(&report, &outcome);
    Ok(outcome)
}

/// The identities each hop must have.
struct Expected<'a> {
    gateway: &'a str,
    planner: &'a str,
    tool: &'a str,
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn chain_at(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the hop reports against the expected identities, and against the token
/// service's audit log.
fn check(report: &Value, audit: &str, want: &Expected<'_>, started: Instant) -> Outcome {
    let sub_id = str_at(report, "/next/next/spiffe_id");
    let sub_prefix = format!("{}/sub/summarize-", want.planner);
    let txn = str_at(report, "/next/verified/txn");
    let tool = "/next/next/next";
    let granted: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.get("txn").and_then(Value::as_str) == Some(txn) && !txn.is_empty())
        .collect();
    let granted_to = |caller: &str| {
        granted.iter().any(|l| {
            l.get("decision").and_then(Value::as_str) == Some("granted")
                && l.get("caller").and_then(Value::as_str) == Some(caller)
        })
    };
    let checks = vec![
        (
            format!("gateway holds {}", want.gateway),
            str_at(report, "/spiffe_id") == want.gateway,
        ),
        (
            "planner saw the gateway's SVID as its mTLS caller".to_owned(),
            str_at(report, "/next/verified/caller") == want.gateway,
        ),
        (
            format!("planner holds {}", want.planner),
            str_at(report, "/next/spiffe_id") == want.planner,
        ),
        (
            "sub-agent holds a leased ID under the planner's".to_owned(),
            sub_id.starts_with(&sub_prefix) && str_at(report, "/next/lease/child_id") == sub_id,
        ),
        (
            format!("tool server holds {}", want.tool),
            str_at(report, &format!("{tool}/spiffe_id")) == want.tool,
        ),
        (
            "tool server saw the sub-agent's SVID as its mTLS caller".to_owned(),
            str_at(report, &format!("{tool}/verified/caller")) == sub_id,
        ),
        (
            format!("the token is for user {USER}"),
            str_at(report, &format!("{tool}/verified/user")) == USER
                && str_at(report, "/next/verified/user") == USER,
        ),
        (
            "one transaction end to end".to_owned(),
            !txn.is_empty() && str_at(report, &format!("{tool}/verified/txn")) == txn,
        ),
        (
            format!("the scope narrowed to \"{SUB_AGENT_SCOPE}\""),
            str_at(report, "/next/verified/scope") == USER_SCOPE
                && str_at(report, &format!("{tool}/verified/scope")) == SUB_AGENT_SCOPE,
        ),
        (
            "act chain is sub-agent <- planner <- gateway".to_owned(),
            chain_at(report, &format!("{tool}/verified/chain"))
                == [sub_id, want.planner, want.gateway],
        ),
        (
            "the token service's audit log granted gateway, planner and sub-agent".to_owned(),
            granted_to(want.gateway) && granted_to(want.planner) && granted_to(sub_id),
        ),
    ];
    Outcome {
        checks,
        elapsed: started.elapsed(),
    }
}

fn print_report(report: &Value, outcome: &Outcome) {
    let tool = "/next/next/next";
    let sub_id = str_at(report, "/next/next/spiffe_id");
    say!();
    say!(
        "hop 1  {USER} --OIDC access token--> gateway {}",
        str_at(report, "/spiffe_id")
    );
    say!(
        "       gateway exchanged it at the token service (RFC 8693) for a Txn-Token, scope \"{}\"",
        str_at(report, "/exchanged/scope")
    );
    say!(
        "hop 2  gateway --mTLS + Txn-Token--> planner {}",
        str_at(report, "/next/spiffe_id")
    );
    say!(
        "       planner verified caller {} and the token (txn {}); replaced it to name itself",
        str_at(report, "/next/verified/caller"),
        str_at(report, "/next/verified/txn")
    );
    say!(
        "hop 3  planner --spawn (lease {}, {} s left)--> sub-agent {sub_id}",
        str_at(report, "/next/lease/id"),
        report
            .pointer("/next/lease/expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    );
    say!(
        "       sub-agent replaced the token with scope \"{}\"",
        str_at(report, "/next/next/replaced/scope")
    );
    say!(
        "hop 4  sub-agent --mTLS + Txn-Token--> tool server {}",
        str_at(report, &format!("{tool}/spiffe_id"))
    );
    say!(
        "       tool server verified the token (signature, issuer, audience, expiry, scope) and that its caller is the current actor"
    );
    say!();
    say!(
        "delegation chain (txn {}, user {}, scope \"{}\"):",
        str_at(report, &format!("{tool}/verified/txn")),
        str_at(report, &format!("{tool}/verified/user")),
        str_at(report, &format!("{tool}/verified/scope"))
    );
    let mut chain = chain_at(report, &format!("{tool}/verified/chain"));
    chain.reverse();
    say!("{}", str_at(report, &format!("{tool}/verified/user")));
    let mut indent = String::new();
    for actor in &chain {
        say!("{indent}└── {actor}");
        indent.push_str("    ");
    }
    say!(
        "{indent}└── tool: {}",
        str_at(report, &format!("{tool}/spiffe_id"))
    );
    say!();
    let passed = outcome.checks.iter().filter(|(_, ok)| *ok).count();
    for (what, ok) in &outcome.checks {
        say!("  [{}] {what}", if *ok { "ok" } else { "FAILED" });
    }
    say!(
        "{} checks passed of {}; demo took {} ms",
        passed,
        outcome.checks.len(),
        outcome.elapsed.as_millis()
    );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SUB: &str = "spiffe://example.org/demo/planner/sub/summarize-0a1b2c3d";
    const GATEWAY: &str = "spiffe://example.org/demo/gateway";
    const PLANNER: &str = "spiffe://example.org/demo/planner";
    const TOOL: &str = "spiffe://example.org/demo/tool-server";

    fn want() -> Expected<'static> {
        Expected {
            gateway: GATEWAY,
            planner: PLANNER,
            tool: TOOL,
        }
    }

    fn report() -> Value {
        let verified = |caller: &str, scope: &str, chain: &[&str]| json!({"caller": caller, "user": USER, "scope": scope, "txn": "t-1", "chain": chain});
        json!({
            "spiffe_id": GATEWAY,
            "exchanged": {"scope": USER_SCOPE},
            "next": {
                "spiffe_id": PLANNER,
                "verified": verified(GATEWAY, USER_SCOPE, &[GATEWAY]),
                "lease": {"id": "l-1", "child_id": SUB, "expires_in": 60},
                "next": {
                    "spiffe_id": SUB,
                    "replaced": {"scope": SUB_AGENT_SCOPE},
                    "next": {
                        "spiffe_id": TOOL,
                        "verified": verified(SUB, SUB_AGENT_SCOPE, &[SUB, PLANNER, GATEWAY]),
                    }
                }
            }
        })
    }

    fn audit() -> String {
        [GATEWAY, PLANNER, SUB]
            .iter()
            .map(|c| json!({"decision": "granted", "caller": c, "txn": "t-1"}).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_correct_chain_passes_every_check() {
        let outcome = check(&report(), &audit(), &want(), Instant::now());
        assert!(outcome.passed(), "{:?}", outcome.checks);
    }

    #[test]
    fn any_wrong_hop_fails_the_demo() {
        let tamper: [(&str, Value); 6] = [
            ("/spiffe_id", json!("spiffe://example.org/impostor")),
            ("/next/verified/caller", json!(PLANNER)),
            ("/next/next/next/verified/caller", json!(PLANNER)),
            (
                "/next/next/next/verified/chain",
                json!([PLANNER, SUB, GATEWAY]),
            ),
            ("/next/next/next/verified/scope", json!(USER_SCOPE)),
            ("/next/next/next/verified/txn", json!("t-2")),
        ];
        for (pointer, value) in tamper {
            let mut r = report();
            *r.pointer_mut(pointer).unwrap() = value;
            let outcome = check(&r, &audit(), &want(), Instant::now());
            assert!(!outcome.passed(), "{pointer} was not caught");
        }
        let refused = audit().replace("granted", "refused");
        assert!(!check(&report(), &refused, &want(), Instant::now()).passed());
        assert!(!check(&json!({}), "", &want(), Instant::now()).passed());
    }
}
