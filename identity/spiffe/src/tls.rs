//! SPIFFE authentication for rustls: certificate verifiers that accept a peer only if
//! its chain is a valid X509-SVID for the current bundle (read at every handshake, so a
//! rotation needs no restart) and its SPIFFE ID passes an authorizer, and certificate
//! resolvers that present the current SVID.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::bundle::BundleSet;
use crate::spiffe_id::SpiffeId;
use crate::svid::x509::{self, X509Svid, X509SvidError};

/// Where a verifier reads the bundles it trusts, at each handshake.
pub type BundleSource = Arc<dyn Fn() -> BundleSet + Send + Sync>;
/// Decides whether a verified peer ID is acceptable.
pub type Authorize = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// The handshake-signature methods every verifier here shares: checked with aws-lc-rs's
/// algorithms, whatever the certificate policy.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

/// Validates a peer's chain at `now` (the time rustls passes to the verifier, so tests
/// and callers with their own time source drive it) and applies the authorizer.
fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleSource,
    authorize: &Authorize,
    now: UnixTime,
) -> Result<SpiffeId, rustls::Error> {
    let mut chain = Vec::with_capacity(intermediates.len() + 1);
    chain.push(end_entity.to_vec());
    chain.extend(intermediates.iter().map(|c| c.to_vec()));
    let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
    let validated = x509::validate(&chain, &bundles(), now).map_err(|e| refusal(&e))?;
    if !authorize(&validated.spiffe_id) {
        let refused = NotAuthorized {
            peer: validated.spiffe_id,
        };
        return Err(CertificateError::Other(OtherError(Arc::new(refused))).into());
    }
    Ok(validated.spiffe_id)
}

/// A peer whose X509-SVID is valid but whose SPIFFE ID the authorizer refused. It
/// travels inside the rustls error (`certificate_unknown` to the peer, as go-spiffe's
/// peers see `bad_certificate`), so the local side's error, log and audit name the ID.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer {peer} is not authorized")]
pub struct NotAuthorized {
    /// The SPIFFE ID the peer presented.
    pub peer: SpiffeId,
}

impl fmt::Debug for NotAuthorized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An X509-SVID failure as the rustls error whose alert tells the peer what was wrong:
/// the one place where SVID validation meets TLS. Expiry, unknown issuers, signatures and
/// encoding get their own certificate errors (and alerts); an X.509 certificate that is
/// not a valid SVID keeps its reason in the message (`certificate_unknown`).
pub fn refusal(e: &X509SvidError) -> rustls::Error {
    use webpki::Error as Path;
    let error = match e {
        X509SvidError::EmptyChain
        | X509SvidError::TooLarge { .. }
        | X509SvidError::Parse { .. }
        | X509SvidError::Chain(Path::BadDer | Path::BadDerTime | Path::TrailingData(_)) => {
            CertificateError::BadEncoding
        }
        X509SvidError::NoBundle(_) | X509SvidError::Chain(Path::UnknownIssuer) => {
            CertificateError::UnknownIssuer
        }
        X509SvidError::Chain(Path::CertExpired { time, not_after }) => {
            CertificateError::ExpiredContext {
                time: *time,
                not_after: *not_after,
            }
        }
        X509SvidError::Chain(Path::CertNotValidYet { time, not_before }) => {
            CertificateError::NotValidYetContext {
                time: *time,
                not_before: *not_before,
            }
        }
        X509SvidError::Chain(Path::InvalidCertValidity) => CertificateError::Expired,
        X509SvidError::Chain(Path::InvalidSignatureForPublicKey) => CertificateError::BadSignature,
        X509SvidError::Chain(Path::CertRevoked) => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(InvalidSvid(other.clone())))),
    };
    error.into()
}

/// A peer certificate that is not a valid X509-SVID, inside a rustls error. (rustls
/// prints the error it carries with `Debug`, so `Debug` is the message here.)
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer X509-SVID refused: {0}")]
pub struct InvalidSvid(pub X509SvidError);

impl fmt::Debug for InvalidSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Verifies a server's X509-SVID (client side).
pub struct SpiffeServerVerifier {
    bundles: BundleSource,
    authorize: Authorize,
}

impl SpiffeServerVerifier {
    /// Accepts servers whose SVID chains to `bundles` and whose ID `authorize` accepts.
    pub fn new(bundles: BundleSource, authorize: Authorize) -> Arc<Self> {
        Arc::new(Self { bundles, authorize })
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpiffeServerVerifier")
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            end_entity,
            intermediates,
            &self.bundles,
            &self.authorize,
            now,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Verifies a client's X509-SVID (server side).
pub struct SpiffeClientVerifier {
    bundles: BundleSource,
    authorize: Authorize,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// Accepts clients whose SVID chains to `bundles` and whose ID `authorize` accepts.
    /// With `mandatory == false` a client may also connect without a certificate (the
    /// application must then refuse what needs one).
    pub fn new(bundles: BundleSource, authorize: Authorize, mandatory: bool) -> Arc<Self> {
        Arc::new(Self {
            bundles,
            authorize,
            mandatory,
        })
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpiffeClientVerifier")
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            end_entity,
            intermediates,
            &self.bundles,
            &self.authorize,
            now,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// The SVID a TLS endpoint presents, swapped on rotation; new handshakes pick up the new
/// one, live connections are untouched.
#[derive(Debug, Default)]
pub struct SvidResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl SvidResolver {
    /// A resolver with nothing to present yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Presents `svid` from the next handshake on.
    ///
    /// # Errors
    /// [`rustls::Error`] if the SVID has no private key or the key is unusable.
    pub fn set(&self, svid: &X509Svid) -> Result<(), rustls::Error> {
        let key = svid
            .private_key
            .as_ref()
            .ok_or_else(|| rustls::Error::General("SVID has no private key".into()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)?;
        let chain = svid
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        self.current
            .store(Some(Arc::new(CertifiedKey::new(chain, signing))));
        Ok(())
    }

    /// Whether an SVID is set.
    pub fn is_set(&self) -> bool {
        self.current.load().is_some()
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

/// The SPIFFE ID of a TLS peer whose chain a [`SpiffeClientVerifier`] or
/// [`SpiffeServerVerifier`] already accepted.
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    certs
        .first()
        .and_then(|leaf| x509::check_leaf(leaf).ok())
        .map(|v| v.spiffe_id)
}

/// Verifiers that skip authentication. Each use is a security decision and is named as
/// such (rustls's convention).
pub mod dangerous {
    use super::*;

    /// Accepts any server certificate (still checking the handshake signature). Only for
    /// an agent's first contact under `insecure_bootstrap`.
    #[derive(Debug)]
    pub struct AcceptAnyServer;

    impl AcceptAnyServer {
        /// The verifier.
        pub fn new() -> Arc<Self> {
            Arc::new(Self)
        }
    }

    impl ServerCertVerifier for AcceptAnyServer {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        handshake_signatures!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::AlertDescription;

    fn alert(e: &X509SvidError) -> AlertDescription {
        match refusal(e) {
            rustls::Error::InvalidCertificate(c) => c.into(),
            other => panic!("not a certificate error: {other:?}"),
        }
    }

    #[test]
    fn each_svid_failure_gets_its_own_alert() {
        let time = UnixTime::since_unix_epoch(Duration::from_secs(2_000));
        let not_after = UnixTime::since_unix_epoch(Duration::from_secs(1_000));
        let expired = X509SvidError::Chain(webpki::Error::CertExpired { time, not_after });
        assert_eq!(alert(&expired), AlertDescription::CertificateExpired);
        let early = X509SvidError::Chain(webpki::Error::CertNotValidYet {
            time: not_after,
            not_before: time,
        });
        assert_eq!(alert(&early), AlertDescription::CertificateExpired);
        assert_eq!(
            alert(&X509SvidError::Chain(webpki::Error::UnknownIssuer)),
            AlertDescription::UnknownCA
        );
        assert_eq!(
            alert(&X509SvidError::NoBundle("other.org".into())),
            AlertDescription::UnknownCA
        );
        assert_eq!(
            alert(&X509SvidError::Chain(
                webpki::Error::InvalidSignatureForPublicKey
            )),
            AlertDescription::DecryptError
        );
        assert_eq!(
            alert(&X509SvidError::EmptyChain),
            AlertDescription::BadCertificate
        );
        // Not an SVID: the reason stays in the message.
        let ca_leaf = refusal(&X509SvidError::LeafIsCa);
        assert!(
            ca_leaf.to_string().contains("must not be a CA"),
            "{ca_leaf}"
        );
        assert_eq!(
            alert(&X509SvidError::LeafIsCa),
            AlertDescription::CertificateUnknown
        );
    }

    #[test]
    fn a_refused_id_is_named_in_the_error() {
        let peer = SpiffeId::new("spiffe://example.org/intruder").unwrap();
        let e: rustls::Error =
            CertificateError::Other(OtherError(Arc::new(NotAuthorized { peer }))).into();
        assert!(
            e.to_string()
                .contains("peer spiffe://example.org/intruder is not authorized")
        );
    }
}
