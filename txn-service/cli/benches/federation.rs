//! Federation refresh and propagation to workloads, on the real release binary:
//! `cargo bench -p writ-cli --bench federation`.
//!
//! A `writ dev` (example.org) federates with partner.test, whose bundle endpoint this
//! bench serves (https_web, a test CA). Each sample changes partner.test's bundle at the
//! endpoint (a new X.509 authority, the next `spiffe_sequence`) and waits until a
//! Workload API stream of an example.org workload whose entry federates with
//! partner.test carries it (`federated_bundles`). Two figures:
//!
//! - **by refresh hint**: nothing else happens; the server's refresher fetches when the
//!   bundle's `spiffe_refresh_hint` (1 s, raised to `min_refresh`, 5 s by default) is
//!   due, so this is dominated by the hint.
//! - **after a fetch**: the bench asks for a refresh at once (`RefreshFederation`), so this
//!   is the pipeline: HTTPS fetch, validation, store, change event, agent re-sync, stream.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::print_stdout,
    reason = "a bench binary: a failed step aborts it loudly, results go to stdout"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use writ_identity::bundle::Bundle;
use writ_identity::proto::admin as pb;
use writ_identity::server::federation::endpoint::{self, DocumentSource};
use writ_identity::spiffe_id::TrustDomain;
use writ_sdk::workload::WorkloadClient;

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const BY_HINT: usize = 12;
const AFTER_FETCH: usize = 50;

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn writ(socket: &str, args: &[&str]) -> String {
    let out = Command::new(WRIT)
        .args(args)
        .env("WRIT_SERVER_SOCKET", socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "writ {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A partner.test CA certificate (DER): a new authority for each change.
fn authority() -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://partner.test".to_owned().try_into().unwrap(),
    )];
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

fn bundle_json(der: Vec<u8>, sequence: u64) -> String {
    let mut b = Bundle::new(TrustDomain::new("partner.test").unwrap());
    b.add_x509_authority(der).unwrap();
    b.set_refresh_hint(Some(1));
    b.set_sequence(sequence);
    b.to_json()
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!(
        "{label:<52} n={:<3} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(p99),
        ms(*samples.last().unwrap()),
    );
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // partner.test's endpoint: https_web with a test CA, serving `doc`.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let (cert_file, key_file, ca_file) = (
        dir.path().join("web.pem"),
        dir.path().join("web-key.pem"),
        dir.path().join("web-ca.pem"),
    );
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut sequence = 1;
    let doc = Arc::new(Mutex::new(bundle_json(authority(), sequence)));
    let served = doc.clone();
    let url = runtime.block_on(async {
        let tls = endpoint::web_tls(&cert_file, &key_file).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/", listener.local_addr().unwrap());
        let document: DocumentSource = Arc::new(move || served.lock().unwrap().clone());
        tokio::spawn(endpoint::serve(
            listener,
            tls,
            document,
            std::future::pending(),
        ));
        url
    });

    // example.org: a writ dev federating with partner.test, and a workload that
    // federates with it.
    let data = dir.path().join("dev");
    let _dev = Dev(Command::new(WRIT)
        .args([
            "dev",
            "--trust-domain",
            "example.org",
            "--tts-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let state_file = data.join("dev.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    let state: serde_json::Value = loop {
        if let Ok(t) = std::fs::read_to_string(&state_file)
            && let Ok(v) = serde_json::from_str(&t)
        {
            break v;
        }
        assert!(Instant::now() < deadline, "writ dev did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let socket = state["server_socket"].as_str().unwrap().to_owned();
    let workload_api = state["workload_api"].as_str().unwrap().to_owned();
    writ(
        &socket,
        &[
            "federation",
            "create",
            "--trust-domain",
            "partner.test",
            "--bundle-endpoint-url",
            &url,
            "--bundle-endpoint-profile",
            "https_web",
            "--web-ca-path",
            ca_file.to_str().unwrap(),
        ],
    );
    let uid = writ_tests::uid();
    writ(
        &socket,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/bench/fed",
            "--selector",
            &format!("unix:uid:{uid}"),
            "--federates-with",
            "partner.test",
        ],
    );

    runtime.block_on(async {
        let mut client = WorkloadClient::connect(&workload_api).await.unwrap();
        let mut watch = client.watch_x509().await.unwrap();
        let mut admin = writ_identity::server::admin::connect(Path::new(&socket))
            .await
            .unwrap();
        // Waits until the stream carries `der` among partner.test's authorities.
        let carries = |ctx: &writ_sdk::workload::X509Context, der: &[u8]| {
            ctx.federated.iter().any(|(name, certs)| {
                name == "spiffe://partner.test" && certs.iter().any(|c| c == der)
            })
        };
        for (label, n, ask) in [
            (
                "federation: endpoint change -> workload (by refresh hint)",
                BY_HINT,
                false,
            ),
            (
                "federation: endpoint change -> workload (after a fetch)",
                AFTER_FETCH,
                true,
            ),
        ] {
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let der = authority();
                sequence += 1;
                *doc.lock().unwrap() = bundle_json(der.clone(), sequence);
                let started = Instant::now();
                if ask {
                    let r = admin
                        .refresh_federation(pb::FederationRequest {
                            trust_domain: "partner.test".into(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.last_error, "");
                }
                loop {
                    let ctx = tokio::time::timeout(Duration::from_secs(60), watch.next())
                        .await
                        .expect("no update within 60 s")
                        .unwrap();
                    if carries(&ctx, &der) {
                        break;
                    }
                }
                samples.push(started.elapsed());
            }
            summary(label, samples);
        }
    });
}
