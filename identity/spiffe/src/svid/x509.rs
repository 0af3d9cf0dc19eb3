//! X509-SVIDs per the SPIFFE X509-SVID standard.
//!
//! A leaf SVID has exactly one URI SAN (the SPIFFE ID), `cA=false` in an explicit
//! basicConstraints extension, a critical keyUsage with digitalSignature (and neither
//! keyCertSign nor cRLSign), and EKU serverAuth + clientAuth. [`validate`] checks those
//! leaf rules and the chain up to the trust domain's bundle.
//!
//! ```no_run
//! use writ_spiffe::bundle::BundleSet;
//! use writ_spiffe::svid::x509;
//! # fn demo(chain: Vec<Vec<u8>>, bundles: BundleSet) -> Result<(), x509::X509SvidError> {
//! let svid = x509::validate(&chain, &bundles, std::time::SystemTime::now())?;
//! println!("peer is {}", svid.spiffe_id);
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use crate::bundle::BundleSet;
use crate::key::PrivateKey;
use crate::spiffe_id::{SpiffeId, SpiffeIdError};

/// Longest chain accepted (leaf included).
pub const MAX_CHAIN_LEN: usize = 8;
/// Largest certificate accepted, in bytes.
pub const MAX_CERT_BYTES: usize = 16 * 1024;

/// Why a certificate chain is not a valid X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509SvidError {
    /// The chain is empty.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The chain is longer than allowed or a certificate is too large.
    #[error("certificate chain exceeds {max_len} certificates or {max_bytes} bytes each")]
    TooLarge {
        /// Chain limit.
        max_len: usize,
        /// Per-certificate limit.
        max_bytes: usize,
    },
    /// A certificate is not DER X.509.
    #[error("certificate {index} is not valid X.509: {detail}")]
    Parse {
        /// Position in the chain.
        index: usize,
        /// Why.
        detail: String,
    },
    /// The leaf has no URI SAN, or more than one.
    #[error("leaf must have exactly one URI SAN, found {found}")]
    UriSanCount {
        /// How many there were.
        found: usize,
    },
    /// The URI SAN is not a SPIFFE ID.
    #[error("leaf URI SAN is not a SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    /// The leaf is a CA certificate.
    #[error("leaf certificate must not be a CA (cA=true)")]
    LeafIsCa,
    /// The leaf's key usage breaks a rule.
    #[error("leaf keyUsage: {0}")]
    KeyUsage(&'static str),
    /// No bundle for the SVID's trust domain.
    #[error("no bundle for trust domain {0}")]
    NoBundle(String),
    /// The chain does not verify against the bundle (signature, validity period, CA
    /// constraints), as the path validator said.
    #[error("certificate chain does not verify against the bundle: {0}")]
    Chain(webpki::Error),
}

/// An X509-SVID: a certificate chain (leaf first, DER) and, for one's own SVID, the
/// private key.
#[derive(Debug, Clone)]
pub struct X509Svid {
    /// The SPIFFE ID in the leaf.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first, ending before the trust anchor.
    pub cert_chain: Vec<Vec<u8>>,
    /// The leaf's private key, when this side holds it.
    pub private_key: Option<PrivateKey>,
    /// The leaf's notAfter.
    pub expires_at: SystemTime,
}

impl X509Svid {
    /// The chain as concatenated PEM `CERTIFICATE` blocks.
    pub fn chain_pem(&self) -> String {
        self.cert_chain
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
            .collect()
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&[u8]> {
        self.cert_chain.first().map(Vec::as_slice)
    }
}

/// What a successful validation established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedX509Svid {
    /// The peer's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's notAfter.
    pub expires_at: SystemTime,
}

/// Checks the leaf rules of the X509-SVID standard and returns the SPIFFE ID and
/// expiry; does not check the signature chain.
///
/// # Errors
/// [`X509SvidError`] for the first rule broken.
pub fn check_leaf(leaf_der: &[u8]) -> Result<ValidatedX509Svid, X509SvidError> {
    let leaf = parse(0, leaf_der)?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(X509SvidError::UriSanCount { found: uris.len() });
    };
    let spiffe_id = SpiffeId::new(uri)?;
    match leaf.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err(X509SvidError::LeafIsCa),
        Err(_) => return Err(X509SvidError::LeafIsCa),
        _ => {}
    }
    match leaf.key_usage() {
        Ok(Some(ku)) => {
            if !ku.value.digital_signature() {
                return Err(X509SvidError::KeyUsage("digitalSignature must be set"));
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(X509SvidError::KeyUsage(
                    "keyCertSign and cRLSign must not be set on a leaf",
                ));
            }
        }
        Ok(None) => return Err(X509SvidError::KeyUsage("extension is missing")),
        Err(_) => return Err(X509SvidError::KeyUsage("extension is malformed")),
    }
    let expires_at = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(leaf.validity().not_after.timestamp()).unwrap_or(0));
    Ok(ValidatedX509Svid {
        spiffe_id,
        expires_at,
    })
}

/// Validates an X509-SVID chain (leaf first): the leaf rules, then the signature chain
/// to an X.509 authority in the bundle of the leaf's trust domain, at time `now`.
///
/// # Errors
/// [`X509SvidError`] for the first problem found.
pub fn validate(
    chain: &[Vec<u8>],
    bundles: &BundleSet,
    now: SystemTime,
) -> Result<ValidatedX509Svid, X509SvidError> {
    if chain.len() > MAX_CHAIN_LEN || chain.iter().any(|c| c.len() > MAX_CERT_BYTES) {
        return Err(X509SvidError::TooLarge {
            max_len: MAX_CHAIN_LEN,
            max_bytes: MAX_CERT_BYTES,
        });
    }
    let (leaf, intermediates) = chain.split_first().ok_or(X509SvidError::EmptyChain)?;
    for (i, der) in intermediates.iter().enumerate() {
        parse(i + 1, der)?;
    }
    let validated = check_leaf(leaf)?;
    let td = validated.spiffe_id.trust_domain();
    let bundle = bundles
        .get(&td)
        .ok_or_else(|| X509SvidError::NoBundle(td.to_string()))?;
    let anchor_ders: Vec<CertificateDer<'_>> = bundle
        .x509_authorities()
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors: Vec<_> = anchor_ders
        .iter()
        .filter_map(|d| webpki::anchor_from_trusted_cert(d).ok())
        .collect();
    if anchors.is_empty() {
        return Err(X509SvidError::NoBundle(td.to_string()));
    }
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(X509SvidError::Chain)?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(since_epoch),
        AnySvidUsage,
        None,
        None,
    )
    .map_err(X509SvidError::Chain)?;
    Ok(validated)
}

/// The X509-SVID standard leaves EKU optional, so any (or none) is accepted here; the TLS
/// layer applies serverAuth/clientAuth checks where they matter.
struct AnySvidUsage;

impl webpki::ExtendedKeyUsageValidator for AnySvidUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for id in iter {
            id?;
        }
        Ok(())
    }
}

fn parse(index: usize, der: &[u8]) -> Result<X509Certificate<'_>, X509SvidError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(X509SvidError::Parse {
            index,
            detail: "trailing bytes".into(),
        }),
        Err(e) => Err(X509SvidError::Parse {
            index,
            detail: e.to_string(),
        }),
    }
}

/// Parses concatenated PEM `CERTIFICATE` blocks into DER.
///
/// # Errors
/// [`X509SvidError::Parse`] if the text is not PEM certificates.
pub fn chain_from_pem(text: &str) -> Result<Vec<Vec<u8>>, X509SvidError> {
    let blocks = pem::parse_many(text).map_err(|e| X509SvidError::Parse {
        index: 0,
        detail: e.to_string(),
    })?;
    blocks
        .into_iter()
        .enumerate()
        .map(|(index, b)| {
            if b.tag() == "CERTIFICATE" {
                Ok(b.into_contents())
            } else {
                Err(X509SvidError::Parse {
                    index,
                    detail: format!("PEM block is {:?}, not CERTIFICATE", b.tag()),
                })
            }
        })
        .collect()
}
