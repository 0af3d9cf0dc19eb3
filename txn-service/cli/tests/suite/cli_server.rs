//! `writ server run` and its CLI, end to end, as a user would drive them: real processes,
//! a real SQLite store on disk, OpenSSL, the Rust `spiffe` crate and josekit as
//! independent checkers.

use std::process::Command;

use crate::common::{Server, WRIT, openssl, start_agent};

#[test]
fn minted_x509_svid_passes_openssl() {
    let server = Server::start();
    let out = server.dir.path().join("svid");
    server.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/agents/planner",
        "--write",
        out.to_str().unwrap(),
    ]);
    let (svid, bundle, key) = (
        out.join("svid.pem"),
        out.join("bundle.pem"),
        out.join("key.pem"),
    );
    let verify = openssl(&[
        "verify",
        "-CAfile",
        bundle.to_str().unwrap(),
        svid.to_str().unwrap(),
    ]);
    assert!(verify.trim_end().ends_with(": OK"), "{verify}");

    let text = openssl(&["x509", "-in", svid.to_str().unwrap(), "-noout", "-text"]);
    assert_eq!(
        text.matches("URI:").count(),
        1,
        "exactly one URI SAN:\n{text}"
    );
    assert!(text.contains("URI:spiffe://example.org/agents/planner"));
    assert!(text.contains("CA:FALSE"));
    assert!(text.contains("X509v3 Key Usage: critical"));
    let ku = text
        .split("X509v3 Key Usage: critical")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap();
    assert_eq!(ku.trim(), "Digital Signature");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"));

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The key matches the certificate.
    let cert_pub = openssl(&["x509", "-in", svid.to_str().unwrap(), "-noout", "-pubkey"]);
    let key_pub = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    assert_eq!(cert_pub, key_pub);
}

#[test]
fn rust_spiffe_and_josekit_accept_minted_svids() {
    let server = Server::start();
    let out = server.dir.path().join("svid");
    server.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--write",
        out.to_str().unwrap(),
    ]);
    let chain: Vec<u8> = pem::parse_many(std::fs::read(out.join("svid.pem")).unwrap())
        .unwrap()
        .into_iter()
        .flat_map(|p| p.into_contents())
        .collect();
    let key = pem::parse(std::fs::read(out.join("key.pem")).unwrap())
        .unwrap()
        .into_contents();
    let svid =
        spiffe::X509Svid::parse_from_der(&chain, &key).expect("rust-spiffe accepts the X509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/w");

    let token = server.ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--audience",
        "tool-server",
    ]);
    let token = token.trim();
    let bundle: serde_json::Value =
        serde_json::from_str(&server.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    // The JWT part of the SPIFFE bundle, as a JWKS.
    let jwt_keys: Vec<serde_json::Value> = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .cloned()
        .collect();
    assert!(!jwt_keys.is_empty());
    let jwks = serde_json::json!({ "keys": jwt_keys }).to_string();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(spiffe::JwtBundle::from_jwt_authorities(td, jwks.as_bytes()).unwrap());
    let jwt = spiffe::JwtSvid::parse_and_validate(token, &set, &["tool-server"])
        .expect("rust-spiffe validates");
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/w");
    assert!(spiffe::JwtSvid::parse_and_validate(token, &set, &["someone-else"]).is_err());

    // josekit (OpenSSL) verifies the signature on its own.
    let jwk_value = &jwt_keys[0];
    let mut jwk_map = jwk_value.as_object().unwrap().clone();
    jwk_map.remove("use");
    let jwk = josekit::jwk::Jwk::from_map(jwk_map).unwrap();
    let verifier = josekit::jws::ES256.verifier_from_jwk(&jwk).unwrap();
    let (payload, header) =
        josekit::jwt::decode_with_verifier(token, &verifier).expect("josekit verifies");
    assert_eq!(header.token_type(), Some("JWT"));
    assert_eq!(payload.subject(), Some("spiffe://example.org/w"));
    assert!(header.key_id().is_some());
}

#[test]
fn entries_ca_and_jwt_keys_survive_restart() {
    let mut server = Server::start();
    let (_agent, _, agent_id) = start_agent(&server);
    let created: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/agents/planner",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:user:alice",
        "--x509-svid-ttl",
        "10m",
        "--spawn-max-ttl",
        "5m",
        "--spawn-max-depth",
        "2",
        "--spawn-max-children",
        "4",
        "--output",
        "json",
    ]))
    .unwrap();
    let entry_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["revision"], 1);
    assert_eq!(created["x509_svid_ttl"], 600);
    assert_eq!(created["spawn_max_ttl"], 300);
    assert_eq!(created["spawn_max_depth"], 2);
    assert_eq!(created["spawn_max_children"], 4);
    let bundle = server.ok(&["bundle", "show", "--format", "spiffe"]);
    let token = server.ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--audience",
        "a",
    ]);

    server.restart();

    let shown: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--entry-id",
        &entry_id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown, created);
    assert_eq!(
        server.ok(&["bundle", "show", "--format", "spiffe"]),
        bundle,
        "same CA and JWT keys"
    );
    let td = TrustDomainBundle::from_json(&bundle);
    td.validate_jwt(token.trim(), "a");

    // update bumps the revision and keeps what was not given.
    let updated: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "update",
        "--entry-id",
        &entry_id,
        "--hint",
        "planner",
        "--spawn-max-children",
        "8",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(updated["revision"], 2);
    assert_eq!(updated["hint"], "planner");
    assert_eq!(updated["spawn_max_children"], 8);
    assert_eq!(updated["spawn_max_depth"], 2);
    assert_eq!(updated["selectors"], created["selectors"]);

    // An update that changes nothing stores nothing and keeps the revision.
    let same: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "update",
        "--entry-id",
        &entry_id,
        "--hint",
        "planner",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(same, updated, "no new revision for no change");
    // DNS names can be set and cleared again.
    let named: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "update",
        "--entry-id",
        &entry_id,
        "--dns-name",
        "planner.example.org",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        named["dns_names"],
        serde_json::json!(["planner.example.org"])
    );
    assert_eq!(named["revision"], 3);
    let cleared: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "update",
        "--entry-id",
        &entry_id,
        "--clear-dns-names",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(cleared["dns_names"], serde_json::json!([]));
    assert_eq!(cleared["revision"], 4);
    // An update into the reserved namespace is refused and changes nothing.
    let err = server.fails(&[
        "entry",
        "update",
        "--entry-id",
        &entry_id,
        "--spiffe-id",
        "spiffe://example.org/writ/agent/x",
    ]);
    assert!(
        err.contains("--spiffe-id: spiffe://example.org/writ/agent/x is in the reserved namespace"),
        "{err}"
    );
    let shown: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--entry-id",
        &entry_id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown, cleared);
    server.ok(&["entry", "delete", "--entry-id", &entry_id]);
    assert_eq!(server.entry_count(), 0);
}

/// Validation of a JWT-SVID with Writ's own validator, from the printed bundle.
struct TrustDomainBundle(writ_identity::bundle::BundleSet);

impl TrustDomainBundle {
    fn from_json(json: &str) -> Self {
        let td = writ_identity::spiffe_id::TrustDomain::new("example.org").unwrap();
        Self(writ_identity::bundle::BundleSet::of(
            writ_identity::bundle::Bundle::from_json(td, json).unwrap(),
        ))
    }

    fn validate_jwt(&self, token: &str, aud: &str) {
        writ_identity::svid::jwt::validate(token, &[aud], &self.0, std::time::SystemTime::now())
            .unwrap();
    }
}

#[test]
fn bad_input_gives_one_line_and_stores_nothing() {
    let server = Server::start();
    let (_agent, _, agent_id) = start_agent(&server);
    let base = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:1",
    ];
    server.ok(&base);
    assert_eq!(server.entry_count(), 1);

    let err = server.fails(&base);
    assert!(err.contains("already exists"), "{err}");
    let bad_cases: &[(&[&str], &str)] = &[
        (&["--spiffe-id", "spiffe://Example.org/w"], "trust domain"),
        (
            &["--spiffe-id", "spiffe://example.org/a/../b"],
            "dot segments",
        ),
        (&["--spiffe-id", "https://example.org/w"], "scheme"),
        (
            &["--spiffe-id", "spiffe://other.org/w"],
            "not in trust domain",
        ),
        (&["--parent-id", "spiffe://example.org/"], "trailing slash"),
        (&["--selector", "nocolon"], "type:value"),
        (&["--selector", "unix:"], "value is empty"),
        (&["--x509-svid-ttl", "soon"], "duration"),
        (&["--x509-svid-ttl", "9999h"], "at most"),
        (&["--dns-name", "bad_name!"], "DNS"),
        (
            &["--spawn-max-depth", "0"],
            "--spawn-max-depth: must be between",
        ),
        (
            &["--spawn-max-children", "0"],
            "--spawn-max-children: must be between",
        ),
        (&["--spawn-max-children", "1025"], "--spawn-max-children"),
        // Writ's own namespace.
        (
            &["--spiffe-id", "spiffe://example.org/writ/server"],
            "error: --spiffe-id: spiffe://example.org/writ/server is in the reserved \
             namespace spiffe://example.org/writ/ (Writ's own identities)",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/writ/agent/join_token/x",
            ],
            "--spiffe-id: spiffe://example.org/writ/agent/join_token/x is in the reserved",
        ),
        (
            &["--spiffe-id", "spiffe://example.org/writ/tts"],
            "is in the reserved namespace",
        ),
        // What cannot be meant.
        (
            &["--spiffe-id", "spiffe://example.org"],
            "--spiffe-id: spiffe://example.org is the trust domain itself",
        ),
        (
            &["--parent-id", "spiffe://other.org/agent"],
            "--parent-id: SPIFFE ID spiffe://other.org/agent is not in trust domain example.org",
        ),
        (
            &["--parent-id", "spiffe://example.org/x"],
            "--parent-id: an entry cannot be its own parent",
        ),
        (
            &["--parent-id", "spiffe://example.org/nobody"],
            "--parent-id: nothing holds spiffe://example.org/nobody",
        ),
        (
            &["--selector", "unix:uid:"],
            "--selector: unix:uid:: uid must be a decimal",
        ),
        (
            &["--selector", "unix:uid:abc"],
            "uid must be a decimal number",
        ),
        (
            &["--selector", "unix:uid:-1"],
            "uid must be a decimal number",
        ),
        (
            &["--selector", "unix:uid:4294967296"],
            "uid must be a decimal number",
        ),
        (
            &["--selector", "writ:dev:self"],
            "--selector: writ:dev:self: the selector type writ is Writ's own",
        ),
        (
            &["--selector", "uid:0"],
            "--selector: uid:0 has no selector type (did you mean unix:uid:0?)",
        ),
        (
            &["--spawn-max-ttl", "5m"],
            "--spawn-max-depth: is required with --spawn-max-ttl",
        ),
    ];
    for (change, expect) in bad_cases {
        let mut args: Vec<&str> = vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--parent-id",
            &agent_id,
            "--selector",
            "unix:uid:2",
        ];
        // Replace the flag's value if present, else add it.
        let (flag, value) = (change[0], change[1]);
        if let Some(i) = args.iter().position(|a| *a == flag) {
            args[i + 1] = value;
        } else {
            args.extend_from_slice(change);
        }
        let err = server.fails(&args);
        assert!(
            err.contains(expect),
            "for {change:?} expected {expect:?} in {err:?}"
        );
    }
    // Only `writ dev` has a default parent.
    let err = server.fails(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/y",
        "--selector",
        "unix:uid:3",
    ]);
    assert!(err.contains("--parent-id: is required"), "{err}");
    let err = server.fails(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/y",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:3",
        "--selector",
        "unix:uid:3",
    ]);
    assert!(
        err.contains("--selector: unix:uid:3 is given twice"),
        "{err}"
    );
    assert_eq!(
        server.entry_count(),
        1,
        "nothing stored by any failed command"
    );
    // A selector type no attestor of Writ produces is stored, with a warning.
    let out = server.writ(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/aws",
        "--parent-id",
        &agent_id,
        "--selector",
        "aws_iid:tag:team:a",
    ]);
    assert!(out.status.success());
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.starts_with("warning: --selector aws_iid:tag:team:a:"),
        "{warning}"
    );
    assert!(warning.contains("known: unix, docker, k8s"), "{warning}");
    assert_eq!(warning.trim_end().lines().count(), 1, "{warning}");
    assert_eq!(server.entry_count(), 2);

    let err = server.fails(&["x509", "mint", "--spiffe-id", "not-an-id"]);
    assert!(err.contains("scheme"), "{err}");
    // Nothing is minted in Writ's own namespace.
    for id in [
        "spiffe://example.org/writ/server",
        "spiffe://example.org/writ/agent/join_token/x",
    ] {
        let reserved = format!(
            "error: --spiffe-id: {id} is in the reserved namespace spiffe://example.org/writ/ \
             (Writ's own identities)"
        );
        let err = server.fails(&["x509", "mint", "--spiffe-id", id]);
        assert_eq!(err.trim_end(), reserved);
        let err = server.fails(&["jwt", "mint", "--spiffe-id", id, "--audience", "a"]);
        assert_eq!(err.trim_end(), reserved);
    }
    let err = server.fails(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--audience",
        "",
    ]);
    assert!(err.contains("audience"), "{err}");
    let err = server.fails(&["entry", "show", "--entry-id", "no-such-entry"]);
    assert!(err.contains("not found"), "{err}");
    let err = server.fails(&["entry", "show", "--entry-id", "../../etc"]);
    assert!(err.contains("id"), "{err}");
}

#[test]
fn every_command_has_help_and_unreachable_server_is_one_line() {
    for cmd in [
        vec!["--help"],
        vec!["server", "run", "--help"],
        vec!["entry", "create", "--help"],
        vec!["entry", "list", "--help"],
        vec!["entry", "show", "--help"],
        vec!["entry", "update", "--help"],
        vec!["entry", "delete", "--help"],
        vec!["token", "generate", "--help"],
        vec!["bundle", "show", "--help"],
        vec!["x509", "mint", "--help"],
        vec!["jwt", "mint", "--help"],
        vec!["healthcheck", "--help"],
        vec!["agent", "run", "--help"],
        vec!["agent", "list", "--help"],
        vec!["agent", "show", "--help"],
        vec!["agent", "evict", "--help"],
        vec!["agent", "ban", "--help"],
        vec!["api", "fetch", "x509", "--help"],
        vec!["api", "fetch", "jwt", "--help"],
        vec!["api", "validate", "jwt", "--help"],
        vec!["api", "watch", "--help"],
    ] {
        let out = Command::new(WRIT).args(&cmd).output().unwrap();
        assert!(out.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{cmd:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(WRIT)
        .args(["healthcheck", "--server-socket"])
        .arg(dir.path().join("nothing.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: cannot reach the server"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
}

#[test]
fn join_tokens_are_generated_and_stored_hashed() {
    let server = Server::start();
    let out = server.ok(&["token", "generate", "--ttl", "5m"]);
    let token = out.trim().strip_prefix("Token: ").unwrap();
    assert_eq!(token.len(), 36);
    // The token text is nowhere in the database file.
    let db = std::fs::read(server.dir.path().join("data/datastore.sqlite3")).unwrap();
    let wal =
        std::fs::read(server.dir.path().join("data/datastore.sqlite3-wal")).unwrap_or_default();
    let needle = token.as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle));
    assert!(!wal.windows(needle.len()).any(|w| w == needle));
    server.fails(&["token", "generate", "--ttl", "9999h"]);
}

#[test]
fn server_runs_on_postgresql_and_keeps_state_across_restart() {
    let Some(pg) = writ_identity::store::pg_harness::TempPostgres::start().unwrap() else {
        return; // skipped with a message (WRIT_REQUIRE_ALL=1 turns this into a failure)
    };
    let config = format!(
        "[datastore]\nbackend = \"postgres\"\nconnection = \"{}\"\n",
        pg.url()
    );
    let mut server = Server::start_with_config(&config);
    let (_agent, _, agent_id) = start_agent(&server);
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/pg",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:7",
    ]);
    let bundle = server.ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(
        !server.dir.path().join("data/datastore.sqlite3").exists(),
        "no SQLite file when PostgreSQL is configured"
    );
    server.restart();
    assert_eq!(server.entry_count(), 1);
    assert_eq!(server.ok(&["bundle", "show", "--format", "spiffe"]), bundle);
    let err = server.fails(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/pg",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:7",
    ]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    for (config, expect) in [
        ("nonsense = 1", "unknown field"),
        ("[ca]\nttl = \"soon\"", "ca.ttl"),
        ("trust_domain = \"Bad TD\"", "trust_domain"),
        ("[datastore]\nbackend = \"mysql\"", "datastore.backend"),
    ] {
        let path = dir.path().join("server.toml");
        std::fs::write(&path, config).unwrap();
        let out = Command::new(WRIT)
            .args(["server", "run", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--server-socket")
            .arg(dir.path().join("s.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{config}");
        let err = String::from_utf8(out.stderr).unwrap();
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(expect),
            "{config}: {err}"
        );
    }
}

/// `writ token generate --spiffe-id --out-dir`: the token and bundle on disk (the token
/// 0600), and a node alias selecting the token's agent; a bad alias stores nothing.
#[test]
fn join_token_with_a_node_alias_and_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let server = Server::start();
    let dir = server.dir.path().join("bootstrap");
    let out: serde_json::Value = serde_json::from_str(&server.ok(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://example.org/node/a",
        "--out-dir",
        dir.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let token = std::fs::read_to_string(dir.join("join-token")).unwrap();
    let token = token.trim();
    assert!(!token.is_empty());
    let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("join-token"), 0o600);
    assert_eq!(mode("bundle.pem"), 0o644);
    assert!(
        std::fs::read_to_string(dir.join("bundle.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    // The token is never printed with --out-dir, only its SHA-256.
    let printed = out.to_string();
    assert!(!printed.contains(token), "{printed}");
    let alias_id = out["alias_entry_id"].as_str().unwrap();
    let alias: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--entry-id",
        alias_id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(alias["parent_id"], "spiffe://example.org/writ/server");
    assert_eq!(
        alias["selectors"][0],
        format!("join_token:{}", out["token_sha256"].as_str().unwrap())
    );

    // An alias in the reserved namespace or another trust domain: refused, nothing stored.
    let before = server.entry_count();
    for bad in [
        "spiffe://example.org/writ/x",
        "spiffe://other.org/x",
        "not-an-id",
    ] {
        let err = server.fails(&["token", "generate", "--spiffe-id", bad]);
        assert!(err.contains("spiffe_id"), "{bad}: {err}");
    }
    assert_eq!(server.entry_count(), before);
}

/// `writ entry create --data`: every entry of the file, a second run finds them there,
/// a malformed file creates nothing.
#[test]
fn entries_from_a_data_file() {
    let server = Server::start();
    let (_agent, _, agent_id) = start_agent(&server);
    let file = server.dir.path().join("entries.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"entries": [
                {{"spiffe_id": "spiffe://example.org/web", "parent_id": "{agent_id}",
                  "selectors": [{{"type": "unix", "value": "uid:1000"}}], "x509_svid_ttl": 600}},
                {{"spiffe_id_template": "spiffe://example.org/apps/{{docker:label:app}}",
                  "parent_id": "{agent_id}", "selectors": []}}
            ]}}"#
        ),
    )
    .unwrap();
    let data = file.to_str().unwrap();
    let first = server.ok(&["entry", "create", "--data", data]);
    assert_eq!(first.matches("created").count(), 2, "{first}");
    assert_eq!(server.entry_count(), 2);
    let again = server.ok(&["entry", "create", "--data", data]);
    assert_eq!(again.matches("exists").count(), 2, "{again}");
    assert_eq!(server.entry_count(), 2);

    // One bad entry fails alone (exit 1) and names itself; the file's others are made.
    std::fs::write(
        &file,
        format!(
            r#"{{"entries": [
                {{"spiffe_id": "spiffe://example.org/writ/no", "parent_id": "{agent_id}",
                  "selectors": [{{"type": "unix", "value": "uid:1"}}]}},
                {{"spiffe_id": "spiffe://example.org/ok", "parent_id": "{agent_id}",
                  "selectors": [{{"type": "unix", "value": "uid:2"}}]}}
            ]}}"#
        ),
    )
    .unwrap();
    let out = server.writ(&["entry", "create", "--data", data]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spiffe://example.org/writ/no"));
    assert_eq!(server.entry_count(), 3);

    // Garbage: refused as a whole, nothing created.
    std::fs::write(&file, "{\"entries\": [{\"spiffe_id\": 1}]}").unwrap();
    let err = server.fails(&["entry", "create", "--data", data]);
    assert!(err.contains("not an entries file"), "{err}");
    assert_eq!(server.entry_count(), 3);
    // --data with entry flags is refused.
    server.fails(&[
        "entry",
        "create",
        "--data",
        data,
        "--selector",
        "unix:uid:1",
    ]);
}

/// A second `writ server run` on the data dir of a running one is refused in one line
/// (a SQLite store serves one server), and the first keeps serving.
#[test]
fn a_second_server_on_one_sqlite_store_is_refused() {
    let server = Server::start();
    let out = Command::new(WRIT)
        .args(["server", "run", "--config"])
        .arg(server.dir.path().join("server.toml"))
        .arg("--data-dir")
        .arg(server.dir.path().join("data"))
        .arg("--server-socket")
        .arg(server.dir.path().join("second.sock"))
        .args(["--bind-address", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("serves one identity server") && err.contains("pid"),
        "{err}"
    );
    // The first is untouched.
    assert_eq!(server.entry_count(), 0);
}
