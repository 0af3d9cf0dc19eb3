//! `writ entry create|list|show|update|delete`.

use std::process::ExitCode;

use writ_identity::proto::admin as pb;

use super::out::{self, OutputArg, errln, outln};
use super::{ServerSocket, parse_ttl};

/// The flag of each field the admin API names in its errors (`parent_id: ...`): the one
/// place the CLI maps them, for `entry` and for `x509 mint` / `jwt mint`.
const FIELD_FLAGS: &[(&str, &str)] = &[
    // Before `spiffe_id`, which its name contains.
    ("spiffe_id_template", "--template"),
    ("spiffe_id", "--spiffe-id"),
    ("parent_id", "--parent-id"),
    ("selectors", "--selector"),
    ("x509_svid_ttl", "--x509-svid-ttl"),
    ("jwt_svid_ttl", "--jwt-svid-ttl"),
    ("dns_names", "--dns-name"),
    ("federates_with", "--federates-with"),
    ("expires_at", "--entry-expiry"),
    ("hint", "--hint"),
    ("spawn_max_ttl", "--spawn-max-ttl"),
    ("spawn_max_depth", "--spawn-max-depth"),
    ("spawn_max_children", "--spawn-max-children"),
    ("id", "--entry-id"),
    ("ttl", "--ttl"),
    ("audience", "--audience"),
];

/// A gRPC status as a one-line error, the wire fields it names replaced by their flags
/// (`parent_id: nothing holds ...` -> `--parent-id: nothing holds ...`; also a field
/// named later, as in `spawn_max_depth: is required with spawn_max_ttl`).
pub(crate) fn field_status(e: tonic::Status) -> anyhow::Error {
    let message = e.message();
    let Some((field, rest)) = message.split_once(": ") else {
        return anyhow::anyhow!("{message}");
    };
    let Some((_, flag)) = FIELD_FLAGS.iter().find(|(name, _)| *name == field) else {
        return anyhow::anyhow!("{message}");
    };
    let rest = FIELD_FLAGS
        .iter()
        .filter(|(name, _)| name.contains('_'))
        .fold(rest.to_owned(), |text, (name, flag)| {
            text.replace(name, flag)
        });
    anyhow::anyhow!("{flag}: {rest}")
}

/// Warns (on standard error, once the entry is stored, so a refusal stays one line)
/// about selectors of types no attestor of Writ produces: they match only what some
/// other attestor reports.
fn warn_unknown_selector_types(selectors: &[String]) {
    use writ_identity::selector::{Selector, SelectorType};
    for text in selectors {
        if let Ok(selector) = text.parse::<Selector>()
            && selector.check_value() == Ok(SelectorType::Unknown)
        {
            errln!(
                "warning: --selector {text}: Writ's attestors produce no selector of type {} \
                 (known: {}); it matches only if another attestor reports it",
                selector.kind(),
                writ_identity::selector::KNOWN_TYPES.join(", ")
            );
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct EntryFields {
    /// The SPIFFE ID issued to matching workloads.
    #[arg(long, conflicts_with = "template")]
    spiffe_id: Option<String>,
    /// A SPIFFE ID template filled per workload from its attested selectors, e.g.
    /// 'spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}' (see docs/templates.md).
    #[arg(long)]
    template: Option<String>,
    /// The agent (or entry) the workload runs under. Required, except under `writ dev`,
    /// where it defaults to the embedded agent.
    #[arg(long)]
    parent_id: Option<String>,
    /// Make a node alias: the parent is the server (`spiffe://<td>/writ/server`) and
    /// the selectors are node selectors; every agent whose node selectors include them
    /// holds this entry's SPIFFE ID as a parent (SPIRE's `entry create -node`).
    #[arg(long, conflicts_with_all = ["parent_id", "template"])]
    node: bool,
    /// A `type:value` selector; repeat for several (all must match).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X509-SVID lifetime (e.g. 1h; default: the server's).
    #[arg(long, value_parser = parse_ttl)]
    x509_svid_ttl: Option<u64>,
    /// JWT-SVID lifetime (e.g. 5m; default: the server's).
    #[arg(long, value_parser = parse_ttl)]
    jwt_svid_ttl: Option<u64>,
    /// A DNS SAN for the X509-SVID, or an IP SAN when it is an IP address
    /// (`127.0.0.1`, `::1`); repeat for several.
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Remove every DNS name (with `entry update`).
    #[arg(long, conflicts_with = "dns_names")]
    clear_dns_names: bool,
    /// A trust domain whose bundle the workload also gets; repeat for several.
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// Grant the workload access to the admin API.
    #[arg(long)]
    admin: Option<bool>,
    /// Mark the workload as a downstream CA.
    #[arg(long)]
    downstream: Option<bool>,
    /// Unix seconds after which the entry no longer applies.
    #[arg(long)]
    entry_expiry: Option<i64>,
    /// A hint passed to the workload with its SVID.
    #[arg(long)]
    hint: Option<String>,
    /// Longest lifetime of a sub-agent SVID this workload may spawn (e.g. 5m); unset
    /// forbids spawning.
    #[arg(long, value_parser = parse_ttl)]
    spawn_max_ttl: Option<u64>,
    /// Deepest chain of sub-agents under this workload.
    #[arg(long)]
    spawn_max_depth: Option<u32>,
    /// Most live sub-agents this workload may hold at once (default: 16).
    #[arg(long)]
    spawn_max_children: Option<u32>,
}

impl EntryFields {
    /// Applies the flags that were given to `entry`.
    fn apply(self, entry: &mut pb::Entry) {
        if let Some(v) = self.spiffe_id {
            entry.spiffe_id = v;
            entry.spiffe_id_template.clear();
        }
        if let Some(v) = self.template {
            entry.spiffe_id_template = v;
            // The server fills in the stand-in ID.
            entry.spiffe_id.clear();
        }
        if let Some(v) = self.parent_id {
            entry.parent_id = v;
        }
        if self.node {
            // The server's ID in the entry's own trust domain.
            let td = entry
                .spiffe_id
                .strip_prefix("spiffe://")
                .map(|rest| rest.split('/').next().unwrap_or_default())
                .unwrap_or_default();
            entry.parent_id = format!("spiffe://{td}/writ/server");
        }
        if !self.selectors.is_empty() {
            entry.selectors = self.selectors;
        }
        if let Some(v) = self.x509_svid_ttl {
            entry.x509_svid_ttl = v;
        }
        if let Some(v) = self.jwt_svid_ttl {
            entry.jwt_svid_ttl = v;
        }
        if !self.dns_names.is_empty() || self.clear_dns_names {
            entry.dns_names = self.dns_names;
        }
        if !self.federates_with.is_empty() {
            entry.federates_with = self.federates_with;
        }
        if let Some(v) = self.admin {
            entry.admin = v;
        }
        if let Some(v) = self.downstream {
            entry.downstream = v;
        }
        if self.entry_expiry.is_some() {
            entry.expires_at = self.entry_expiry;
        }
        if let Some(v) = self.hint {
            entry.hint = v;
        }
        if self.spawn_max_ttl.is_some() {
            entry.spawn_max_ttl = self.spawn_max_ttl;
        }
        if self.spawn_max_depth.is_some() {
            entry.spawn_max_depth = self.spawn_max_depth;
        }
        if self.spawn_max_children.is_some() {
            entry.spawn_max_children = self.spawn_max_children;
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum EntryCommand {
    /// Create a registration entry.
    Create {
        #[command(flatten)]
        server: ServerSocket,
        /// Use this entry id instead of a generated one.
        #[arg(long)]
        entry_id: Option<String>,
        /// Create every entry in this JSON file instead (SPIRE's `entry create -data`
        /// shape: `{"entries": [{"spiffe_id", "parent_id", "selectors": [{"type",
        /// "value"}], ...}]}`). An entry that exists already counts as done.
        #[arg(long, value_name = "FILE", conflicts_with = "entry_id")]
        data: Option<std::path::PathBuf>,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        output: OutputArg,
    },
    /// List entries, optionally filtered.
    List {
        #[command(flatten)]
        server: ServerSocket,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only entries with this parent.
        #[arg(long)]
        parent_id: Option<String>,
        /// Only entries whose selectors are all among these; repeat for several.
        #[arg(long = "selector")]
        selectors: Vec<String>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show one entry.
    Show {
        #[command(flatten)]
        server: ServerSocket,
        /// The entry id.
        #[arg(long)]
        entry_id: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Change an entry: the flags given replace those fields.
    Update {
        #[command(flatten)]
        server: ServerSocket,
        /// The entry id.
        #[arg(long)]
        entry_id: String,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete an entry.
    Delete {
        #[command(flatten)]
        server: ServerSocket,
        /// The entry id.
        #[arg(long)]
        entry_id: String,
        #[command(flatten)]
        output: OutputArg,
    },
}

pub(crate) async fn run(cmd: EntryCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EntryCommand::Create {
            server,
            data: Some(path),
            fields,
            output,
            ..
        } => {
            if fields.spiffe_id.is_some()
                || fields.template.is_some()
                || fields.parent_id.is_some()
                || !fields.selectors.is_empty()
            {
                anyhow::bail!(
                    "--data takes every entry from the file: give no entry flags with it"
                );
            }
            return create_from_file(&server, &path, output).await;
        }
        EntryCommand::Create {
            server,
            entry_id,
            fields,
            output,
            ..
        } => {
            let mut entry = pb::Entry {
                id: entry_id.unwrap_or_default(),
                ..pb::Entry::default()
            };
            if fields.spiffe_id.is_none() && fields.template.is_none() {
                anyhow::bail!("--spiffe-id or --template is required");
            }
            if fields.selectors.is_empty() && fields.template.is_none() {
                anyhow::bail!("at least one --selector is required");
            }
            let selectors = fields.selectors.clone();
            fields.apply(&mut entry);
            let created = server
                .connect()
                .await?
                .create_entry(pb::CreateEntryRequest { entry: Some(entry) })
                .await
                .map_err(field_status)?
                .into_inner();
            warn_unknown_selector_types(&selectors);
            print_entry_doc(&created, output)?;
        }
        EntryCommand::List {
            server,
            spiffe_id,
            parent_id,
            selectors,
            output,
        } => {
            let entries = server
                .connect()
                .await?
                .list_entries(pb::ListEntriesRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    parent_id: parent_id.unwrap_or_default(),
                    selectors,
                })
                .await
                .map_err(field_status)?
                .into_inner()
                .entries;
            if output.json() {
                // A list is always an array, also for 0 or 1 entries.
                out::json(&serde_json::Value::Array(
                    entries.iter().map(entry_json).collect(),
                ))?;
            } else {
                outln!(
                    "Found {} entr{}",
                    entries.len(),
                    if entries.len() == 1 { "y" } else { "ies" }
                )?;
                for e in &entries {
                    outln!()?;
                    print_entry(e)?;
                }
            }
        }
        EntryCommand::Show {
            server,
            entry_id,
            output,
        } => {
            let entry = server
                .connect()
                .await?
                .get_entry(pb::GetEntryRequest { id: entry_id })
                .await
                .map_err(field_status)?
                .into_inner();
            print_entry_doc(&entry, output)?;
        }
        EntryCommand::Update {
            server,
            entry_id,
            fields,
            output,
        } => {
            let mut client = server.connect().await?;
            let mut entry = client
                .get_entry(pb::GetEntryRequest { id: entry_id })
                .await
                .map_err(field_status)?
                .into_inner();
            let selectors = fields.selectors.clone();
            fields.apply(&mut entry);
            let updated = client
                .update_entry(pb::UpdateEntryRequest { entry: Some(entry) })
                .await
                .map_err(field_status)?
                .into_inner();
            warn_unknown_selector_types(&selectors);
            print_entry_doc(&updated, output)?;
        }
        EntryCommand::Delete {
            server,
            entry_id,
            output,
        } => {
            let deleted = server
                .connect()
                .await?
                .delete_entry(pb::DeleteEntryRequest { id: entry_id })
                .await
                .map_err(field_status)?
                .into_inner();
            if output.json() {
                out::json(&serde_json::json!({ "deleted": deleted.id }))?;
            } else {
                outln!("Deleted entry {}", deleted.id)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One entry (what `create`, `show` and `update` print): a JSON object, or text.
/// `entry create --data`: creates each entry of the file in turn and reports each. An
/// entry that exists already counts as done; the exit code is 1 if any failed.
async fn create_from_file(
    server: &ServerSocket,
    path: &std::path::Path,
    output: OutputArg,
) -> anyhow::Result<ExitCode> {
    let entries = super::entry_data::read(path)?;
    let mut client = server.connect().await?;
    let mut report = Vec::with_capacity(entries.len());
    let mut failed = 0usize;
    for (index, entry) in entries.into_iter().enumerate() {
        let name = if entry.spiffe_id_template.is_empty() {
            entry.spiffe_id.clone()
        } else {
            entry.spiffe_id_template.clone()
        };
        let result = client
            .create_entry(pb::CreateEntryRequest { entry: Some(entry) })
            .await;
        let (status, id, error) = match result {
            Ok(created) => ("created", created.into_inner().id, String::new()),
            Err(e) if e.code() == tonic::Code::AlreadyExists => {
                ("exists", String::new(), e.message().to_owned())
            }
            Err(e) => {
                failed += 1;
                ("failed", String::new(), field_status(e).to_string())
            }
        };
        if !output.json() {
            match status {
                "created" => outln!("Entry {}: created {id} ({name})", index + 1)?,
                "exists" => outln!("Entry {}: exists ({name})", index + 1)?,
                _ => errln!("Entry {}: {name}: {error}", index + 1),
            }
        }
        report.push(serde_json::json!({
            "index": index,
            "spiffe_id": name,
            "status": status,
            "id": id,
            "error": error,
        }));
    }
    if output.json() {
        out::json(&serde_json::Value::Array(report))?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_entry_doc(entry: &pb::Entry, output: OutputArg) -> anyhow::Result<()> {
    if output.json() {
        out::json(&entry_json(entry))
    } else {
        outln!()?;
        print_entry(entry)
    }
}

fn ttl_text(secs: u64) -> String {
    if secs == 0 {
        "default".into()
    } else {
        format!("{secs}s")
    }
}

fn print_entry(e: &pb::Entry) -> anyhow::Result<()> {
    outln!("Entry ID         : {}", e.id)?;
    if e.spiffe_id_template.is_empty() {
        outln!("SPIFFE ID        : {}", e.spiffe_id)?;
    } else {
        outln!("SPIFFE ID        : {} (template)", e.spiffe_id_template)?;
    }
    outln!("Parent ID        : {}", e.parent_id)?;
    if e.parent_id.ends_with("/writ/server") {
        outln!("Node alias       : true")?;
    }
    outln!("Revision         : {}", e.revision)?;
    outln!("X509-SVID TTL    : {}", ttl_text(e.x509_svid_ttl))?;
    outln!("JWT-SVID TTL     : {}", ttl_text(e.jwt_svid_ttl))?;
    for s in &e.selectors {
        outln!("Selector         : {s}")?;
    }
    for d in &e.dns_names {
        outln!("DNS name         : {d}")?;
    }
    for f in &e.federates_with {
        outln!("FederatesWith    : {f}")?;
    }
    if let Some(t) = e.expires_at {
        outln!("Entry Expiry     : {t}")?;
    }
    if e.admin {
        outln!("Admin            : true")?;
    }
    if e.downstream {
        outln!("Downstream       : true")?;
    }
    if !e.hint.is_empty() {
        outln!("Hint             : {}", e.hint)?;
    }
    if let Some(t) = e.spawn_max_ttl {
        outln!("Spawn max TTL    : {t}s")?;
    }
    if let Some(d) = e.spawn_max_depth {
        outln!("Spawn max depth  : {d}")?;
    }
    if let Some(c) = e.spawn_max_children {
        outln!("Spawn children   : {c}")?;
    }
    for i in &e.template_issues {
        outln!(
            "Produced         : {} on {} (first {}, last {})",
            i.spiffe_id,
            i.agent_id,
            i.first_issued_at,
            i.last_issued_at
        )?;
    }
    Ok(())
}

fn entry_json(e: &pb::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "downstream": e.downstream,
        "expires_at": e.expires_at,
        "hint": e.hint,
        "revision": e.revision,
        "created_at": e.created_at,
        "spawn_max_ttl": e.spawn_max_ttl,
        "spawn_max_depth": e.spawn_max_depth,
        "spawn_max_children": e.spawn_max_children,
        "spiffe_id_template": e.spiffe_id_template,
        "template_issues": e.template_issues.iter().map(|i| serde_json::json!({
            "agent_id": i.agent_id,
            "spiffe_id": i.spiffe_id,
            "first_issued_at": i.first_issued_at,
            "last_issued_at": i.last_issued_at,
        })).collect::<Vec<_>>(),
    })
}
