//! The SPIFFE Workload API against clients nobody here wrote: the Rust `spiffe` crate
//! (rust-spiffe 0.19) `WorkloadApiClient` and `X509Source`, plus raw gRPC for the error
//! semantics the standard fixes.

use std::time::{Duration, Instant};

use spiffe::{WorkloadApiClient, X509Source};
use writ_identity::proto::workload as pb;
use writ_tests::{Stack, connect_raw, uid_selector, with_header};

#[tokio::test]
async fn caller_without_entry_is_denied_and_header_is_required() {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    let client = WorkloadApiClient::connect_to(stack.endpoint())
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(err.to_string().contains("no identity issued"), "{err}");

    let mut raw = connect_raw(stack.socket()).await;
    // No security header: InvalidArgument.
    let status = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = raw
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // With the header but no entry: PermissionDenied with the standard text.
    let mut req = tonic::Request::new(pb::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.fetch_x509svid(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");
}

#[tokio::test]
async fn rust_spiffe_fetches_svids_bundles_and_jwts() {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    // Two identities for this uid, one for nobody else; the first created is the default.
    let first = stack.register("/agents/planner", &[&uid_selector()]).await;
    stack
        .register("/agents/second", &[&uid_selector(), "unix:uid:4294967294"])
        .await; // never matches
    // Entries are ordered by creation time (whole seconds), then id: created a second
    // after the first, this one comes second.
    stack
        .register_with("/agents/other", &[&uid_selector()], |e| {
            e.created_at = first.created_at + 1;
        })
        .await;
    let client = WorkloadApiClient::connect_to(stack.endpoint())
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    let svids = loop {
        if let Ok(all) = client.fetch_all_x509_svids().await
            && all.len() == 2
        {
            break all;
        }
        assert!(Instant::now() < deadline, "entries did not reach the agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        svids[0].spiffe_id().to_string(),
        first.spiffe_id.to_string(),
        "svids[0] is the default"
    );
    assert_eq!(
        svids[1].spiffe_id().to_string(),
        "spiffe://example.org/agents/other"
    );
    let default = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        default.spiffe_id().to_string(),
        "spiffe://example.org/agents/planner"
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = bundles.get(&td).expect("own trust domain bundle");
    assert_eq!(bundle.authorities().len(), 1);

    let token = client.fetch_jwt_token(["tool-server"], None).await.unwrap();
    let validated = client
        .validate_jwt_token("tool-server", &token)
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/agents/planner"
    );
    // The JWT bundles from the same socket validate it locally too.
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let local =
        spiffe::JwtSvid::parse_and_validate(&token, &jwt_bundles, &["tool-server"]).unwrap();
    assert_eq!(
        local.spiffe_id().to_string(),
        "spiffe://example.org/agents/planner"
    );
    // A named identity.
    let other = spiffe::SpiffeId::new("spiffe://example.org/agents/other").unwrap();
    let jwt = client
        .fetch_jwt_svid(["a", "b"], Some(&other))
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id(), &other);
    // JWT-SVIDs are cached per audience set until half-life.
    assert_eq!(
        client.fetch_jwt_token(["tool-server"], None).await.unwrap(),
        token
    );

    // Validation refusals: wrong audience, garbage.
    assert!(
        client
            .validate_jwt_token("someone-else", &token)
            .await
            .is_err()
    );
    assert!(
        client
            .validate_jwt_token("tool-server", "garbage")
            .await
            .is_err()
    );
    assert!(
        client
            .validate_jwt_token("tool-server", &"x.".repeat(20_000))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn bad_requests_get_invalid_argument() {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    stack.register("/w", &[&uid_selector()]).await;
    // Until the agent holds the entry the caller has no identity, and a call that needs
    // one (`ValidateJWTSVID`) is refused as PermissionDenied before its arguments are read.
    wait_for_entries(&stack, 1).await;
    let mut raw = connect_raw(stack.socket()).await;
    for audience in [
        vec![],
        vec![String::new()],
        vec!["a".repeat(300)],
        vec!["a".into(); 40],
    ] {
        let status = raw
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let status = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "not-an-id".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "e30.e30.AAAA".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // A request over the gRPC message size limit is refused by the transport, and the
    // agent keeps serving.
    let status = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".repeat(5 * 1024 * 1024),
        }))
        .await
        .unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    let client = WorkloadApiClient::connect_to(stack.endpoint())
        .await
        .unwrap();
    client.fetch_x509_svid().await.unwrap();
}

#[tokio::test]
async fn x509_source_sees_rotation_without_reconnecting() {
    // SVIDs live 4 s, so the agent renews them at about 2 s.
    let stack = Stack::start(Duration::from_secs(4)).await;
    stack.register("/rotating", &[&uid_selector()]).await;
    let source = X509Source::builder()
        .endpoint(stack.endpoint())
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(
        first.spiffe_id().to_string(),
        "spiffe://example.org/rotating"
    );
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(15), updates.changed())
        .await
        .expect("rotation within 15 s")
        .unwrap();
    let second = source.svid().unwrap();
    assert_ne!(
        first.leaf().as_bytes(),
        second.leaf().as_bytes(),
        "a new certificate after rotation"
    );
    assert_eq!(second.spiffe_id(), first.spiffe_id());
}

/// The SHA-256 (hex) of this test's executable.
fn own_sha256() -> String {
    let exe = std::fs::read_link(format!("/proc/{}/exe", std::process::id())).unwrap();
    let bytes = std::fs::read(exe).unwrap();
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A JWT-SVID call with the security header.
async fn jwt(
    raw: &mut pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>,
) -> Result<tonic::Response<pb::JwtsvidResponse>, tonic::Status> {
    raw.fetch_jwtsvid(with_header(pb::JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    }))
    .await
}

/// Waits until the agent holds SVIDs for `n` entries.
async fn wait_for_entries(stack: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.len() != n {
        assert!(
            Instant::now() < deadline,
            "the agent did not sync {n} entries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 13 item 6: a caller is hashed only when an entry that could match it uses
/// `unix:sha256`; a stranger costs no hash, an unchanged binary is hashed once.
#[tokio::test]
async fn a_stranger_makes_the_agent_hash_nothing() {
    use writ_identity::attest::workload::UnixAttestor;
    // The test binary may be larger than the default hash limit.
    let attestor = UnixAttestor::builder().max_hash_bytes(1 << 40).build();
    let stack = Stack::start_with(
        Duration::from_secs(3600),
        std::sync::Arc::new(attestor.clone()),
    )
    .await;
    let mut raw = connect_raw(stack.socket()).await;

    // No entry at all: 20 refused calls, no hash.
    for _ in 0..20 {
        let status = jwt(&mut raw).await.unwrap_err();
        assert_eq!(status.message(), "no identity issued");
    }
    assert_eq!(attestor.hashes_computed(), 0);

    // A sha256 entry for another uid: this caller is still a stranger, still no hash.
    let other_uid = writ_tests::uid().wrapping_add(1);
    stack
        .register(
            "/other",
            &[
                &format!("unix:uid:{other_uid}"),
                &format!("unix:sha256:{}", "0".repeat(64)),
            ],
        )
        .await;
    wait_for_entries(&stack, 1).await;
    for _ in 0..20 {
        let status = jwt(&mut raw).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }
    assert_eq!(attestor.hashes_computed(), 0);

    // A sha256 entry for this process: hashed once, then from the digest cache.
    let digest = own_sha256();
    stack
        .register("/me", &[&uid_selector(), &format!("unix:sha256:{digest}")])
        .await;
    wait_for_entries(&stack, 2).await;
    for _ in 0..20 {
        let svids = jwt(&mut raw).await.unwrap().into_inner().svids;
        assert_eq!(svids.len(), 1);
        assert_eq!(svids[0].spiffe_id, "spiffe://example.org/me");
    }
    assert_eq!(attestor.hashes_computed(), 1);
}

/// A stream opened while no entry used `unix:sha256` sees an identity that needs it as
/// soon as one is registered: the caller is attested again for the new entry.
#[tokio::test]
async fn a_stream_is_attested_again_for_a_new_selector_type() {
    use writ_identity::attest::workload::UnixAttestor;
    let attestor = UnixAttestor::builder().max_hash_bytes(1 << 40).build();
    let stack = Stack::start_with(
        Duration::from_secs(3600),
        std::sync::Arc::new(attestor.clone()),
    )
    .await;
    stack.register("/plain", &[&uid_selector()]).await;
    wait_for_entries(&stack, 1).await;
    let mut raw = connect_raw(stack.socket()).await;
    let mut stream = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    assert_eq!(attestor.hashes_computed(), 0);

    let digest = own_sha256();
    stack
        .register(
            "/hashed",
            &[&uid_selector(), &format!("unix:sha256:{digest}")],
        )
        .await;
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut ids: Vec<_> = next.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["spiffe://example.org/hashed", "spiffe://example.org/plain"]
    );
    assert_eq!(attestor.hashes_computed(), 1);
}
