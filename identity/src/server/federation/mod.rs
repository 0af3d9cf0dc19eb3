//! SPIFFE federation: the server's bundle endpoint and the refresh of foreign trust
//! domains' bundles from theirs (the SPIFFE Trust Domain and Bundle standard, section 5).
//!
//! - [`endpoint`] serves this trust domain's SPIFFE bundle JSON at `GET /` over HTTPS,
//!   with the `https_spiffe` profile (the server's own X509-SVID,
//!   `spiffe://<td>/writ/server`) or `https_web` (a certificate and key from files).
//! - A [`Relationship`] (SPIRE's shape: trust domain, bundle endpoint URL, profile,
//!   endpoint SPIFFE ID) says where a foreign trust domain's bundle comes from; they are
//!   stored (`Store::create_federation`) and managed through the admin API
//!   (`writ federation create|list|show|update|delete`).
//! - [`refresh`] fetches each relationship's bundle, validates it ([`check_fetched`]),
//!   stores it and plans the next fetch from its `spiffe_refresh_hint`. A bad answer
//!   keeps the last good bundle and records the error (`writ federation show`).
//!
//! Stored foreign bundles reach agents like any bundle; a workload gets those its
//! entries federate with (`writ entry create --federates-with`). docs/federation.md is
//! the user's guide.
//!
//! ```
//! use writ_identity::server::federation::{Profile, Relationship};
//! use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
//! let rel = Relationship::new(
//!     TrustDomain::new("partner.test").unwrap(),
//!     "https://bundle.partner.test:8443/",
//!     Profile::HttpsSpiffe {
//!         endpoint_id: SpiffeId::new("spiffe://partner.test/writ/server").unwrap(),
//!     },
//! )
//! .unwrap();
//! assert_eq!(rel.profile().name(), "https_spiffe");
//! ```

pub mod endpoint;
pub mod manage;
pub mod refresh;

use std::time::Duration;

use crate::bundle::{Bundle, BundleError, MAX_BUNDLE_BYTES};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::FederationRecord;

/// Shortest wait between two refreshes of one relationship, whatever the hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Longest wait between two refreshes of one relationship.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Wait between refreshes when the bundle gives no `spiffe_refresh_hint`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// How long one fetch (connect, TLS, request and the whole body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest bundle endpoint URL accepted.
pub const MAX_URL_BYTES: usize = 2048;

/// Why a relationship was refused or a refresh failed. The text is what
/// `writ federation show` prints as the last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The relationship is malformed.
    #[error("invalid federation relationship: {0}")]
    Invalid(String),
    /// A relationship (or a bundle set by hand) names the server's own trust domain.
    #[error("{0} is this server's own trust domain: its bundle is the CA's, not a foreign one")]
    OwnTrustDomain(String),
    /// The endpoint could not be reached, or TLS failed (for `https_spiffe`: its SVID
    /// does not chain to the held bundle or names another SPIFFE ID).
    #[error("cannot fetch {url}: {reason}")]
    Fetch {
        /// The endpoint URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The endpoint did not answer in time.
    #[error("{url} did not answer within {}s", .timeout.as_secs())]
    Timeout {
        /// The endpoint URL.
        url: String,
        /// The bound.
        timeout: Duration,
    },
    /// The endpoint answered with another status than 200.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The endpoint URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The answer is larger than a bundle may be.
    #[error("the bundle from {url} is larger than {max} bytes")]
    TooLarge {
        /// The endpoint URL.
        url: String,
        /// The limit.
        max: usize,
    },
    /// The answer is not a valid SPIFFE bundle.
    #[error("the bundle from {url} is invalid: {source}")]
    Bundle {
        /// The endpoint URL.
        url: String,
        /// What is wrong.
        source: BundleError,
    },
    /// An X.509 authority of the bundle names another trust domain (its URI SAN).
    #[error("the bundle is for {found}, not {expected}")]
    WrongTrustDomain {
        /// The relationship's trust domain.
        expected: String,
        /// The trust domain an authority names.
        found: String,
    },
    /// The bundle has no X.509 authority and no JWT authority.
    #[error("the bundle for {0} holds no authority")]
    Empty(String),
    /// The bundle's `spiffe_sequence` is lower than the held bundle's.
    #[error(
        "the bundle's spiffe_sequence {got} is lower than the held bundle's {held}: kept the held one"
    )]
    SequenceBackwards {
        /// The held bundle's sequence.
        held: u64,
        /// The fetched one's.
        got: u64,
    },
    /// `https_spiffe` needs a bundle of the endpoint's trust domain to authenticate it
    /// and none is held (give one with `--trust-domain-bundle-path`, or `writ bundle set`).
    #[error(
        "no bundle of {0} is held to authenticate its endpoint (https_spiffe): set one with \
         `writ bundle set` or `writ federation create --trust-domain-bundle-path`"
    )]
    NoBundle(String),
    /// The store failed.
    #[error("datastore: {0}")]
    Store(String),
}

impl FederationError {
    /// Whether the caller's request is at fault (a malformed relationship or bundle, or
    /// the own trust domain) rather than the endpoint or the store.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::OwnTrustDomain(_))
    }
}

/// How the bundle endpoint server is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Profile {
    /// The endpoint presents an X509-SVID with this SPIFFE ID, verified against the
    /// bundle held for its trust domain (a bootstrap bundle first, then each refresh).
    HttpsSpiffe {
        /// The endpoint server's SPIFFE ID.
        endpoint_id: SpiffeId,
    },
    /// The endpoint presents a Web PKI certificate for the URL's host, verified against
    /// the system roots or, if given, these PEM CA certificates.
    HttpsWeb {
        /// PEM CA certificates to use instead of the system roots.
        ca_pem: Option<String>,
    },
}

impl Profile {
    /// `https_spiffe` or `https_web`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsSpiffe { .. } => "https_spiffe",
            Self::HttpsWeb { .. } => "https_web",
        }
    }
}

/// A validated federation relationship: whose bundle, from where, and how the endpoint
/// is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    trust_domain: TrustDomain,
    url: reqwest::Url,
    profile: Profile,
}

impl Relationship {
    /// A relationship with `trust_domain` whose bundle endpoint is `url` (`https://`).
    ///
    /// # Errors
    /// [`FederationError::Invalid`] for a URL that is not `https`, too long, or carries
    /// credentials, or a PEM web CA without certificates.
    pub fn new(
        trust_domain: TrustDomain,
        url: &str,
        profile: Profile,
    ) -> Result<Self, FederationError> {
        let invalid = |m: String| FederationError::Invalid(m);
        if url.len() > MAX_URL_BYTES {
            return Err(invalid(format!(
                "the bundle endpoint URL is longer than {MAX_URL_BYTES} bytes"
            )));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| invalid(format!("bundle endpoint URL {url:?}: {e}")))?;
        if parsed.scheme() != "https" {
            return Err(invalid(format!(
                "bundle endpoint URL {url:?} is not https://"
            )));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid(format!("bundle endpoint URL {url:?} has no host")));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(
                "a bundle endpoint URL carries no credentials".into(),
            ));
        }
        if let Profile::HttpsWeb { ca_pem: Some(pem) } = &profile {
            endpoint::pem_certificates(pem).map_err(invalid)?;
        }
        Ok(Self {
            trust_domain,
            url: parsed,
            profile,
        })
    }

    /// Reads a stored relationship.
    ///
    /// # Errors
    /// [`FederationError::Invalid`] if the record does not describe a valid one.
    pub fn from_record(record: &FederationRecord) -> Result<Self, FederationError> {
        let invalid = |m: String| FederationError::Invalid(m);
        let td = TrustDomain::new(&record.trust_domain_id)
            .map_err(|e| invalid(format!("trust domain {:?}: {e}", record.trust_domain_id)))?;
        let profile = parse_profile(
            &record.profile,
            Some(record.endpoint_spiffe_id.as_str()).filter(|s| !s.is_empty()),
            Some(record.web_ca_pem.clone()).filter(|s| !s.is_empty()),
        )?;
        Self::new(td, &record.bundle_endpoint_url, profile)
    }

    /// The record to store (empty status; `created_at` as given).
    pub fn to_record(&self, created_at: i64) -> FederationRecord {
        let (endpoint_spiffe_id, web_ca_pem) = match &self.profile {
            Profile::HttpsSpiffe { endpoint_id } => (endpoint_id.to_string(), String::new()),
            Profile::HttpsWeb { ca_pem } => (String::new(), ca_pem.clone().unwrap_or_default()),
        };
        FederationRecord {
            trust_domain_id: self.trust_domain.id_string(),
            bundle_endpoint_url: self.url.to_string(),
            profile: self.profile.name().to_owned(),
            endpoint_spiffe_id,
            web_ca_pem,
            created_at,
            last_refresh_at: None,
            last_error: None,
            next_refresh_at: None,
        }
    }

    /// The foreign trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The bundle endpoint URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// How the endpoint is authenticated.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }
}

/// A profile from its name (`https_spiffe`, `https_web`), the endpoint SPIFFE ID
/// (`https_spiffe` only, required) and a PEM web CA (`https_web` only, optional).
///
/// # Errors
/// [`FederationError::Invalid`] naming what is missing or misplaced.
pub fn parse_profile(
    name: &str,
    endpoint_spiffe_id: Option<&str>,
    web_ca_pem: Option<String>,
) -> Result<Profile, FederationError> {
    let invalid = |m: String| FederationError::Invalid(m);
    match name {
        "https_spiffe" => {
            if web_ca_pem.is_some() {
                return Err(invalid(
                    "a web CA goes with https_web, not https_spiffe".into(),
                ));
            }
            let id = endpoint_spiffe_id.ok_or_else(|| {
                invalid("https_spiffe needs the endpoint's SPIFFE ID (--endpoint-spiffe-id)".into())
            })?;
            let endpoint_id = SpiffeId::new(id)
                .map_err(|e| invalid(format!("endpoint SPIFFE ID {id:?}: {e}")))?;
            Ok(Profile::HttpsSpiffe { endpoint_id })
        }
        "https_web" => {
            if endpoint_spiffe_id.is_some() {
                return Err(invalid(
                    "an endpoint SPIFFE ID goes with https_spiffe, not https_web".into(),
                ));
            }
            Ok(Profile::HttpsWeb { ca_pem: web_ca_pem })
        }
        other => Err(invalid(format!(
            "bundle endpoint profile {other:?} is not https_spiffe or https_web"
        ))),
    }
}

/// Reads a foreign bundle given by hand (`writ bundle set`, a bootstrap bundle):
/// `format` is `spiffe` (SPIFFE bundle JSON) or `pem` (X.509 authorities only).
///
/// # Errors
/// [`FederationError::Invalid`] for an unknown format or an invalid document.
pub fn parse_bundle_input(
    trust_domain: TrustDomain,
    text: &str,
    format: &str,
) -> Result<Bundle, FederationError> {
    let bundle = match format {
        "spiffe" | "" => Bundle::from_json(trust_domain.clone(), text),
        "pem" => Bundle::from_pem(trust_domain.clone(), text),
        other => {
            return Err(FederationError::Invalid(format!(
                "bundle format {other:?} is not spiffe or pem"
            )));
        }
    }
    .map_err(|e| FederationError::Invalid(format!("bundle for {trust_domain}: {e}")))?;
    check_authorities(&bundle)?;
    Ok(bundle)
}

/// Validates a fetched bundle document for `trust_domain` against the held bundle's
/// sequence: size ([`MAX_BUNDLE_BYTES`]) and key count as [`Bundle::from_json`] bounds
/// them, every key parseable, no authority naming another trust domain, at least one
/// authority, and a `spiffe_sequence` not lower than `held_sequence`.
///
/// # Errors
/// The [`FederationError`] that says what is wrong; the caller keeps the held bundle.
pub fn check_fetched(
    trust_domain: &TrustDomain,
    url: &str,
    body: &[u8],
    held_sequence: Option<u64>,
) -> Result<Bundle, FederationError> {
    if body.len() > MAX_BUNDLE_BYTES {
        return Err(FederationError::TooLarge {
            url: url.to_owned(),
            max: MAX_BUNDLE_BYTES,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| FederationError::Bundle {
        url: url.to_owned(),
        source: BundleError::Json("not UTF-8".into()),
    })?;
    let bundle = Bundle::from_json(trust_domain.clone(), text).map_err(|source| {
        FederationError::Bundle {
            url: url.to_owned(),
            source,
        }
    })?;
    check_authorities(&bundle)?;
    if let Some(held) = held_sequence
        && bundle.sequence() < held
    {
        return Err(FederationError::SequenceBackwards {
            held,
            got: bundle.sequence(),
        });
    }
    Ok(bundle)
}

/// Refuses a bundle with no authority, or with an X.509 authority whose SPIFFE URI SAN
/// names another trust domain (a CA certificate of a SPIFFE trust domain names it).
fn check_authorities(bundle: &Bundle) -> Result<(), FederationError> {
    let td = bundle.trust_domain();
    if bundle.x509_authorities().is_empty() && bundle.jwt_authorities().is_empty() {
        return Err(FederationError::Empty(td.to_string()));
    }
    for der in bundle.x509_authorities() {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            continue; // Bundle parsing already refused what is not X.509.
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            continue;
        };
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(rest) = uri.strip_prefix("spiffe://")
            {
                let named = rest.split('/').next().unwrap_or_default();
                if named != td.as_str() {
                    return Err(FederationError::WrongTrustDomain {
                        expected: td.to_string(),
                        found: named.to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// When to refresh after a success: the bundle's `spiffe_refresh_hint` (seconds) within
/// [`MIN_REFRESH`]..[`MAX_REFRESH`], [`DEFAULT_REFRESH`] without one.
pub fn refresh_interval(hint: Option<u64>, min: Duration) -> Duration {
    hint.map_or(DEFAULT_REFRESH, Duration::from_secs)
        .clamp(min, MAX_REFRESH.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn ca_der(name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{name}").try_into().unwrap(),
        )];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn bundle_json(name: &str, sequence: u64) -> String {
        let mut b = Bundle::new(td(name));
        b.add_x509_authority(ca_der(name)).unwrap();
        b.set_refresh_hint(Some(60));
        b.set_sequence(sequence);
        b.to_json()
    }

    #[test]
    fn accepts_a_good_bundle_and_refuses_a_lower_sequence() {
        let json = bundle_json("partner.test", 7);
        let b = check_fetched(&td("partner.test"), "u", json.as_bytes(), Some(7)).unwrap();
        assert_eq!(b.sequence(), 7);
        assert_eq!(b.refresh_hint(), Some(60));
        let err = check_fetched(&td("partner.test"), "u", json.as_bytes(), Some(8)).unwrap_err();
        assert_eq!(err, FederationError::SequenceBackwards { held: 8, got: 7 });
    }

    #[test]
    fn refuses_garbage_huge_wrong_domain_and_empty() {
        let t = td("partner.test");
        for garbage in [
            &b"<html>hello</html>"[..],
            b"",
            b"\xff\xfe",
            b"{\"keys\":3}",
            b"[]",
        ] {
            assert!(
                matches!(
                    check_fetched(&t, "u", garbage, None),
                    Err(FederationError::Bundle { .. })
                ),
                "{garbage:?}"
            );
        }
        let huge = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert!(matches!(
            check_fetched(&t, "u", &huge, None),
            Err(FederationError::TooLarge { .. })
        ));
        let other = bundle_json("example.org", 1);
        assert_eq!(
            check_fetched(&t, "u", other.as_bytes(), None).unwrap_err(),
            FederationError::WrongTrustDomain {
                expected: "partner.test".into(),
                found: "example.org".into()
            }
        );
        assert!(matches!(
            check_fetched(&t, "u", br#"{"keys":[]}"#, None),
            Err(FederationError::Empty(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::RngCore;
        let t = td("partner.test");
        let mut rng = rand::rng();
        for len in [0usize, 1, 7, 64, 4096] {
            let mut buf = vec![0u8; len];
            rng.fill_bytes(&mut buf);
            assert!(check_fetched(&t, "u", &buf, None).is_err());
        }
    }

    #[test]
    fn relationships_are_validated_and_round_trip() {
        let spiffe = Profile::HttpsSpiffe {
            endpoint_id: SpiffeId::new("spiffe://partner.test/writ/server").unwrap(),
        };
        let rel = Relationship::new(
            td("partner.test"),
            "https://127.0.0.1:8443/",
            spiffe.clone(),
        )
        .unwrap();
        let back = Relationship::from_record(&rel.to_record(5)).unwrap();
        assert_eq!(back, rel);
        for bad in [
            "http://x/",
            "ftp://x/",
            "https://user:pw@x/",
            "not a url",
            "",
        ] {
            assert!(
                Relationship::new(td("partner.test"), bad, spiffe.clone()).is_err(),
                "{bad}"
            );
        }
        assert!(parse_profile("https_spiffe", None, None).is_err());
        assert!(parse_profile("https_web", Some("spiffe://a/b"), None).is_err());
        assert!(parse_profile("tls", None, None).is_err());
        assert!(
            Relationship::new(
                td("partner.test"),
                "https://x/",
                Profile::HttpsWeb {
                    ca_pem: Some("garbage".into())
                }
            )
            .is_err()
        );
    }

    #[test]
    fn refresh_interval_is_bounded() {
        assert_eq!(refresh_interval(None, MIN_REFRESH), DEFAULT_REFRESH);
        assert_eq!(refresh_interval(Some(0), MIN_REFRESH), MIN_REFRESH);
        assert_eq!(refresh_interval(Some(u64::MAX), MIN_REFRESH), MAX_REFRESH);
        assert_eq!(
            refresh_interval(Some(60), MIN_REFRESH),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn hand_given_bundles_are_parsed_by_format() {
        let json = bundle_json("partner.test", 3);
        assert_eq!(
            parse_bundle_input(td("partner.test"), &json, "spiffe")
                .unwrap()
                .sequence(),
            3
        );
        let pem = Bundle::from_json(td("partner.test"), &json)
            .unwrap()
            .to_pem();
        assert_eq!(
            parse_bundle_input(td("partner.test"), &pem, "pem")
                .unwrap()
                .x509_authorities()
                .len(),
            1
        );
        assert!(parse_bundle_input(td("partner.test"), &pem, "der").is_err());
        assert!(parse_bundle_input(td("other.test"), &json, "spiffe").is_err());
    }
}
