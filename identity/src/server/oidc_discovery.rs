//! OIDC discovery for JWT-SVIDs: `GET /.well-known/openid-configuration` and
//! `GET /keys` (a JWKS of the trust domain's JWT-SVID signing keys), the shape of
//! SPIRE's OIDC discovery provider, so that relying parties that speak OIDC (AWS IAM
//! web identity, GCP workload identity federation, Azure federated credentials, Vault's
//! JWT auth) trust JWT-SVIDs whose `iss` is [`CaConfig::jwt_issuer`](crate::ca::CaConfig).
//!
//! The server serves it itself (`[oidc_discovery] listen` in `server.toml`): the JWKS is
//! read from the CA's published bundle, which holds every live server's JWT keys in a
//! fleet and follows rotation (a prepared key is published before it signs). Only the
//! public JWT authorities appear, never X.509 authorities or private parts.
//!
//! The listener is bounded: GET only (405 otherwise), unknown paths 404, request
//! headers at most [`MAX_HEADER_BYTES`] (a larger request is refused), a header
//! deadline, a connection deadline, the common connection gate (caps per client address
//! and per listener), and `Cache-Control` on every answer.
//!
//! ```
//! use writ_identity::server::oidc_discovery::discovery_document;
//! let doc = discovery_document("https://oidc.example.org");
//! assert_eq!(doc["jwks_uri"], "https://oidc.example.org/keys");
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use writ_spiffe::accept::{AcceptBackoff, ConnectionLimits, Gate};
use writ_spiffe::bundle::{Bundle, Jwk};

/// The discovery document's path.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The JWKS path (`jwks_uri` is the issuer followed by it).
pub const KEYS_PATH: &str = "/keys";
/// Largest request header block accepted; a larger one gets `431` and the connection
/// closes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest life of one connection.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long clients may cache an answer. A new JWT key is published in the bundle well
/// before it signs, so a JWKS this old still holds every key in use.
pub const CACHE_MAX_AGE: Duration = Duration::from_secs(300);

/// Why the OIDC discovery listener could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcDiscoveryError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key file is unreadable or unusable.
    #[error("{path}: {reason}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where and how to serve discovery (`[oidc_discovery]` in `server.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcDiscoveryConfig {
    /// The listen address.
    pub listen: SocketAddr,
    /// HTTPS certificate chain and key (PEM); `None`: plain HTTP, to be put behind a
    /// TLS-terminating proxy (relying parties fetch discovery over HTTPS only).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The discovery document for `issuer` (no trailing slash), as SPIRE's provider serves
/// it.
pub fn discovery_document(issuer: &str) -> serde_json::Value {
    let issuer = issuer.trim_end_matches('/');
    serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}{KEYS_PATH}"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "ES384"],
    })
}

fn algorithm(jwk: &Jwk) -> Option<&'static str> {
    match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("EC", Some("P-256")) => Some("ES256"),
        ("EC", Some("P-384")) => Some("ES384"),
        ("RSA", _) => Some("RS256"),
        ("OKP", Some("Ed25519")) => Some("EdDSA"),
        _ => None,
    }
}

/// The JWKS of `bundle`'s JWT authorities: public members only, each with `kid`,
/// `use: sig` and `alg`. X.509 authorities are not JWT signing keys and are left out.
pub fn jwks(bundle: &Bundle) -> serde_json::Value {
    let keys = bundle
        .jwt_authorities()
        .iter()
        .filter_map(|(kid, jwk)| {
            let alg = algorithm(jwk)?;
            let mut key = serde_json::to_value(jwk).ok()?;
            let obj = key.as_object_mut()?;
            obj.insert("kid".into(), kid.clone().into());
            obj.insert("use".into(), "sig".into());
            obj.insert("alg".into(), alg.into());
            Some(key)
        })
        .collect::<Vec<_>>();
    serde_json::json!({ "keys": keys })
}

#[derive(Clone)]
struct Discovery {
    document: Arc<Vec<u8>>,
    bundle: watch::Receiver<Arc<Bundle>>,
}

fn cached_json(body: Vec<u8>) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={}", CACHE_MAX_AGE.as_secs())) {
        headers.insert(header::CACHE_CONTROL, v);
    }
    response
}

fn no_store(status: StatusCode) -> Response {
    let mut response = status.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The routes: discovery and JWKS for GET (and HEAD), 405 for other methods on them,
/// 404 elsewhere. `bundle` is the CA's published bundle
/// ([`CertificateAuthority::subscribe`](crate::ca::CertificateAuthority::subscribe)), read at every request.
pub fn router(issuer: &str, bundle: watch::Receiver<Arc<Bundle>>) -> Router {
    let state = Discovery {
        document: Arc::new(discovery_document(issuer).to_string().into_bytes()),
        bundle,
    };
    let doc = state.clone();
    let keys = state;
    Router::new()
        .route(
            DISCOVERY_PATH,
            get(move || {
                let doc = doc.clone();
                async move { cached_json(doc.document.as_ref().clone()) }
            }),
        )
        .route(
            KEYS_PATH,
            get(move || {
                let keys = keys.clone();
                async move {
                    let bundle = keys.bundle.borrow().clone();
                    cached_json(jwks(&bundle).to_string().into_bytes())
                }
            }),
        )
        .method_not_allowed_fallback(|| async { no_store(StatusCode::METHOD_NOT_ALLOWED) })
        .fallback(|| async { no_store(StatusCode::NOT_FOUND) })
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, OidcDiscoveryError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |path: &Path, reason: String| OidcDiscoveryError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(tls_err(cert, "no certificate".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| tls_err(cert, e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds the listener of `config` (port 0 picks one).
///
/// # Errors
/// [`OidcDiscoveryError::Bind`] if the address cannot be bound.
pub async fn bind(config: &OidcDiscoveryConfig) -> Result<TcpListener, OidcDiscoveryError> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| OidcDiscoveryError::Bind {
            addr: config.listen.to_string(),
            source,
        })
}

/// Serves `router` on `listener` (HTTPS when `config.tls` names files, HTTP otherwise)
/// until `shutdown` completes.
///
/// # Errors
/// [`OidcDiscoveryError::Tls`] if the certificate or key cannot be used.
pub async fn serve(
    config: &OidcDiscoveryConfig,
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), OidcDiscoveryError> {
    let acceptor = match &config.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, https = acceptor.is_some(), "OIDC discovery ready");
    }
    let gate = Gate::new("OIDC discovery", ConnectionLimits::default());
    let accept = async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let (tcp, peer, admitted) = gate.accept(&listener, &mut backoff).await;
            let router = router.clone();
            let acceptor = acceptor.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let _admitted = admitted;
                match acceptor {
                    Some(acceptor) => match gate.handshake(acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_connection(tls, router).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(cut) => tracing::debug!(%peer, "{cut}"),
                    },
                    None => serve_connection(tcp, router).await,
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    Ok(())
}

async fn serve_connection<S>(stream: S, router: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(writ_spiffe::accept::DEFAULT_HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "OIDC discovery connection failed"),
        Err(_) => tracing::debug!("OIDC discovery connection closed at its deadline"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    use writ_spiffe::spiffe_id::TrustDomain;

    fn bundle() -> Bundle {
        let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
        b.put_jwt_authority("k1".into(), Jwk::ec_p256(&[1; 32], &[2; 32]))
            .unwrap();
        b
    }

    async fn call(method: &str, path: &str) -> (StatusCode, Option<String>, Vec<u8>) {
        let (_tx, rx) = watch::channel(Arc::new(bundle()));
        let response = router("https://oidc.example.org/", rx)
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let cache = response
            .headers()
            .get(header::CACHE_CONTROL)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, cache, body)
    }

    #[tokio::test]
    async fn discovery_names_the_issuer_and_keys() {
        let (status, cache, body) = call("GET", DISCOVERY_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(cache.as_deref(), Some("public, max-age=300"));
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["issuer"], "https://oidc.example.org");
        assert_eq!(doc["jwks_uri"], "https://oidc.example.org/keys");
        assert_eq!(doc["response_types_supported"][0], "id_token");
    }

    #[tokio::test]
    async fn keys_are_public_jwt_authorities_only() {
        let (status, _, body) = call("GET", KEYS_PATH).await;
        assert_eq!(status, StatusCode::OK);
        let jwks: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["kid"], "k1");
        assert_eq!(keys[0]["use"], "sig");
        assert_eq!(keys[0]["alg"], "ES256");
        assert!(keys[0].get("d").is_none());
    }

    #[tokio::test]
    async fn other_methods_and_paths_are_refused() {
        assert_eq!(
            call("POST", KEYS_PATH).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            call("DELETE", DISCOVERY_PATH).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let (status, cache, _) = call("GET", "/../etc/passwd").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(cache.as_deref(), Some("no-store"));
        assert_eq!(call("GET", "/keys/x").await.0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn an_unknown_key_type_is_left_out() {
        let mut b = bundle();
        let mut odd = Jwk::ec_p256(&[1; 32], &[2; 32]);
        odd.crv = Some("P-521x".into());
        b.put_jwt_authority("k2".into(), odd).ok();
        let keys = jwks(&b);
        assert!(
            keys["keys"]
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k["kid"] != "k2")
        );
    }
}
