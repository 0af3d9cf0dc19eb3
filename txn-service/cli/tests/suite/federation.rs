//! SPIFFE federation end to end: two `writ dev` of different trust domains
//! (`example.org`, `partner.test`) federate both ways with `writ federation create`
//! (https_spiffe, bootstrap bundle from `writ bundle show --format spiffe`); a workload
//! in one authenticates a workload in the other over SDK mTLS (writ-sdk `X509Source` on
//! each agent socket, authorizers naming the other trust domain); the Rust `spiffe` crate
//! validates a JWT-SVID of the other domain with the JWT bundles the agent serves
//! (`FetchJWTBundles`, federated included); deleting the federation and the bundle stops
//! it. Refused input (a second relationship, the own trust domain, deleting a bundle a
//! relationship refreshes) says why.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use writ_sdk::TrustDomain;
use writ_sdk::tls::Authorizer;
use writ_sdk::workload::{WorkloadClient, X509Source};

use crate::common::{WRIT, uid};

/// A running `writ dev`, killed on drop.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    state: Value,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    fn start(trust_domain: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(WRIT)
            .args(["dev", "--trust-domain", trust_domain, "--data-dir"])
            .arg(dir.path())
            .args(["--tts-listen", "127.0.0.1:0"])
            .env("WRIT_LOG", "warn,writ_identity::server::federation=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let state_file = dir.path().join("dev.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        let state = loop {
            if let Ok(text) = std::fs::read_to_string(&state_file)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "writ dev ({trust_domain}) never wrote dev.json"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Self { child, dir, state }
    }

    fn field(&self, name: &str) -> String {
        self.state[name]
            .as_str()
            .unwrap_or_else(|| panic!("dev.json has no {name}: {}", self.state))
            .to_owned()
    }

    fn writ(&self, args: &[&str]) -> Output {
        Command::new(WRIT)
            .args(args)
            .env("WRIT_SERVER_SOCKET", self.field("server_socket"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.writ(args);
        assert!(
            out.status.success(),
            "writ {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.writ(args);
        assert!(!out.status.success(), "writ {args:?} succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    fn bundle_file(&self) -> PathBuf {
        let path = self.dir.path().join("own-bundle.json");
        std::fs::write(&path, self.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
        path
    }

    /// `writ federation create` with `other`, bootstrapped from its bundle.
    fn federate_with(&self, other: &Dev) {
        let bundle = other.bundle_file();
        let created = self.ok(&[
            "federation",
            "create",
            "--trust-domain",
            &other.field("trust_domain"),
            "--bundle-endpoint-url",
            &other.field("bundle_endpoint_url"),
            "--bundle-endpoint-profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            &other.field("bundle_endpoint_spiffe_id"),
            "--trust-domain-bundle-path",
            bundle.to_str().unwrap(),
            "--trust-domain-bundle-format",
            "spiffe",
            "--output",
            "json",
        ]);
        let created: Value = serde_json::from_str(&created).unwrap();
        assert_eq!(created["has_bundle"], true, "{created}");
    }

    fn show(&self, td: &str) -> Value {
        serde_json::from_str(&self.ok(&[
            "federation",
            "show",
            "--trust-domain",
            td,
            "--output",
            "json",
        ]))
        .unwrap()
    }

    fn entry(&self, spiffe_id: &str, federates_with: &str) {
        self.ok(&[
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--selector",
            &format!("unix:uid:{}", uid()),
            "--federates-with",
            federates_with,
        ]);
    }

    fn workload_api(&self) -> String {
        self.field("workload_api")
    }
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn source(dev: &Dev, id: &str) -> X509Source {
    X509Source::builder()
        .endpoint(dev.workload_api())
        .spiffe_id(writ_sdk::SpiffeId::new(id).unwrap())
        .build()
        .await
        .unwrap()
}

/// One mTLS exchange: a server on `server` (accepting `server_accepts`) and a client on
/// `client` (accepting `client_accepts`); returns the SPIFFE ID the server saw, or the
/// client's error.
fn mtls(
    server: &X509Source,
    server_accepts: Authorizer,
    client: &X509Source,
    client_accepts: Authorizer,
) -> Result<String, String> {
    let server_config = Arc::new(writ_sdk::tls::server_config(server, server_accepts).unwrap());
    let client_config = Arc::new(writ_sdk::tls::client_config(client, client_accepts).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::thread::spawn(move || -> Result<String, String> {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let conn = rustls::ServerConnection::new(server_config).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut line = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let peer = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or("no client certificate")?;
        let id = writ_sdk::spiffe::svid::x509::check_leaf(&peer)
            .map_err(|e| e.to_string())?
            .spiffe_id;
        tls.write_all(b"hello\n").map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        Ok(id.to_string())
    });
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn = rustls::ClientConnection::new(
        client_config,
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let client_result = (|| -> Result<(), String> {
        tls.write_all(b"hi\n").map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line != "hello\n" {
            return Err(format!("server said {line:?}"));
        }
        Ok(())
    })();
    drop(tls);
    let server_result = served.join().unwrap();
    client_result?;
    server_result
}

/// The trust domains py-spiffe (the PyPI `spiffe` package) sees at `dev`'s agent:
/// `FetchX509Bundles`, the X.509 context's bundle set and `FetchJWTBundles`. `None` when
/// Python is absent (a skip, or a failure under `WRIT_REQUIRE_ALL=1`).
fn py_spiffe_bundles(dev: &Dev) -> Option<Value> {
    let py = writ_tests::python::python();
    if !writ_tests::available("python3 with py-spiffe", py.is_some()) {
        return None;
    }
    let py = py?;
    const SCRIPT: &str = r#"
import json, sys
from spiffe import WorkloadApiClient

def names(bundle_set):
    bundles = bundle_set.bundles
    bundles = bundles() if callable(bundles) else bundles
    return sorted(b.trust_domain.name for b in bundles)

with WorkloadApiClient(socket_path=sys.argv[1], default_timeout=10.0) as client:
    print(json.dumps({
        "x509": names(client.fetch_x509_bundles()),
        "context": names(client.fetch_x509_context().x509_bundle_set),
        "jwt": names(client.fetch_jwt_bundles()),
    }))
"#;
    let out = Command::new(&py.exe)
        .args(["-c", SCRIPT, &dev.workload_api()])
        .env("PYTHONPATH", &py.site)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// The trust domains in the SPIFFE validator config of the `ALL` secret that `dev`'s
/// agent serves over Envoy SDS (`FetchSecrets`, the official message shapes).
async fn sds_all_trust_domains(dev: &Dev) -> Vec<String> {
    use prost::Message;
    use writ_identity::proto::envoy::extensions::transport_sockets::tls::v3 as tls;
    use writ_identity::proto::envoy::service::discovery::v3 as discovery;
    use writ_identity::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

    let socket = PathBuf::from(dev.workload_api().trim_start_matches("unix://"));
    let channel = writ_tests::uds_channel(socket).await;
    let response = SecretDiscoveryServiceClient::new(channel)
        .fetch_secrets(discovery::DiscoveryRequest {
            resource_names: vec!["ALL".to_owned()],
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
                .to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.resources.len(), 1, "{response:?}");
    let secret = tls::Secret::decode(response.resources[0].value.as_slice()).unwrap();
    let Some(tls::secret::Type::ValidationContext(context)) = secret.r#type else {
        panic!("ALL is not a validation context: {secret:?}");
    };
    let typed = context
        .custom_validator_config
        .and_then(|c| c.typed_config)
        .expect("the SPIFFE validator config");
    let config = tls::SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
    let mut names: Vec<String> = config.trust_domains.into_iter().map(|t| t.name).collect();
    names.sort();
    names
}

#[test]
fn two_trust_domains_federate_both_ways_and_stop_when_deleted() {
    let a = Dev::start("example.org");
    let b = Dev::start("partner.test");
    assert!(
        a.field("bundle_endpoint_url")
            .starts_with("https://127.0.0.1:")
    );
    assert_eq!(
        b.field("bundle_endpoint_spiffe_id"),
        "spiffe://partner.test/writ/server"
    );

    a.federate_with(&b);
    b.federate_with(&a);
    // The refresh reaches the other's endpoint over https_spiffe.
    for (dev, other) in [(&a, "partner.test"), (&b, "example.org")] {
        let refreshed = dev.ok(&[
            "federation",
            "refresh",
            "--trust-domain",
            other,
            "--output",
            "json",
        ]);
        let refreshed: Value = serde_json::from_str(&refreshed).unwrap();
        assert_eq!(refreshed["last_error"], "", "{refreshed}");
        assert!(
            refreshed["last_refresh_at"].as_i64().unwrap() > 0,
            "{refreshed}"
        );
    }
    let shown = a.show("partner.test");
    assert_eq!(shown["bundle_endpoint_profile"], "https_spiffe", "{shown}");
    assert_eq!(shown["has_bundle"], true, "{shown}");
    let listed: Value =
        serde_json::from_str(&a.ok(&["federation", "list", "--output", "json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let bundles: Value =
        serde_json::from_str(&a.ok(&["bundle", "list", "--output", "json"])).unwrap();
    assert_eq!(bundles[0]["trust_domain"], "partner.test", "{bundles}");

    // Refused requests say why.
    let again = a.fails(&[
        "federation",
        "create",
        "--trust-domain",
        "partner.test",
        "--bundle-endpoint-url",
        &b.field("bundle_endpoint_url"),
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://partner.test/writ/server",
    ]);
    assert!(again.contains("already exists"), "{again}");
    let own = a.fails(&[
        "federation",
        "create",
        "--trust-domain",
        "example.org",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/",
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://example.org/writ/server",
    ]);
    assert!(own.contains("own trust domain"), "{own}");
    let own_bundle = a.bundle_file();
    let own = a.fails(&[
        "bundle",
        "set",
        "--id",
        "spiffe://example.org",
        "--path",
        own_bundle.to_str().unwrap(),
        "--format",
        "spiffe",
    ]);
    assert!(own.contains("own trust domain"), "{own}");
    let held = a.fails(&["bundle", "delete", "--id", "spiffe://partner.test"]);
    assert!(held.contains("delete it first"), "{held}");

    let client_id = "spiffe://example.org/fed/client";
    let server_id = "spiffe://partner.test/fed/server";
    a.entry(client_id, "partner.test");
    b.entry(server_id, "spiffe://example.org");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (client, server) =
        runtime.block_on(async { (source(&a, client_id).await, source(&b, server_id).await) });
    let partner = TrustDomain::new("partner.test").unwrap();
    let example = TrustDomain::new("example.org").unwrap();
    wait_until("the partner.test bundle at example.org's workload", || {
        client.bundle(&partner).is_some()
    });
    wait_until("the example.org bundle at partner.test's workload", || {
        server.bundle(&example).is_some()
    });

    // py-spiffe at example.org's agent sees partner.test's bundle (X.509 and JWT), and an
    // Envoy asking the agent's SDS for `ALL` gets it in its SPIFFE validator config.
    if let Some(seen) = py_spiffe_bundles(&a) {
        for kind in ["x509", "context", "jwt"] {
            assert_eq!(
                seen[kind],
                serde_json::json!(["example.org", "partner.test"]),
                "py-spiffe {kind} bundles: {seen}"
            );
        }
    }
    assert_eq!(
        runtime.block_on(sds_all_trust_domains(&a)),
        ["example.org", "partner.test"]
    );

    // A workload in example.org calls one in partner.test over mTLS, each authorizing the
    // other's trust domain.
    let seen = mtls(
        &server,
        Authorizer::member_of(example.clone()),
        &client,
        Authorizer::id(writ_sdk::SpiffeId::new(server_id).unwrap()),
    )
    .expect("federated mTLS");
    assert_eq!(seen, client_id);
    // Without being told to, an authorizer of the own trust domain refuses the peer.
    assert!(
        mtls(
            &server,
            Authorizer::member_of(partner.clone()),
            &client,
            Authorizer::any(),
        )
        .is_err()
    );

    // The Rust `spiffe` crate validates partner.test's JWT-SVID with the JWT bundles
    // example.org's agent serves.
    runtime.block_on(async {
        let mut b_client = WorkloadClient::connect(&b.workload_api()).await.unwrap();
        let tokens = b_client
            .fetch_jwt(
                &["fed-test".to_owned()],
                Some(&writ_sdk::SpiffeId::new(server_id).unwrap()),
            )
            .await
            .unwrap();
        let token = &tokens[0].1;
        let mut a_client = WorkloadClient::connect(&a.workload_api()).await.unwrap();
        let jwks = a_client.fetch_jwt_bundles().await.unwrap();
        let names: Vec<&str> = jwks.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"spiffe://partner.test"), "{names:?}");
        let mut set = spiffe::JwtBundleSet::new();
        for (name, doc) in &jwks {
            let td = spiffe::TrustDomain::new(name.trim_start_matches("spiffe://")).unwrap();
            set.add_bundle(spiffe::JwtBundle::from_jwt_authorities(td, doc).unwrap());
        }
        let svid = spiffe::JwtSvid::parse_and_validate(token, &set, &["fed-test"]).unwrap();
        assert_eq!(svid.spiffe_id().to_string(), server_id);
    });

    // Deleting the federation stops the refresh; deleting the bundle takes it away from
    // the workloads, and the partner's server is no longer trusted.
    let deleted = a.ok(&["federation", "delete", "--trust-domain", "partner.test"]);
    assert!(deleted.contains("bundle delete"), "{deleted}");
    let gone = a.writ(&["federation", "show", "--trust-domain", "partner.test"]);
    assert!(!gone.status.success());
    a.ok(&["bundle", "delete", "--id", "spiffe://partner.test"]);
    wait_until(
        "example.org's workload to drop the partner.test bundle",
        || client.bundle(&partner).is_none(),
    );
    assert_eq!(
        runtime.block_on(sds_all_trust_domains(&a)),
        ["example.org"],
        "SDS `ALL` after the bundle is deleted"
    );
    let refused = mtls(
        &server,
        Authorizer::member_of(example),
        &client,
        Authorizer::id(writ_sdk::SpiffeId::new(server_id).unwrap()),
    );
    assert!(
        refused.is_err(),
        "a deleted federation must not authenticate"
    );
    drop(b);
}
