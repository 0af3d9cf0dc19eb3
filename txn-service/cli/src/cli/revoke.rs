//! `writ txn revoke` and `writ txn revocations`: the kill switch, through the identity
//! server's admin socket (docs/txn.md, "Revoking transactions").

use std::process::ExitCode;

use writ_identity::proto::admin as pb;

use super::out::{self, OutputArg, outln};
use super::{ServerSocket, parse_ttl, status};

/// `writ txn revoke`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["txn", "sub", "workload", "lease"])))]
pub(crate) struct RevokeArgs {
    #[command(flatten)]
    server: ServerSocket,
    /// Revoke every Txn-Token of this transaction (`txn` claim).
    #[arg(long)]
    txn: Option<String>,
    /// Revoke every transaction of this user (`sub` claim).
    #[arg(long)]
    sub: Option<String>,
    /// Revoke this workload (SPIFFE ID): its SVIDs, it as a peer, and Txn-Tokens it
    /// requested or acts in.
    #[arg(long, value_name = "SPIFFE_ID")]
    workload: Option<String>,
    /// With `--workload`: every identity under its path too (its sub-agents).
    #[arg(long, requires = "workload")]
    subtree: bool,
    /// Revoke this sub-agent lease (the child identity it granted).
    #[arg(long, value_name = "ID")]
    lease: Option<String>,
    /// Why (kept with the revocation and in the audit trail).
    #[arg(long)]
    reason: Option<String>,
    /// Keep it in force at least this long (`30d`, `12h`), beyond the moment what it
    /// covers has expired.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_ttl)]
    hold: Option<u64>,
    #[command(flatten)]
    output: OutputArg,
    /// Same as `--output json`.
    #[arg(long)]
    json: bool,
}

/// `writ txn revocations`.
#[derive(Debug, clap::Args)]
pub(crate) struct RevocationsArgs {
    #[command(flatten)]
    server: ServerSocket,
    #[command(flatten)]
    output: OutputArg,
    /// Same as `--output json`.
    #[arg(long)]
    json: bool,
}

fn revocation_json(r: &pb::Revocation) -> serde_json::Value {
    let mut v = serde_json::json!({
        "seq": r.seq,
        "kind": r.kind,
        "value": r.value,
        "revoked_at": r.revoked_at,
        "revoked_at_rfc3339": rfc3339(r.revoked_at),
        "lapses_at": r.lapses_at,
        "lapses_at_rfc3339": rfc3339(r.lapses_at),
        "revoked_by": r.revoked_by,
    });
    if let Some(map) = v.as_object_mut() {
        if !r.spiffe_id.is_empty() {
            map.insert("spiffe_id".into(), r.spiffe_id.clone().into());
        }
        if r.kind == "workload" {
            map.insert("subtree".into(), r.subtree.into());
        }
        if !r.reason.is_empty() {
            map.insert("reason".into(), r.reason.clone().into());
        }
    }
    v
}

fn rfc3339(unix: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One line: what, until when, why.
fn line(r: &pb::Revocation) -> String {
    let mut what = format!("{} {}", r.kind, r.value);
    if r.subtree {
        what.push_str(" (and below)");
    }
    if !r.spiffe_id.is_empty() {
        what.push_str(&format!(" -> {}", r.spiffe_id));
    }
    let mut text = format!(
        "#{:<5} {what}  revoked {}  lapses {}",
        r.seq,
        rfc3339(r.revoked_at),
        rfc3339(r.lapses_at)
    );
    if !r.reason.is_empty() {
        text.push_str(&format!("  reason: {}", r.reason));
    }
    text
}

pub(crate) async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    use pb::revoke_request::Target;
    let target = match (args.txn, args.sub, args.workload, args.lease) {
        (Some(t), None, None, None) => Target::Txn(t),
        (None, Some(s), None, None) => Target::Sub(s),
        (None, None, Some(w), None) => Target::Workload(w),
        (None, None, None, Some(l)) => Target::Lease(l),
        _ => anyhow::bail!("give exactly one of --txn, --sub, --workload or --lease"),
    };
    let r = args
        .server
        .connect()
        .await?
        .revoke(pb::RevokeRequest {
            target: Some(target),
            subtree: args.subtree,
            reason: args.reason.unwrap_or_default(),
            hold_secs: args.hold.unwrap_or(0),
        })
        .await
        .map_err(status)?
        .into_inner();
    if args.json || args.output.json() {
        out::json(&revocation_json(&r))?;
    } else {
        outln!("Revoked {}", line(&r))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn revocations(args: RevocationsArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.server.connect().await?;
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .list_revocations(pb::ListRevocationsRequest { after, limit: 0 })
            .await
            .map_err(status)?
            .into_inner();
        let Some(last) = page.revocations.last() else {
            break;
        };
        after = last.seq;
        all.extend(page.revocations);
        if !page.more {
            break;
        }
    }
    if args.json || args.output.json() {
        out::json(&serde_json::Value::Array(
            all.iter().map(revocation_json).collect(),
        ))?;
    } else if all.is_empty() {
        outln!("No revocations in force")?;
    } else {
        for r in &all {
            outln!("{}", line(r))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
