//! The SDK's `JwtSource` against a real server and agent: JWT-SVIDs per audience, reused
//! until half their lifetime (by the source's clock), picked by SPIFFE ID, validated by
//! the agent and by the JWT bundle the source fetches.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use writ_identity::clock::ManualClock;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::workload::{JwtSource, WorkloadError};
use writ_tests::{Stack, uid_selector};

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://example.org{path}")).unwrap()
}

#[tokio::test]
async fn jwt_source_fetches_caches_and_validates() {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    stack.register("/jwt/a", &[&uid_selector()]).await;
    stack.register("/jwt/b", &[&uid_selector()]).await;
    let clock = ManualClock::new(SystemTime::now());
    let source = JwtSource::builder()
        .endpoint(stack.endpoint())
        .spiffe_id(id("/jwt/b"))
        .clock(Arc::new(clock.clone()))
        .build()
        .await
        .unwrap();

    // The identity asked for, for the audience asked for (once the entry has reached the
    // agent); the agent agrees.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let token = loop {
        match source.fetch(&["https://tts.example.org"]).await {
            Ok(token) => break token,
            Err(WorkloadError::NoIdentity) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no JWT-SVID: {e}"),
        }
    };
    let (who, claims) = source
        .validate(&token, "https://tts.example.org")
        .await
        .unwrap();
    assert_eq!(who, id("/jwt/b"));
    assert_eq!(claims["sub"], "spiffe://example.org/jwt/b");

    // Reused for the same audience, another for another audience.
    assert_eq!(
        source.fetch(&["https://tts.example.org"]).await.unwrap(),
        token
    );
    let other = source.fetch(&["https://other.example.org"]).await.unwrap();
    assert_ne!(other, token);
    assert!(matches!(
        source.validate(&other, "https://tts.example.org").await,
        Err(WorkloadError::Status(_))
    ));

    // The JWT bundle verifies the token offline too.
    let bundles = source.bundles().await.unwrap();
    let bundle = bundles.get_by_name("example.org").expect("own JWT bundle");
    let verified = writ_identity::svid::jwt::validate(
        &token,
        &["https://tts.example.org"],
        &bundles,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id, id("/jwt/b"));
    assert!(!bundle.jwt_authorities().is_empty());

    // Past half its lifetime by the source's clock, the source asks the agent again.
    clock.advance(Duration::from_secs(24 * 3600));
    let again = source.fetch(&["https://tts.example.org"]).await.unwrap();
    let (who, _) = source
        .validate(&again, "https://tts.example.org")
        .await
        .unwrap();
    assert_eq!(who, id("/jwt/b"));

    // An identity the workload does not have.
    let stranger = JwtSource::builder()
        .endpoint(stack.endpoint())
        .spiffe_id(id("/jwt/c"))
        .build()
        .await
        .unwrap();
    assert!(stranger.fetch(&["aud"]).await.is_err());
}
