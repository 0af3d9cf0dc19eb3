//! The deployment examples and every configuration snippet in the docs, checked against
//! the real code, so that none of them can drift from it:
//!
//! - every YAML file under `examples/deploy/kubernetes/` parses (all its documents) and
//!   together they hold the Kubernetes objects `docs/deployment.md` describes; the
//!   workloads' volumes, mounts, ConfigMaps and claims refer to each other consistently;
//! - the Compose file `examples/deploy/compose/compose.yaml` runs real `writ` command
//!   lines, mounts configuration files that exist, and its `entries.json` is what
//!   `writ entry create --data` reads (the Compose example itself runs in
//!   `txn-service/cli/tests/suite/compose.rs`, with Docker);
//! - every TOML file under `examples/deploy/` and `examples/config/`, and every TOML a
//!   ConfigMap embeds (data keys ending `.toml`), loads through the loader that
//!   `writ server|agent|txn run` uses;
//! - every ```toml block in `README.md` and `docs/*.md` starts with a comment naming what
//!   it is (`# server.toml`, `# agent.toml`, `# txn.toml`, `# policy`) and loads through
//!   that loader;
//! - every command line the deployment runs (systemd `ExecStart=`, the Dockerfile's
//!   `ENTRYPOINT` + `CMD`, the Compose services and their health checks, the Kubernetes
//!   containers and their exec probes) parses with
//!   the `writ` binary's own clap definition, `writ_cli::cli::Cli`;
//! - the paths in each configuration are the directories the systemd unit or the pod
//!   provides.
//!
//! Two loaders touch the file system, and the test feeds them what they need:
//! - `AgentConfig` reads the bootstrap bundle named by `trust_bundle_path`: the test
//!   writes an empty SPIFFE bundle of the config's trust domain to a temp dir and points
//!   the key there (the path in the file names the target machine's file);
//! - `TxnConfig` reads `[[oidc]] ca_file` relative to the config's directory: no example
//!   sets it, so nothing is read.
//!
//! The server's `ca.upstream_*_file` keys would be read as well; no example sets them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use serde::Deserialize;
use serde_norway::Value;
use writ_cli::cli::Cli;
use writ_identity::agent::config::{AgentConfig, FileConfig as AgentFile};
use writ_identity::bundle::Bundle;
use writ_identity::clock::SystemClock;
use writ_identity::server::config::{FileConfig as ServerFile, ServerConfig};
use writ_identity::spiffe_id::TrustDomain;
use writ_txn_service::config::TxnConfig;
use writ_txn_service::oidc::OidcValidator;
use writ_txn_service::policy::Policy;

/// ConfigMaps the manifests mount but do not define: the operator creates them from the
/// running server (`docs/deployment.md`).
const OPERATOR_CONFIGMAPS: &[&str] = &["writ-bundle"];
/// Kinds of object that live in no namespace.
const CLUSTER_SCOPED: &[&str] = &["Namespace", "ClusterRole", "ClusterRoleBinding"];
/// The namespace every namespaced object lives in.
const NAMESPACE: &str = "writ";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("examples/ has a parent")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo().join("examples/deploy")
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every file under `dir` (recursively) whose name ends with one of `suffixes`, sorted.
fn files_under(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| suffixes.iter().any(|s| n.ends_with(s)))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Configuration kinds and the real loaders.
// ---------------------------------------------------------------------------------------

/// What a TOML text configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Server,
    Agent,
    Txn,
    Policy,
    /// `writ api watch --config` (spiffe-helper's `helper.conf` keys).
    Helper,
}

impl Kind {
    /// The kind of a file by its name (`server.toml`, ...).
    fn from_file_name(name: &str) -> Option<Self> {
        match name {
            "server.toml" => Some(Self::Server),
            "agent.toml" => Some(Self::Agent),
            "txn.toml" => Some(Self::Txn),
            "helper.conf" => Some(Self::Helper),
            _ => None,
        }
    }

    /// The kind a doc block's first line names: `# server.toml`, `# agent.toml`,
    /// `# txn.toml` or `# policy`, optionally followed by more words.
    fn from_header(line: &str) -> Option<Self> {
        let word = line.trim().strip_prefix('#')?.split_whitespace().next()?;
        match word.trim_end_matches([':', ',', '.', ';']) {
            "policy" => Some(Self::Policy),
            name => Self::from_file_name(name),
        }
    }
}

/// A configuration that loaded, for checks beyond loading.
#[derive(Debug)]
enum Loaded {
    Server(Box<ServerConfig>),
    Agent {
        config: Box<AgentConfig>,
        /// `trust_bundle_path` as written (the test points the loader elsewhere).
        bundle_path: Option<PathBuf>,
    },
    Txn(Box<TxnConfig>),
    Policy,
    Helper,
}

/// Loads `text` as `kind` through the loader `writ ... run` uses. `base` is the
/// directory relative paths in a `txn.toml` are read from (the CLI passes the config
/// file's directory).
fn load(kind: Kind, text: &str, base: &Path) -> Result<Loaded, String> {
    match kind {
        Kind::Server => {
            let file: ServerFile = toml::from_str(text).map_err(|e| e.to_string())?;
            let config = ServerConfig::try_from(file).map_err(|e| e.to_string())?;
            Ok(Loaded::Server(Box::new(config)))
        }
        Kind::Agent => {
            let mut file: AgentFile = toml::from_str(text).map_err(|e| e.to_string())?;
            let bundle_path = file.trust_bundle_path.clone();
            // The loader reads the bootstrap bundle: give it a real one (see the module
            // docs). An invalid trust domain is the loader's to report.
            let dir = tempfile::tempdir().unwrap();
            if bundle_path.is_some() {
                let td = TrustDomain::new(file.trust_domain.as_deref().unwrap_or("example.org"))
                    .unwrap_or_else(|_| TrustDomain::new("example.org").unwrap());
                let path = dir.path().join("bundle.json");
                std::fs::write(&path, Bundle::new(td).to_json()).unwrap();
                file.trust_bundle_path = Some(path);
            }
            let config = AgentConfig::try_from(file).map_err(|e| e.to_string())?;
            Ok(Loaded::Agent {
                config: Box::new(config),
                bundle_path,
            })
        }
        Kind::Txn => {
            let config = TxnConfig::from_toml(text, base).map_err(|e| e.to_string())?;
            // `writ txn run` builds the OIDC validator at start, which checks each
            // issuer's URL, audiences and algorithms: do the same.
            OidcValidator::new(config.oidc.clone(), Arc::new(SystemClock))
                .map_err(|e| format!("[[oidc]]: {e}"))?;
            Ok(Loaded::Txn(Box::new(config)))
        }
        Kind::Policy => Policy::from_toml(text)
            .map(|_| Loaded::Policy)
            .map_err(|e| e.to_string()),
        Kind::Helper => writ_cli::cli::check_helper_conf(text)
            .map(|()| Loaded::Helper)
            .map_err(|e| format!("{e:#}")),
    }
}

// ---------------------------------------------------------------------------------------
// Command lines.
// ---------------------------------------------------------------------------------------

/// Parses `argv` (whose first element is a path to the `writ` binary) with the binary's
/// own clap definition; returns the words before the first flag (`["server", "run"]`).
fn parse_writ(argv: &[String], what: &str) -> Vec<String> {
    let program = argv
        .first()
        .unwrap_or_else(|| panic!("{what}: empty command"));
    assert!(
        Path::new(program).file_name().and_then(|n| n.to_str()) == Some("writ"),
        "{what}: {program:?} is not the writ binary"
    );
    if let Err(e) = Cli::try_parse_from(argv) {
        panic!("{what}: `{}` does not parse: {e}", argv.join(" "));
    }
    argv.iter()
        .skip(1)
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `argv`.
fn flag(argv: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    let eq = format!("--{name}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        if *a == long {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

/// Whether `path` is `dir` or below it, by whole components.
fn is_under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// The path of a `unix:///path` endpoint.
fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(
        endpoint
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("{endpoint:?} is not unix:///path")),
    )
}

// ---------------------------------------------------------------------------------------
// YAML manifests.
// ---------------------------------------------------------------------------------------

/// Every document of every YAML file under `examples/deploy/kubernetes/`, with its file.
fn manifests() -> Vec<(PathBuf, Value)> {
    let files = files_under(&deploy_dir().join("kubernetes"), &[".yaml", ".yml"]);
    assert!(
        !files.is_empty(),
        "no YAML under examples/deploy/kubernetes/"
    );
    let mut out = Vec::new();
    for path in files {
        let text = read(&path);
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", shown(&path)));
            if !value.is_null() {
                out.push((path.clone(), value));
            }
        }
    }
    out
}

fn str_at<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a str> {
    at(value, keys)?.as_str()
}

fn at<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(value, |v, k| v.get(*k))
}

fn seq<'a>(value: &'a Value, keys: &[&str]) -> &'a [Value] {
    at(value, keys)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn kind_of(doc: &Value) -> &str {
    str_at(doc, &["kind"]).unwrap_or("")
}

fn name_of(doc: &Value) -> &str {
    str_at(doc, &["metadata", "name"]).unwrap_or("")
}

/// The `ENTRYPOINT` of the Dockerfile's final stage, which a container without a
/// `command` runs.
fn image_entrypoint() -> Vec<String> {
    dockerfile().entrypoint
}

/// Checks an `entries.json` the way `writ entry create --data` reads it and the admin API
/// validates each entry; returns the entries.
fn check_entries_file(text: &str, what: &str) -> Vec<writ_identity::entry::RegistrationEntry> {
    let td = TrustDomain::new("example.org").unwrap();
    let entries = writ_cli::cli::entry_data::parse(text)
        .unwrap_or_else(|e| panic!("{what}: `writ entry create --data` refuses it: {e:#}"));
    assert!(!entries.is_empty(), "{what}: no entries");
    entries
        .into_iter()
        .map(|p| {
            let mut entry = writ_identity::server::admin::entry_from_proto(p, &td)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            entry
                .validate(&td)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            entry
        })
        .collect()
}

/// The ConfigMaps of the manifests, by name: their `.toml` data keys and texts.
fn configmaps(docs: &[(PathBuf, Value)]) -> BTreeMap<String, BTreeMap<String, String>> {
    docs.iter()
        .filter(|(_, d)| kind_of(d) == "ConfigMap")
        .map(|(_, d)| {
            let data = at(d, &["data"])
                .and_then(Value::as_mapping)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().unwrap_or_default().to_owned(),
                                v.as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (name_of(d).to_owned(), data)
        })
        .collect()
}

#[test]
fn manifests_parse_and_hold_every_kind() {
    let docs = manifests();
    let kinds: BTreeSet<&str> = docs.iter().map(|(_, d)| kind_of(d)).collect();
    for expected in [
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "DaemonSet",
        "Deployment",
        "Kustomization",
    ] {
        assert!(kinds.contains(expected), "no {expected} in {kinds:?}");
    }
    let mut names = BTreeSet::new();
    for (path, doc) in &docs {
        let file = shown(path);
        assert!(
            str_at(doc, &["apiVersion"]).is_some_and(|v| !v.is_empty()),
            "{file}: a document without apiVersion"
        );
        let kind = kind_of(doc);
        assert!(!kind.is_empty(), "{file}: a document without kind");
        if kind == "Kustomization" {
            // Every resource it lists is a file beside it.
            for resource in seq(doc, &["resources"]) {
                let name = resource.as_str().unwrap();
                assert!(
                    path.parent().unwrap().join(name).is_file(),
                    "{file}: resource {name} does not exist"
                );
            }
            continue;
        }
        let name = name_of(doc);
        assert!(!name.is_empty(), "{file}: a {kind} without a name");
        assert!(
            names.insert((kind.to_owned(), name.to_owned())),
            "{file}: {kind} {name} is defined twice"
        );
        if !CLUSTER_SCOPED.contains(&kind) {
            assert_eq!(
                str_at(doc, &["metadata", "namespace"]),
                Some(NAMESPACE),
                "{file}: {kind} {name} is not in namespace {NAMESPACE}"
            );
        }
    }
    // Every ConfigMap holds configuration files by name, or the entries file.
    for (name, data) in configmaps(&docs) {
        for (key, text) in &data {
            if key == "entries.json" {
                check_entries_file(text, &format!("ConfigMap {name}, {key}"));
                continue;
            }
            assert!(
                Kind::from_file_name(key).is_some(),
                "ConfigMap {name}: data key {key} is not server.toml, agent.toml, txn.toml \
                 or entries.json"
            );
        }
    }
}

/// A container's view of its pod: mount path -> the pod volume mounted there.
struct Pod<'a> {
    what: String,
    volumes: BTreeMap<&'a str, &'a Value>,
    claim_templates: BTreeSet<&'a str>,
}

impl Pod<'_> {
    /// The mount of `container` that holds `path` (the longest mount path above it) and
    /// the volume mounted there (`None` for a claim template).
    fn mount_for(&self, container: &Value, path: &Path) -> Option<(PathBuf, Option<&Value>)> {
        seq(container, &["volumeMounts"])
            .iter()
            .filter_map(|m| {
                let mount = PathBuf::from(str_at(m, &["mountPath"])?);
                let volume = str_at(m, &["name"])?;
                is_under(path, &mount).then(|| (mount, self.volumes.get(volume).copied()))
            })
            .max_by_key(|(mount, _)| mount.components().count())
    }

    /// Asserts that `path` lies on a mount of `container` whose volume `check` accepts.
    fn assert_on(
        &self,
        container: &Value,
        path: &Path,
        what: &str,
        check: impl Fn(Option<&Value>) -> bool,
    ) {
        let (mount, volume) = self.mount_for(container, path).unwrap_or_else(|| {
            panic!(
                "{}: {what} {} is on no volume mount",
                self.what,
                path.display()
            )
        });
        assert!(
            check(volume),
            "{}: {what} {} is on the mount {}, which is not the kind of volume it needs",
            self.what,
            path.display(),
            mount.display()
        );
    }
}

fn host_path(volume: Option<&Value>) -> Option<&str> {
    volume.and_then(|v| str_at(v, &["hostPath", "path"]))
}

fn is_configmap(volume: Option<&Value>) -> bool {
    volume.is_some_and(|v| at(v, &["configMap"]).is_some())
}

/// Persistent storage: a claim template (no pod volume), a claim, or a host path.
fn is_persistent(volume: Option<&Value>) -> bool {
    volume.is_none_or(|v| {
        at(v, &["persistentVolumeClaim"]).is_some() || at(v, &["hostPath"]).is_some()
    })
}

fn is_writable_dir(volume: Option<&Value>) -> bool {
    volume.is_some_and(|v| at(v, &["emptyDir"]).is_some() || at(v, &["hostPath"]).is_some())
}

/// The `writ` command lines of a container: its command and args (the image's
/// ENTRYPOINT when it has no command), or each `exec .../writ ...` line of a
/// `/bin/sh -c` script; and those of its exec probes.
fn container_commands(container: &Value) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let strings = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|s| s.as_str().expect("command words are strings").to_owned())
            .collect()
    };
    let command = strings(seq(container, &["command"]));
    let args = strings(seq(container, &["args"]));
    let mut runs = Vec::new();
    if command.first().is_some_and(|c| c.ends_with("/sh")) {
        assert_eq!(command.get(1).map(String::as_str), Some("-c"));
        let script = args.first().or(command.get(2)).expect("a shell script");
        for line in script.lines() {
            if let Some(rest) = line.trim().strip_prefix("exec ") {
                assert!(
                    !rest.contains(['"', '\'', '$']),
                    "keep the exec line of a script free of quoting: {rest}"
                );
                runs.push(rest.split_whitespace().map(str::to_owned).collect());
            }
        }
    } else {
        let mut argv = if command.is_empty() {
            image_entrypoint()
        } else {
            command
        };
        argv.extend(args);
        runs.push(argv);
    }
    let probes = ["readinessProbe", "livenessProbe", "startupProbe"]
        .iter()
        .filter_map(|p| at(container, &[p, "exec", "command"]))
        .map(|c| strings(c.as_sequence().unwrap()))
        .collect();
    (runs, probes)
}

#[test]
fn workloads_mount_what_their_configuration_names() {
    let docs = manifests();
    let maps = configmaps(&docs);
    let claims: BTreeSet<&str> = docs
        .iter()
        .filter(|(_, d)| kind_of(d) == "PersistentVolumeClaim")
        .map(|(_, d)| name_of(d))
        .collect();
    let mut ran = BTreeSet::new();
    let mut agent_socket_host_dir = None;
    let mut txn_socket_host_dir = None;
    for (path, doc) in &docs {
        let kind = kind_of(doc);
        if !matches!(kind, "StatefulSet" | "DaemonSet" | "Deployment") {
            continue;
        }
        let what = format!("{} {kind} {}", shown(path), name_of(doc));
        let template = at(doc, &["spec", "template"]).expect("a pod template");
        let labels = at(template, &["metadata", "labels"]).and_then(Value::as_mapping);
        for (k, v) in at(doc, &["spec", "selector", "matchLabels"])
            .and_then(Value::as_mapping)
            .unwrap_or_else(|| panic!("{what}: no selector"))
        {
            assert_eq!(
                labels.and_then(|l| l.get(k)),
                Some(v),
                "{what}: the pod template lacks the selector's label {k:?}"
            );
        }
        let spec = at(template, &["spec"]).expect("a pod spec");
        let pod = Pod {
            what: what.clone(),
            volumes: seq(spec, &["volumes"])
                .iter()
                .map(|v| (str_at(v, &["name"]).unwrap(), v))
                .collect(),
            claim_templates: seq(doc, &["spec", "volumeClaimTemplates"])
                .iter()
                .map(|t| str_at(t, &["metadata", "name"]).unwrap())
                .collect(),
        };
        for volume in pod.volumes.values() {
            if let Some(map) = str_at(volume, &["configMap", "name"]) {
                assert!(
                    maps.contains_key(map) || OPERATOR_CONFIGMAPS.contains(&map),
                    "{what}: ConfigMap {map} is defined nowhere"
                );
            }
            if let Some(claim) = str_at(volume, &["persistentVolumeClaim", "claimName"]) {
                assert!(
                    claims.contains(claim),
                    "{what}: claim {claim} is defined nowhere"
                );
            }
        }
        if kind == "DaemonSet" {
            assert_eq!(
                at(spec, &["hostPID"]).and_then(Value::as_bool),
                Some(true),
                "{what}: the agent reads /proc/<pid> of host pids: hostPID: true"
            );
        }
        for container in seq(spec, &["containers"]) {
            for mount in seq(container, &["volumeMounts"]) {
                let name = str_at(mount, &["name"]).unwrap();
                assert!(
                    pod.volumes.contains_key(name) || pod.claim_templates.contains(name),
                    "{what}: volume {name} is mounted but not declared"
                );
            }
            let (runs, probes) = container_commands(container);
            for argv in probes {
                parse_writ(&argv, &format!("{what}: probe"));
            }
            for argv in runs {
                let words = parse_writ(&argv, &what);
                let config_path =
                    PathBuf::from(flag(&argv, "config").unwrap_or_else(|| {
                        panic!("{what}: `{}` names no --config", argv.join(" "))
                    }));
                let file_name = config_path.file_name().unwrap().to_str().unwrap();
                let (_, volume) = pod
                    .mount_for(container, &config_path)
                    .unwrap_or_else(|| panic!("{what}: {} is on no mount", config_path.display()));
                let map = volume
                    .and_then(|v| str_at(v, &["configMap", "name"]))
                    .unwrap_or_else(|| {
                        panic!("{what}: {} is not from a ConfigMap", config_path.display())
                    });
                let text = maps
                    .get(map)
                    .and_then(|m| m.get(file_name))
                    .unwrap_or_else(|| panic!("{what}: ConfigMap {map} has no key {file_name}"));
                let kind = Kind::from_file_name(file_name).unwrap();
                let base = tempfile::tempdir().unwrap();
                let loaded = load(kind, text, base.path())
                    .unwrap_or_else(|e| panic!("{what}: {map}/{file_name}: {e}"));
                match (words.as_slice(), loaded) {
                    ([s, r], Loaded::Server(config)) if s == "server" && r == "run" => {
                        pod.assert_on(container, &config.data_dir, "data_dir", is_persistent);
                        pod.assert_on(
                            container,
                            &config.admin_socket,
                            "admin_socket",
                            is_writable_dir,
                        );
                        if let writ_identity::server::config::Datastore::Sqlite(file) =
                            &config.datastore
                        {
                            pod.assert_on(container, file, "the SQLite store", is_persistent);
                        }
                    }
                    (
                        [a, r],
                        Loaded::Agent {
                            config,
                            bundle_path,
                        },
                    ) if a == "agent" && r == "run" => {
                        pod.assert_on(container, &config.node.data_dir, "data_dir", |v| {
                            host_path(v).is_some()
                        });
                        let socket = &config.socket_path;
                        pod.assert_on(container, socket, "socket_path", |v| host_path(v).is_some());
                        let (mount, volume) = pod.mount_for(container, socket).unwrap();
                        let host = PathBuf::from(host_path(volume).unwrap())
                            .join(socket.strip_prefix(&mount).unwrap());
                        agent_socket_host_dir = Some(host);
                        let bundle = bundle_path.expect("the agent bootstraps with a bundle");
                        pod.assert_on(container, &bundle, "trust_bundle_path", is_configmap);
                    }
                    ([t, r], Loaded::Txn(config)) if t == "txn" && r == "run" => {
                        let socket = socket_path(&config.workload_api);
                        pod.assert_on(container, &socket, "workload_api", |v| {
                            host_path(v).is_some()
                        });
                        let (mount, volume) = pod.mount_for(container, &socket).unwrap();
                        let host = PathBuf::from(host_path(volume).unwrap())
                            .join(socket.strip_prefix(&mount).unwrap());
                        txn_socket_host_dir = Some(host);
                        let data = config.data_dir.as_ref().expect("the TTS keeps its keys");
                        // A replica that publishes its public keys through the shared
                        // store keeps its private key in its pod; one that does not
                        // needs its keys to survive a restart.
                        if config.identity_store.is_some() {
                            pod.assert_on(container, data, "data_dir", is_writable_dir);
                        } else {
                            pod.assert_on(container, data, "data_dir", is_persistent);
                        }
                        assert!(
                            config.listen.ip().is_unspecified(),
                            "{what}: listen on every address of the pod"
                        );
                    }
                    (words, loaded) => {
                        panic!("{what}: `writ {}` runs with a {loaded:?}", words.join(" "))
                    }
                }
                ran.insert(kind);
            }
        }
    }
    assert_eq!(
        ran,
        BTreeSet::from([Kind::Server, Kind::Agent, Kind::Txn]),
        "a server, an agent and a TTS"
    );
    assert_eq!(
        agent_socket_host_dir, txn_socket_host_dir,
        "the TTS reaches the Workload API socket the agent serves on the host"
    );
}

// ---------------------------------------------------------------------------------------
// TOML files.
// ---------------------------------------------------------------------------------------

#[test]
fn config_files_and_configmaps_load_through_the_real_loaders() {
    let mut loaded = BTreeMap::<Kind, usize>::new();
    let mut failures = Vec::new();
    let mut files = files_under(&deploy_dir(), &[".toml"]);
    files.extend(files_under(&repo().join("examples/config"), &[".toml"]));
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap();
        let Some(kind) = Kind::from_file_name(name) else {
            failures.push(format!(
                "{}: not server.toml, agent.toml or txn.toml",
                shown(&path)
            ));
            continue;
        };
        match load(kind, &read(&path), path.parent().unwrap()) {
            Ok(_) => *loaded.entry(kind).or_default() += 1,
            Err(e) => failures.push(format!("{}: {e}", shown(&path))),
        }
    }
    let docs = manifests();
    for (map, data) in configmaps(&docs) {
        for (key, text) in data {
            let Some(kind) = Kind::from_file_name(&key) else {
                continue; // reported by manifests_parse_and_hold_every_kind
            };
            let base = tempfile::tempdir().unwrap();
            match load(kind, &text, base.path()) {
                Ok(_) => *loaded.entry(kind).or_default() += 1,
                Err(e) => failures.push(format!("ConfigMap {map}, {key}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // examples/config, examples/deploy/config and a ConfigMap for each kind.
    for kind in [Kind::Server, Kind::Agent, Kind::Txn] {
        assert!(
            loaded.get(&kind).copied().unwrap_or(0) >= 3,
            "{kind:?}: fewer files than expected: {loaded:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// ```toml blocks in the docs.
// ---------------------------------------------------------------------------------------

/// A fenced block: the line of its opening fence (from 1), its info string, its text.
struct Block {
    line: usize,
    info: String,
    text: String,
}

fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, usize, String, Vec<&str>)> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let ticks = trimmed.chars().take_while(|c| *c == '`').count();
        match &mut open {
            None if ticks >= 3 => {
                open = Some((
                    index + 1,
                    ticks,
                    trimmed[ticks..].trim().to_owned(),
                    Vec::new(),
                ));
            }
            None => {}
            Some((_, fence, _, _)) if ticks >= *fence && trimmed[ticks..].trim().is_empty() => {
                let (line, _, info, lines) = open.take().unwrap();
                blocks.push(Block {
                    line,
                    info,
                    text: lines.join("\n"),
                });
            }
            Some((_, _, _, lines)) => lines.push(line),
        }
    }
    blocks
}

#[test]
fn docs_toml_blocks_name_their_file_and_load() {
    let mut docs = vec![repo().join("README.md")];
    docs.extend(files_under(&repo().join("docs"), &[".md"]));
    let mut failures = Vec::new();
    let mut found = BTreeMap::<Kind, usize>::new();
    for path in docs {
        let markdown = read(&path);
        for block in fenced_blocks(&markdown) {
            let lang = block.info.split([' ', ',', '{']).next().unwrap_or("");
            if lang != "toml" {
                continue;
            }
            let at = format!("{}:{}", shown(&path), block.line);
            let first = block.text.lines().next().unwrap_or("");
            let Some(kind) = Kind::from_header(first) else {
                failures.push(format!(
                    "{at}: a ```toml block must start with `# server.toml`, `# agent.toml`, \
                     `# txn.toml`, `# helper.conf` or `# policy`; it starts with {first:?}"
                ));
                continue;
            };
            let base = tempfile::tempdir().unwrap();
            match load(kind, &block.text, base.path()) {
                Ok(_) => *found.entry(kind).or_default() += 1,
                Err(e) => failures.push(format!("{at}: does not load as {kind:?}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    for kind in [Kind::Server, Kind::Agent, Kind::Txn, Kind::Policy] {
        assert!(
            found.contains_key(&kind),
            "no {kind:?} block in the docs: {found:?}"
        );
    }
}

#[test]
fn fenced_block_scanner_finds_blocks_and_lines() {
    let blocks =
        fenced_blocks("text\n```toml\n# txn.toml\nlisten = \"x\"\n```\n\n````sh\n```\n````\n");
    assert_eq!(blocks.len(), 2);
    assert_eq!((blocks[0].line, blocks[0].info.as_str()), (2, "toml"));
    assert_eq!(blocks[0].text, "# txn.toml\nlisten = \"x\"");
    assert_eq!(blocks[1].text, "```");
    assert_eq!(
        Kind::from_header("# server.toml: PostgreSQL"),
        Some(Kind::Server)
    );
    assert_eq!(Kind::from_header("#policy"), Some(Kind::Policy));
    assert_eq!(Kind::from_header("trust_domain = \"x\""), None);
    assert_eq!(Kind::from_header("# server"), None);
}

// ---------------------------------------------------------------------------------------
// systemd units.
// ---------------------------------------------------------------------------------------

/// A unit file: section -> (key, value) in order. Comments and blank lines are skipped,
/// and a line ending in `\` continues on the next, as systemd reads them.
fn parse_unit(text: &str, what: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut logical = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if logical.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            logical.push_str(rest);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let entry = std::mem::take(&mut logical);
        if let Some(name) = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')) {
            current = Some(name.to_owned());
            sections.entry(name.to_owned()).or_default();
            continue;
        }
        let (key, value) = entry
            .split_once('=')
            .unwrap_or_else(|| panic!("{what}: not key=value: {entry:?}"));
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("{what}: {key} before any [section]"));
        sections
            .entry(section)
            .or_default()
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    sections
}

fn unit_value<'a>(
    unit: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Option<&'a str> {
    unit.get(section)?
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn systemd_units_run_real_commands_with_their_directories() {
    let units = files_under(&deploy_dir(), &[".service"]);
    let mut seen = BTreeMap::new();
    for path in &units {
        let what = shown(path);
        let unit = parse_unit(&read(path), &what);
        for section in ["Unit", "Service", "Install"] {
            assert!(unit.contains_key(section), "{what}: no [{section}]");
        }
        assert!(
            unit_value(&unit, "Install", "WantedBy").is_some(),
            "{what}: no WantedBy="
        );
        let starts: Vec<_> = unit["Service"]
            .iter()
            .filter(|(k, _)| k == "ExecStart")
            .collect();
        assert_eq!(starts.len(), 1, "{what}: one ExecStart=");
        // systemd's prefixes (`-`, `@`, `+`, `!`, `:`) come before the path.
        let line = starts[0].1.trim_start_matches(['-', '@', '+', '!', ':']);
        assert!(
            !line.contains(['"', '\'', '$', '%']),
            "{what}: keep ExecStart free of quoting and specifiers: {line}"
        );
        let argv: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        assert!(
            argv[0].starts_with('/'),
            "{what}: systemd wants an absolute path"
        );
        let words = parse_writ(&argv, &what);
        assert_eq!(
            unit_value(&unit, "Service", "NoNewPrivileges"),
            Some("yes"),
            "{what}: hardening"
        );
        assert!(
            unit_value(&unit, "Service", "User").is_some(),
            "{what}: no User="
        );
        let config = PathBuf::from(flag(&argv, "config").expect("--config"));
        let file_name = config.file_name().unwrap().to_str().unwrap().to_owned();
        let local = deploy_dir().join("config").join(&file_name);
        assert!(
            local.is_file(),
            "{what}: no examples/deploy/config/{file_name}"
        );
        let kind = Kind::from_file_name(&file_name).unwrap();
        let loaded = load(kind, &read(&local), local.parent().unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", shown(&local)));
        let dir = |root: &str, key: &str| -> PathBuf {
            let value =
                unit_value(&unit, "Service", key).unwrap_or_else(|| panic!("{what}: no {key}="));
            Path::new(root).join(value)
        };
        match (words.join(" ").as_str(), &loaded) {
            ("server run", Loaded::Server(c)) => {
                assert_eq!(
                    c.data_dir,
                    dir("/var/lib", "StateDirectory"),
                    "{what}: data_dir"
                );
                assert_eq!(
                    c.admin_socket.parent(),
                    Some(dir("/run", "RuntimeDirectory").as_path()),
                    "{what}: admin_socket"
                );
            }
            (
                "agent run",
                Loaded::Agent {
                    config,
                    bundle_path,
                },
            ) => {
                assert_eq!(
                    config.node.data_dir,
                    dir("/var/lib", "StateDirectory"),
                    "{what}"
                );
                assert_eq!(
                    config.socket_path.parent(),
                    Some(dir("/run", "RuntimeDirectory").as_path()),
                    "{what}: socket_path"
                );
                assert_eq!(
                    unit_value(&unit, "Service", "RuntimeDirectoryMode"),
                    Some("0755"),
                    "{what}: workloads of every uid reach the socket directory"
                );
                assert!(
                    bundle_path.is_some(),
                    "{what}: the agent bootstraps with a bundle"
                );
            }
            ("txn run", Loaded::Txn(c)) => {
                assert_eq!(
                    c.data_dir,
                    Some(dir("/var/lib", "StateDirectory")),
                    "{what}"
                );
                assert_eq!(
                    c.audit_log.as_deref().and_then(Path::parent),
                    Some(dir("/var/log", "LogsDirectory").as_path()),
                    "{what}: audit_log"
                );
            }
            (words, loaded) => panic!("{what}: `writ {words}` runs with a {loaded:?}"),
        }
        seen.insert(words.join(" "), loaded);
    }
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["agent run", "server run", "txn run"])
    );
    // The TTS's Workload API is the socket the agent unit serves.
    let (Some(Loaded::Agent { config: agent, .. }), Some(Loaded::Txn(txn))) =
        (seen.get("agent run"), seen.get("txn run"))
    else {
        unreachable!()
    };
    assert_eq!(socket_path(&txn.workload_api), agent.socket_path);
}

// ---------------------------------------------------------------------------------------
// The Dockerfile.
// ---------------------------------------------------------------------------------------

struct Dockerfile {
    /// `FROM` of every stage.
    froms: Vec<String>,
    /// `COPY` lines of the final stage.
    copies: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn dockerfile() -> Dockerfile {
    let path = deploy_dir().join("docker/Dockerfile");
    let mut out = Dockerfile {
        froms: Vec::new(),
        copies: Vec::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
    };
    let mut logical = String::new();
    for raw in read(&path).lines() {
        let line = raw.trim();
        if logical.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            logical.push_str(rest);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let instruction = std::mem::take(&mut logical);
        let (word, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        let exec_form = |rest: &str| -> Vec<String> {
            serde_json::from_str(rest.trim())
                .unwrap_or_else(|e| panic!("Dockerfile: use the exec (JSON) form: {rest}: {e}"))
        };
        match word.to_ascii_uppercase().as_str() {
            // A new stage starts over.
            "FROM" => {
                out.froms.push(rest.trim().to_owned());
                out.copies.clear();
                out.entrypoint.clear();
                out.cmd.clear();
            }
            "COPY" => out.copies.push(rest.trim().to_owned()),
            "ENTRYPOINT" => out.entrypoint = exec_form(rest),
            "CMD" => out.cmd = exec_form(rest),
            _ => {}
        }
    }
    out
}

#[test]
fn dockerfile_builds_offline_from_the_context_script_and_runs_a_real_command() {
    let docker = dockerfile();
    // No registry is needed: one stage FROM scratch, whose files context.sh prepares.
    assert_eq!(docker.froms, ["scratch"], "one stage, FROM scratch");
    let script = read(&deploy_dir().join("docker/context.sh"));
    for copy in &docker.copies {
        let source = copy
            .split_whitespace()
            .find(|w| !w.starts_with("--"))
            .expect("COPY has a source");
        let dir = source.trim_end_matches('/');
        assert!(
            script.contains(&format!("$out/{dir}")),
            "COPY {source}: context.sh does not make {dir}/"
        );
    }
    assert!(script.contains("ldd"), "context.sh copies the libraries");
    let mut argv = docker.entrypoint.clone();
    argv.extend(docker.cmd.clone());
    let words = parse_writ(&argv, "Dockerfile ENTRYPOINT + CMD");
    assert_eq!(words, ["server", "run"]);
    let config = flag(&argv, "config").expect("--config");
    assert!(
        deploy_dir()
            .join("config")
            .join(Path::new(&config).file_name().unwrap())
            .is_file()
    );
}

// ---------------------------------------------------------------------------------------
// The Compose example.
// ---------------------------------------------------------------------------------------

/// `${NAME:-default}` in a Compose string, replaced by the default (as Compose does
/// when the variable is unset).
fn compose_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let inner = &rest[start + 2..];
        let end = inner.find('}').expect("closing brace");
        let default = inner[..end].split_once(":-").map_or("", |(_, d)| d);
        out.push_str(default);
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn compose_services_run_real_commands_and_mount_files_that_exist() {
    let dir = deploy_dir().join("compose");
    let text = compose_defaults(&read(&dir.join("compose.yaml")));
    let compose: Value = serde_norway::from_str(&text).expect("compose.yaml is YAML");
    let services = at(&compose, &["services"])
        .and_then(Value::as_mapping)
        .expect("services");
    let mut words_seen = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let strings = |v: &[Value]| -> Vec<String> {
            v.iter().map(|s| s.as_str().unwrap().to_owned()).collect()
        };
        let mut argv = image_entrypoint();
        argv.extend(strings(seq(service, &["command"])));
        let words = parse_writ(&argv, &format!("compose service {name}"));
        words_seen.insert(words.join(" "));
        let check = strings(seq(service, &["healthcheck", "test"]));
        if let Some(("CMD", probe)) = check.split_first().map(|(a, b)| (a.as_str(), b)) {
            parse_writ(probe, &format!("compose service {name}: healthcheck"));
        }
        for volume in seq(service, &["volumes"]) {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with("./") && !source.ends_with("/demo") {
                assert!(
                    dir.join(source).exists(),
                    "compose service {name} mounts {source}, which does not exist"
                );
            }
        }
    }
    let entries = check_entries_file(
        &read(&dir.join("config/entries.json")),
        "compose/config/entries.json",
    );
    // The entries hang under the node alias the one-shot `join` makes with the token.
    let join = services
        .get("join")
        .map(|s| seq(s, &["command"]))
        .expect("a join service");
    let alias = join
        .iter()
        .position(|w| w.as_str() == Some("--spiffe-id"))
        .and_then(|i| join.get(i + 1))
        .and_then(Value::as_str)
        .expect("join names the node alias");
    assert!(
        entries.iter().all(|e| e.parent_id.as_str() == alias),
        "every Compose entry's parent is {alias}"
    );
    assert!(
        entries.iter().any(|e| e.is_template()),
        "the Compose entries show a template"
    );
    for expected in [
        "server run",
        "token generate",
        "entry create",
        "agent run",
        "txn run",
        "exchange",
    ] {
        assert!(
            words_seen.contains(expected),
            "no compose service runs `writ {expected}`: {words_seen:?}"
        );
    }
}
