//! `writ entry create --data FILE`: many entries from one JSON file, in the shape of
//! SPIRE's `spire-server entry create -data`:
//!
//! ```json
//! {"entries": [
//!   {"spiffe_id": "spiffe://example.org/web",
//!    "parent_id": "spiffe://example.org/node/compose",
//!    "selectors": [{"type": "docker", "value": "label:app:web"}],
//!    "x509_svid_ttl": 3600, "dns_names": ["web.internal"]},
//!   {"spiffe_id_template": "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}",
//!    "parent_id": "spiffe://example.org/k8s/prod", "selectors": []}
//! ]}
//! ```
//!
//! Each entry is created on its own; one that exists already (the same SPIFFE ID or
//! template, parent and selectors) counts as done, so a deployment can run the same file
//! at every start. A malformed file creates nothing.

use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use writ_identity::proto::admin as pb;

/// Largest file read.
pub const MAX_DATA_BYTES: u64 = 1024 * 1024;
/// Most entries in one file.
pub const MAX_DATA_ENTRIES: usize = 1000;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    entries: Vec<DataEntry>,
}

/// One entry as written (SPIRE's field names, plus Writ's template and spawn policy).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataEntry {
    #[serde(default, alias = "entry_id")]
    id: String,
    #[serde(default)]
    spiffe_id: String,
    #[serde(default)]
    spiffe_id_template: String,
    parent_id: String,
    #[serde(default)]
    selectors: Vec<DataSelector>,
    #[serde(default)]
    x509_svid_ttl: u64,
    #[serde(default)]
    jwt_svid_ttl: u64,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    downstream: bool,
    #[serde(default)]
    hint: String,
    #[serde(default, alias = "expires_at")]
    entry_expiry: Option<i64>,
    #[serde(default)]
    spawn_max_ttl: Option<u64>,
    #[serde(default)]
    spawn_max_depth: Option<u32>,
    #[serde(default)]
    spawn_max_children: Option<u32>,
}

/// `{"type": "unix", "value": "uid:1000"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSelector {
    #[serde(rename = "type")]
    kind: String,
    value: String,
}

impl From<DataEntry> for pb::Entry {
    fn from(e: DataEntry) -> Self {
        Self {
            id: e.id,
            spiffe_id: e.spiffe_id,
            spiffe_id_template: e.spiffe_id_template,
            parent_id: e.parent_id,
            selectors: e
                .selectors
                .into_iter()
                .map(|s| format!("{}:{}", s.kind, s.value))
                .collect(),
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: e.dns_names,
            federates_with: e.federates_with,
            admin: e.admin,
            downstream: e.downstream,
            hint: e.hint,
            expires_at: e.entry_expiry,
            spawn_max_ttl: e.spawn_max_ttl,
            spawn_max_depth: e.spawn_max_depth,
            spawn_max_children: e.spawn_max_children,
            ..Self::default()
        }
    }
}

/// The entries of a `--data` text, or why the text is not such a file.
///
/// # Errors
/// Not JSON of that shape (with serde's line and column), or more than
/// [`MAX_DATA_ENTRIES`] entries.
pub fn parse(text: &str) -> anyhow::Result<Vec<pb::Entry>> {
    let file: DataFile = serde_json::from_str(text)?;
    if file.entries.len() > MAX_DATA_ENTRIES {
        anyhow::bail!("more than {MAX_DATA_ENTRIES} entries");
    }
    Ok(file.entries.into_iter().map(pb::Entry::from).collect())
}

/// Reads and parses `path` (at most [`MAX_DATA_BYTES`]).
///
/// # Errors
/// The file cannot be read, is too large, or [`parse`] refuses it; the message names
/// the file.
pub fn read(path: &Path) -> anyhow::Result<Vec<pb::Entry>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_DATA_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > MAX_DATA_BYTES {
        anyhow::bail!("{}: larger than {MAX_DATA_BYTES} bytes", path.display());
    }
    parse(&text).with_context(|| format!("{}: not an entries file", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_spire_shaped_entries_and_templates() {
        let entries = parse(
            r#"{"entries": [
                {"spiffe_id": "spiffe://example.org/web", "parent_id": "spiffe://example.org/n",
                 "selectors": [{"type": "docker", "value": "label:app:web"}],
                 "x509_svid_ttl": 60, "admin": true, "entry_id": "e1"},
                {"spiffe_id_template": "spiffe://example.org/ns/{k8s:ns}",
                 "parent_id": "spiffe://example.org/n", "selectors": []}
            ]}"#,
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "e1");
        assert_eq!(entries[0].selectors, ["docker:label:app:web"]);
        assert_eq!(entries[0].x509_svid_ttl, 60);
        assert!(entries[0].admin);
        assert_eq!(
            entries[1].spiffe_id_template,
            "spiffe://example.org/ns/{k8s:ns}"
        );
    }

    #[test]
    fn refuses_garbage_unknown_fields_and_too_many() {
        for bad in [
            "",
            "[]",
            "{\"entries\": 1}",
            "{\"entries\": [{\"spiffe_id\": \"x\"}]}",
            "{\"entries\": [{\"parent_id\": \"p\", \"store_svid\": true}]}",
            "{\"entries\": [{\"parent_id\": \"p\", \"selectors\": [{\"type\": \"unix\"}]}]}",
            "\u{0}\u{1}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let many = format!(
            "{{\"entries\": [{}]}}",
            vec!["{\"parent_id\": \"p\"}"; MAX_DATA_ENTRIES + 1].join(",")
        );
        assert!(parse(&many).unwrap_err().to_string().contains("more than"));
    }

    #[test]
    fn refuses_a_file_over_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        let len = usize::try_from(MAX_DATA_BYTES).unwrap() + 10;
        std::fs::write(&path, " ".repeat(len)).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("larger than"));
        assert!(read(&dir.path().join("missing.json")).is_err());
    }
}
