//! `writ audit`: check the durable audit trail's hash chain, show a transaction as its
//! delegation tree, list recent transactions.
//!
//! The commands read the identity store the token service writes its audit table to,
//! named one of three ways: `--config txn.toml` (its `[identity_store]`), `--datastore`
//! (a SQLite file or a `postgres://` URL), or `--data-dir` (a `writ dev` or server data
//! dir: its `datastore.sqlite3`). They only read.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use writ_identity::server::config::Datastore;
use writ_identity::store::SharedStore;
use writ_identity::store::audit::{ChainVerifier, MAX_READ};
use writ_txn_service::audit::tree::TxnTree;
use writ_txn_service::config::TxnFileConfig;

/// Where the audit table is.
#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// The token service's txn.toml: its `[identity_store]`.
    #[arg(long, conflicts_with_all = ["datastore", "data_dir"])]
    config: Option<PathBuf>,
    /// A SQLite store file, or a PostgreSQL URL (`postgres://...`).
    #[arg(long, conflicts_with = "data_dir")]
    datastore: Option<String>,
    /// A data dir holding `datastore.sqlite3` (`writ dev`'s, or the server's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain: every row as appended, none removed (but the prefix
    /// retention pruned). Names the first bad row and exits 1.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a transaction as its delegation tree, with each grant, refusal, spawn and
    /// verification and its time.
    Txn {
        /// The transaction id (`txn` claim).
        txn: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Print the tree as JSON (the explorer API's object).
        #[arg(long)]
        json: bool,
    },
    /// List recent transactions, latest activity first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this user's.
        #[arg(long)]
        sub: Option<String>,
        /// Only those a workload (SPIFFE ID) took part in.
        #[arg(long)]
        workload: Option<String>,
        /// Only this transaction.
        #[arg(long)]
        txn: Option<String>,
        /// Most transactions shown (1 to 200).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=200))]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

async fn open(args: &StoreArgs) -> anyhow::Result<SharedStore> {
    let datastore = if let Some(config) = &args.config {
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("cannot read {}", config.display()))?;
        let file: TxnFileConfig =
            toml::from_str(&text).with_context(|| format!("{}", config.display()))?;
        let base = config.parent().unwrap_or(std::path::Path::new("."));
        let table = file
            .identity_store
            .with_context(|| format!("{} has no [identity_store]", config.display()))?;
        Datastore::from_file(&table, base)
            .map_err(|(field, e)| anyhow::anyhow!("`identity_store.{field}`: {e}"))?
            .context("`identity_store`: `connection` is required")?
    } else if let Some(ds) = &args.datastore {
        if ds.starts_with("postgres://") || ds.starts_with("postgresql://") {
            Datastore::Postgres(ds.clone())
        } else {
            Datastore::Sqlite(PathBuf::from(ds))
        }
    } else if let Some(dir) = &args.data_dir {
        Datastore::Sqlite(dir.join("datastore.sqlite3"))
    } else {
        anyhow::bail!("name the store: --config txn.toml, --datastore FILE|URL or --data-dir DIR");
    };
    datastore
        .open_read_only()
        .await
        .context("cannot open the audit store")
}

pub(crate) async fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { store, json } => {
            let store = open(&store).await?;
            let anchor = store.audit_anchor().await?;
            let head_hash = anchor.head_hash.clone();
            let mut verifier = ChainVerifier::new(&anchor);
            let mut after = 0;
            loop {
                let rows = store.list_audit(after, MAX_READ).await?;
                let Some(last) = rows.last() else { break };
                after = last.seq;
                rows.iter().for_each(|r| verifier.push(r));
            }
            match verifier.finish() {
                Ok(summary) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": true, "summary": summary, "head_hash": head_hash})
                        );
                    } else if summary.rows == 0 {
                        println!("audit chain intact: no rows ({} pruned)", summary.pruned);
                    } else {
                        println!(
                            "audit chain intact: {} rows, seq {}..{} ({} pruned by retention)",
                            summary.rows, summary.first_seq, summary.head_seq, summary.pruned
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    let (problem, seq) = match e {
                        writ_identity::store::audit::ChainError::Edited { seq } => ("edited", seq),
                        writ_identity::store::audit::ChainError::Removed { seq } => {
                            ("removed", seq)
                        }
                        _ => ("bad", e.seq()),
                    };
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "seq": seq, "problem": problem})
                        );
                    } else {
                        eprintln!("audit chain broken: row {seq} was {problem}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Txn { txn, store, json } => {
            if !writ_txn_service::audit::explorer::valid_txn(&txn) {
                anyhow::bail!("a transaction id is 1 to 128 printable ASCII characters");
            }
            let store = open(&store).await?;
            let rows = store.audit_txn(&txn, MAX_READ).await?;
            let Some(tree) = TxnTree::build(&rows) else {
                anyhow::bail!("no transaction {txn} in the audit trail");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&tree)?);
            } else {
                print!("{}", tree.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::List {
            store,
            sub,
            workload,
            txn,
            limit,
            json,
        } => {
            let store = open(&store).await?;
            let query = txn
                .as_deref()
                .or(workload.as_deref())
                .or(sub.as_deref())
                .unwrap_or("");
            let mut txns = store.list_audit_txns(query, limit).await?;
            txns.retain(|t| {
                sub.as_ref().is_none_or(|s| &t.sub == s)
                    && workload.as_ref().is_none_or(|w| t.workloads.contains(w))
                    && txn.as_ref().is_none_or(|x| &t.txn == x)
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&txns)?);
            } else {
                for t in &txns {
                    let when = humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(
                                u64::try_from(t.last_ms).unwrap_or(0),
                            ),
                    );
                    println!(
                        "{}  {when}  user {}  grants {} refusals {} spawns {} verifications {}{}",
                        t.txn,
                        t.sub,
                        t.grants,
                        t.refusals,
                        t.spawns,
                        t.verifications,
                        if t.denied { "  DENIED" } else { "" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
