//! SPIFFE mTLS for rustls: server and client configs that present the workload's SVID
//! from an [`X509Source`] and accept a peer only if its chain is a valid X509-SVID for
//! the bundle of the peer's trust domain (own or federated) and an [`Authorizer`]
//! accepts its SPIFFE ID.
//!
//! Certificates and bundles are read from the source's current snapshot at every
//! handshake, so a rotation needs no restart and live connections are not dropped.
//! There is no default authorizer: every config names who it accepts.
//!
//! TLS session resumption is off on both sides: a resumed session skips certificate
//! verification, so an expired (or deregistered) SVID could go on opening connections
//! for as long as its ticket lives, and the authorizer would not run again. Every new
//! connection is a full handshake against the current snapshot.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use writ_sdk::tls::{self, Authorizer};
//! use writ_sdk::workload::X509Source;
//! let source = X509Source::new().await?;
//! let td = source.spiffe_id().trust_domain();
//! let server = tls::server_config(&source, Authorizer::member_of(td))?;
//! let client = tls::client_config(
//!     &source,
//!     Authorizer::id("spiffe://example.org/billing".parse()?),
//! )?;
//! # let _ = (server, client); Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};
use writ_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use writ_spiffe::tls::{SpiffeClientVerifier, SpiffeServerVerifier};

use crate::workload::X509Source;

pub use writ_spiffe::tls::peer_id;

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Decides which verified SPIFFE IDs a config accepts as peers. The names follow
/// go-spiffe's `tlsconfig` (`AuthorizeAny`, `AuthorizeID`, `AuthorizeOneOf`,
/// `AuthorizeMemberOf`). An authorizer only ever sees a peer whose X509-SVID already
/// chained to a trusted bundle: none of them, not even [`Authorizer::any`], accepts an
/// unverified certificate.
#[derive(Clone)]
pub struct Authorizer(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>);

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authorizer")
    }
}

impl Authorizer {
    /// Any SPIFFE ID: every peer whose X509-SVID is valid for a bundle the source
    /// trusts (its own trust domain or a federated one), as go-spiffe's
    /// `tlsconfig.AuthorizeAny()`. Use it only when the application authorizes the
    /// caller itself (e.g. from [`peer_id`]).
    pub fn any() -> Self {
        Self(Arc::new(|_| true))
    }

    /// Exactly this ID.
    pub fn id(id: SpiffeId) -> Self {
        Self(Arc::new(move |peer| *peer == id))
    }

    /// Any of these IDs.
    pub fn one_of(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        let ids: BTreeSet<String> = ids.into_iter().map(|i| i.to_string()).collect();
        Self(Arc::new(move |peer| ids.contains(peer.as_str())))
    }

    /// Any ID of this trust domain.
    pub fn member_of(trust_domain: TrustDomain) -> Self {
        Self(Arc::new(move |peer| peer.trust_domain() == trust_domain))
    }

    /// IDs of `trust_domain` whose path is `prefix` or lies under it (segment-wise:
    /// `/agents` covers `/agents/a` but not `/agents-old`).
    pub fn path_prefix(trust_domain: TrustDomain, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into().trim_end_matches('/').to_owned();
        Self(Arc::new(move |peer| {
            peer.trust_domain() == trust_domain
                && peer
                    .path()
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| {
                        rest.is_empty() || rest.starts_with('/') || prefix.is_empty()
                    })
        }))
    }

    /// Any peer that at least one of `authorizers` accepts: the union of the IDs they
    /// accept (the union of none accepts nobody).
    pub fn union(authorizers: impl IntoIterator<Item = Authorizer>) -> Self {
        let all: Vec<Authorizer> = authorizers.into_iter().collect();
        Self(Arc::new(move |peer| all.iter().any(|a| a.allows(peer))))
    }

    /// The peers `inner` accepts, except one a revocation in `feed` covers (a revoked
    /// workload, a workload under a revoked subtree, a revoked sub-agent lease's child),
    /// and every peer while the feed fails closed and is stale. The decision is made at
    /// the handshake: a connection opened before the revocation stays open (a
    /// `TxnLayer` checks the caller on every request).
    #[cfg(feature = "txn-verify")]
    pub fn not_revoked(feed: crate::revocation::RevocationFeed, inner: Authorizer) -> Self {
        Self(Arc::new(move |peer| {
            inner.allows(peer)
                && feed.check_workload(peer.as_str()) == crate::revocation::RevocationCheck::Clear
        }))
    }

    /// A custom decision.
    pub fn custom(f: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Whether `peer` is accepted.
    pub fn allows(&self, peer: &SpiffeId) -> bool {
        (self.0)(peer)
    }
}

/// A server config that requires a client X509-SVID accepted by `authorizer`.
/// ALPN offers `h2` and `http/1.1`.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn server_config(
    source: &X509Source,
    authorizer: Authorizer,
) -> Result<ServerConfig, TlsError> {
    build_server(source, authorizer, true)
}

/// Like [`server_config`], but a client may also connect without a certificate; the
/// application must then authenticate it some other way or refuse it. A client that
/// does present a certificate is still verified during the handshake.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn server_config_client_optional(
    source: &X509Source,
    authorizer: Authorizer,
) -> Result<ServerConfig, TlsError> {
    build_server(source, authorizer, false)
}

fn build_server(
    source: &X509Source,
    authorizer: Authorizer,
    mandatory: bool,
) -> Result<ServerConfig, TlsError> {
    let verifier =
        SpiffeClientVerifier::new(source.bundle_source(), authorizer.0.clone(), mandatory);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(source.resolver());
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config that presents the workload's SVID and accepts a server whose
/// X509-SVID `authorizer` accepts (the DNS name in the URL is not used).
/// ALPN offers `h2` and `http/1.1`.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn client_config(
    source: &X509Source,
    authorizer: Authorizer,
) -> Result<ClientConfig, TlsError> {
    let verifier = SpiffeServerVerifier::new(source.bundle_source(), authorizer.0.clone());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(source.resolver());
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// An HTTP/1.1 `reqwest` client over [`client_config`]: presents the workload's SVID and
/// accepts a server `authorizer` accepts. ALPN offers only `http/1.1`: each request in
/// flight has its own keep-alive connection (see [`http2_client`] for one multiplexed
/// connection).
///
/// # Errors
/// [`TlsError`] if the TLS configuration or the client cannot be built.
pub fn http_client(
    source: &X509Source,
    authorizer: Authorizer,
) -> Result<reqwest::Client, TlsError> {
    reqwest_client(source, authorizer, &[b"http/1.1"])
}

/// As [`http_client`], but ALPN offers `h2` first: against a server that takes it (Writ's
/// services do), every request to one origin shares one connection as HTTP/2 streams;
/// a server that only speaks HTTP/1.1 gets HTTP/1.1.
///
/// # Errors
/// [`TlsError`] if the TLS configuration or the client cannot be built.
pub fn http2_client(
    source: &X509Source,
    authorizer: Authorizer,
) -> Result<reqwest::Client, TlsError> {
    reqwest_client(source, authorizer, &[b"h2", b"http/1.1"])
}

fn reqwest_client(
    source: &X509Source,
    authorizer: Authorizer,
    alpn: &[&[u8]],
) -> Result<reqwest::Client, TlsError> {
    let mut config = client_config(source, authorizer)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| TlsError::Client(e.to_string()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn authorizers() {
        let td = id("spiffe://example.org/x").trust_domain().clone();
        let a = Authorizer::id(id("spiffe://example.org/a"));
        assert!(a.allows(&id("spiffe://example.org/a")));
        assert!(!a.allows(&id("spiffe://example.org/a/b")));
        let set = Authorizer::one_of([id("spiffe://example.org/a"), id("spiffe://other.org/b")]);
        assert!(set.allows(&id("spiffe://other.org/b")));
        assert!(!set.allows(&id("spiffe://example.org/b")));
        let member = Authorizer::member_of(td.clone());
        assert!(member.allows(&id("spiffe://example.org/anything")));
        assert!(!member.allows(&id("spiffe://example.com/anything")));
        let prefix = Authorizer::path_prefix(td, "/agents/");
        assert!(prefix.allows(&id("spiffe://example.org/agents")));
        assert!(prefix.allows(&id("spiffe://example.org/agents/a/b")));
        assert!(!prefix.allows(&id("spiffe://example.org/agents-old")));
        assert!(!prefix.allows(&id("spiffe://example.com/agents/a")));
        let union = Authorizer::union([
            Authorizer::id(id("spiffe://example.org/a")),
            Authorizer::member_of(id("spiffe://other.org/x").trust_domain().clone()),
        ]);
        assert!(union.allows(&id("spiffe://example.org/a")));
        assert!(union.allows(&id("spiffe://other.org/anything")));
        assert!(!union.allows(&id("spiffe://example.org/b")));
        assert!(!Authorizer::union([]).allows(&id("spiffe://example.org/a")));
        // go-spiffe's AuthorizeAny: every (verified) ID.
        let any = Authorizer::any();
        assert!(any.allows(&id("spiffe://example.org/a")));
        assert!(any.allows(&id("spiffe://other.org/b/c")));
        let custom = Authorizer::custom(|p| p.path().ends_with("/ok"));
        assert!(custom.allows(&id("spiffe://example.org/x/ok")));
        assert!(!custom.allows(&id("spiffe://example.org/x/no")));
    }
}
