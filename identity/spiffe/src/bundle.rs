//! SPIFFE trust bundles: the X.509 authorities and JWT signing keys of one trust domain,
//! in the SPIFFE bundle JSON format (a JWKS with `spiffe_sequence` and
//! `spiffe_refresh_hint`) and as PEM.
//!
//! Rules (SPIFFE Trust Domain and Bundle standard):
//! - `use: x509-svid` keys carry exactly one certificate in `x5c` and are written without
//!   a `kid` (a `kid` on input is ignored, as go-spiffe does);
//! - `use: jwt-svid` keys carry a `kid`;
//! - keys with an unknown `use` or `kty` are ignored, not errors;
//! - a document with a duplicate JSON member name anywhere is refused.
//!
//! Every change through the mutating methods bumps the sequence number.
//!
//! ```
//! use writ_spiffe::bundle::Bundle;
//! use writ_spiffe::spiffe_id::TrustDomain;
//! let td = TrustDomain::new("example.org")?;
//! let bundle = Bundle::new(td.clone());
//! let json = bundle.to_json();
//! assert_eq!(Bundle::from_json(td, &json)?, bundle);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, json};

use crate::spiffe_id::TrustDomain;

/// Largest bundle document accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// Most keys in one bundle.
pub const MAX_BUNDLE_KEYS: usize = 1024;
/// Deepest JSON nesting accepted in a bundle document.
const MAX_JSON_DEPTH: usize = 16;

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The document is larger than allowed.
    #[error("bundle is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The document is not JSON, or has a duplicate member name.
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    /// A required member is missing or has the wrong type.
    #[error("bundle member {0:?} is missing or has the wrong type")]
    Member(&'static str),
    /// More keys than allowed.
    #[error("bundle has more than {max} keys")]
    TooManyKeys {
        /// The limit.
        max: usize,
    },
    /// An `x509-svid` key without exactly one certificate.
    #[error("x509-svid key {index} must carry exactly one certificate in x5c")]
    X5cCount {
        /// Position of the key in `keys`.
        index: usize,
    },
    /// A certificate that is not base64 DER X.509.
    #[error("key {index}: certificate is not valid X.509: {detail}")]
    Certificate {
        /// Position of the key in `keys` (or PEM block).
        index: usize,
        /// Why.
        detail: String,
    },
    /// A `jwt-svid` key without a `kid`.
    #[error("jwt-svid key {index} has no kid")]
    MissingKid {
        /// Position of the key in `keys`.
        index: usize,
    },
    /// Two `jwt-svid` keys with the same `kid`.
    #[error("jwt-svid key id {0:?} appears twice")]
    DuplicateKid(String),
    /// A `jwt-svid` key whose parameters do not describe a public key.
    #[error("jwt-svid key {kid:?} is malformed: {detail}")]
    Jwk {
        /// The key id.
        kid: String,
        /// Why.
        detail: String,
    },
    /// PEM text without certificates, or with other block types.
    #[error("PEM bundle: {0}")]
    Pem(String),
}

/// A public key in JWK form, as a `jwt-svid` bundle entry carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Jwk {
    /// `EC`, `RSA` or `OKP`.
    pub kty: String,
    /// Curve (`P-256`, `P-384`, `Ed25519`) for EC and OKP keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC/OKP x coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

impl Jwk {
    /// The JWK of an EC P-256 public key given as an uncompressed point.
    pub fn ec_p256(x: &[u8], y: &[u8]) -> Self {
        Self {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some(URL_SAFE_NO_PAD.encode(x)),
            y: Some(URL_SAFE_NO_PAD.encode(y)),
            n: None,
            e: None,
        }
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url), as jsonwebtoken computes it.
    ///
    /// # Errors
    /// [`BundleError::Jwk`] if the key lacks a member the thumbprint covers.
    pub fn thumbprint(&self) -> Result<String, BundleError> {
        let malformed = |detail: String| BundleError::Jwk {
            kid: String::new(),
            detail,
        };
        let value = serde_json::to_value(self).map_err(|e| malformed(e.to_string()))?;
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
        jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .map_err(|e| malformed(e.to_string()))
    }

    fn check(&self) -> Result<(), String> {
        let b64 = |v: &Option<String>, name: &str| -> Result<Vec<u8>, String> {
            let s = v.as_deref().ok_or_else(|| format!("missing {name}"))?;
            URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|_| format!("{name} is not base64url"))
        };
        match (self.kty.as_str(), self.crv.as_deref()) {
            ("EC", Some("P-256")) | ("EC", Some("P-384")) => {
                let want = if self.crv.as_deref() == Some("P-256") {
                    32
                } else {
                    48
                };
                if b64(&self.x, "x")?.len() != want || b64(&self.y, "y")?.len() != want {
                    return Err("wrong coordinate length".into());
                }
            }
            ("RSA", _) => {
                if b64(&self.n, "n")?.len() < 256 {
                    return Err("RSA modulus shorter than 2048 bits".into());
                }
                b64(&self.e, "e")?;
            }
            ("OKP", Some("Ed25519")) => {
                if b64(&self.x, "x")?.len() != 32 {
                    return Err("wrong Ed25519 key length".into());
                }
            }
            _ => return Err("unsupported key type or curve".into()),
        }
        Ok(())
    }
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<Vec<u8>>,
    jwt_authorities: BTreeMap<String, Jwk>,
    sequence: u64,
    refresh_hint: Option<u64>,
}

impl Bundle {
    /// An empty bundle with sequence 0.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// DER certificates of the X.509 authorities.
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.x509_authorities
    }

    /// JWT signing keys by key id.
    pub fn jwt_authorities(&self) -> &BTreeMap<String, Jwk> {
        &self.jwt_authorities
    }

    /// The JWT key with this id.
    pub fn jwt_authority(&self, kid: &str) -> Option<&Jwk> {
        self.jwt_authorities.get(kid)
    }

    /// `spiffe_sequence`.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// `spiffe_refresh_hint`, seconds.
    pub fn refresh_hint(&self) -> Option<u64> {
        self.refresh_hint
    }

    /// Sets the sequence number (for a bundle rebuilt from state that must continue an
    /// earlier sequence).
    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = sequence;
    }

    /// Sets the refresh hint; bumps the sequence if it changed.
    pub fn set_refresh_hint(&mut self, hint: Option<u64>) {
        if self.refresh_hint != hint {
            self.refresh_hint = hint;
            self.bump();
        }
    }

    /// Adds an X.509 authority (DER); bumps the sequence unless it was already present.
    ///
    /// # Errors
    /// [`BundleError::Certificate`] if `der` is not one X.509 certificate; the bundle is
    /// left unchanged, so whatever the mutators build, the codec reads back.
    pub fn add_x509_authority(&mut self, der: Vec<u8>) -> Result<(), BundleError> {
        check_certificate(&der).map_err(|detail| BundleError::Certificate {
            index: self.x509_authorities.len(),
            detail,
        })?;
        if !self.x509_authorities.contains(&der) {
            self.x509_authorities.push(der);
            self.bump();
        }
        Ok(())
    }

    /// Removes an X.509 authority; bumps the sequence if it was present.
    pub fn remove_x509_authority(&mut self, der: &[u8]) {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|d| d != der);
        if self.x509_authorities.len() != before {
            self.bump();
        }
    }

    /// Adds or replaces a JWT authority; bumps the sequence if anything changed.
    ///
    /// # Errors
    /// [`BundleError::MissingKid`] for an empty key id, [`BundleError::Jwk`] for a key
    /// that is not a supported public key; the bundle is left unchanged.
    pub fn put_jwt_authority(&mut self, kid: String, key: Jwk) -> Result<(), BundleError> {
        if kid.is_empty() {
            return Err(BundleError::MissingKid {
                index: self.jwt_authorities.len(),
            });
        }
        key.check().map_err(|detail| BundleError::Jwk {
            kid: kid.clone(),
            detail,
        })?;
        if self.jwt_authorities.get(&kid) != Some(&key) {
            self.jwt_authorities.insert(kid, key);
            self.bump();
        }
        Ok(())
    }

    /// Removes a JWT authority; bumps the sequence if it was present.
    pub fn remove_jwt_authority(&mut self, kid: &str) {
        if self.jwt_authorities.remove(kid).is_some() {
            self.bump();
        }
    }

    /// Whether the authorities and hint equal `other`'s (sequence not compared).
    pub fn same_content(&self, other: &Bundle) -> bool {
        self.trust_domain == other.trust_domain
            && self.x509_authorities == other.x509_authorities
            && self.jwt_authorities == other.jwt_authorities
            && self.refresh_hint == other.refresh_hint
    }

    fn bump(&mut self) {
        self.sequence = self.sequence.saturating_add(1);
    }

    /// The SPIFFE bundle JSON document.
    pub fn to_json(&self) -> String {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let mut key = public_jwk_of_certificate(der).unwrap_or_default();
            key.insert("use".into(), json!("x509-svid"));
            key.insert("x5c".into(), json!([STANDARD.encode(der)]));
            keys.push(Value::Object(key));
        }
        for (kid, jwk) in &self.jwt_authorities {
            let mut key = match serde_json::to_value(jwk) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            key.insert("use".into(), json!("jwt-svid"));
            key.insert("kid".into(), json!(kid));
            keys.push(Value::Object(key));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(hint));
        }
        Value::Object(doc).to_string()
    }

    /// Parses a SPIFFE bundle JSON document for `trust_domain`.
    ///
    /// # Errors
    /// [`BundleError`] naming what is wrong; nothing is partially accepted.
    pub fn from_json(trust_domain: TrustDomain, text: &str) -> Result<Self, BundleError> {
        if text.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                max: MAX_BUNDLE_BYTES,
            });
        }
        let doc = parse_strict_json(text).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::Member("keys"))?;
        if keys.len() > MAX_BUNDLE_KEYS {
            return Err(BundleError::TooManyKeys {
                max: MAX_BUNDLE_KEYS,
            });
        }
        let sequence = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v.as_u64().ok_or(BundleError::Member("spiffe_sequence"))?,
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or(BundleError::Member("spiffe_refresh_hint"))?,
            ),
        };
        let mut bundle = Bundle {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence,
            refresh_hint,
        };
        for (index, key) in keys.iter().enumerate() {
            let key = key.as_object().ok_or(BundleError::Member("keys[]"))?;
            match key.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = key
                        .get("x5c")
                        .and_then(Value::as_array)
                        .filter(|a| a.len() == 1)
                        .and_then(|a| a.first())
                        .and_then(Value::as_str)
                        .ok_or(BundleError::X5cCount { index })?;
                    let der = STANDARD.decode(x5c).map_err(|_| BundleError::Certificate {
                        index,
                        detail: "x5c is not base64".into(),
                    })?;
                    check_certificate(&der)
                        .map_err(|detail| BundleError::Certificate { index, detail })?;
                    if !bundle.x509_authorities.contains(&der) {
                        bundle.x509_authorities.push(der);
                    }
                }
                Some("jwt-svid") => {
                    let kty = key.get("kty").and_then(Value::as_str).unwrap_or_default();
                    if !matches!(kty, "EC" | "RSA" | "OKP") {
                        continue; // unknown key type: ignored
                    }
                    let kid = key
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())
                        .ok_or(BundleError::MissingKid { index })?
                        .to_owned();
                    let jwk: Jwk =
                        serde_json::from_value(Value::Object(key.clone())).map_err(|e| {
                            BundleError::Jwk {
                                kid: kid.clone(),
                                detail: e.to_string(),
                            }
                        })?;
                    jwk.check().map_err(|detail| BundleError::Jwk {
                        kid: kid.clone(),
                        detail,
                    })?;
                    if bundle.jwt_authorities.insert(kid.clone(), jwk).is_some() {
                        return Err(BundleError::DuplicateKid(kid));
                    }
                }
                _ => {} // unknown or missing use: ignored
            }
        }
        Ok(bundle)
    }

    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
            .collect()
    }

    /// A bundle with the X.509 authorities of a PEM document (no JWT keys).
    ///
    /// # Errors
    /// [`BundleError::Pem`] if the text holds no certificate or a block of another type,
    /// [`BundleError::Certificate`] if a block is not X.509.
    pub fn from_pem(trust_domain: TrustDomain, text: &str) -> Result<Self, BundleError> {
        if text.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                max: MAX_BUNDLE_BYTES,
            });
        }
        let blocks = pem::parse_many(text).map_err(|e| BundleError::Pem(e.to_string()))?;
        if blocks.is_empty() {
            return Err(BundleError::Pem("no CERTIFICATE block".into()));
        }
        if blocks.len() > MAX_BUNDLE_KEYS {
            return Err(BundleError::TooManyKeys {
                max: MAX_BUNDLE_KEYS,
            });
        }
        let mut bundle = Bundle::new(trust_domain);
        for (index, block) in blocks.into_iter().enumerate() {
            if block.tag() != "CERTIFICATE" {
                return Err(BundleError::Pem(format!(
                    "block {index} is {:?}, not CERTIFICATE",
                    block.tag()
                )));
            }
            bundle
                .add_x509_authority(block.into_contents())
                .map_err(|e| match e {
                    BundleError::Certificate { detail, .. } => {
                        BundleError::Certificate { index, detail }
                    }
                    other => other,
                })?;
        }
        Ok(bundle)
    }
}

impl fmt::Display for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

/// Bundles of several trust domains (one's own plus federated ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding `bundle`.
    pub fn of(bundle: Bundle) -> Self {
        let mut set = Self::new();
        set.insert(bundle);
        set
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: Bundle) {
        self.bundles.insert(bundle.trust_domain().clone(), bundle);
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundle of the trust domain named `name`.
    pub fn get_by_name(&self, name: &str) -> Option<&Bundle> {
        self.bundles
            .iter()
            .find(|(td, _)| td.as_str() == name)
            .map(|(_, b)| b)
    }

    /// All bundles.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }
}

fn check_certificate(der: &[u8]) -> Result<(), String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], _)) => Ok(()),
        Ok(_) => Err("trailing bytes after certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The public key of a DER certificate as JWK members (`kty`, `crv`, `x`, `y` or `n`,
/// `e`), for `x509-svid` bundle entries.
fn public_jwk_of_certificate(der: &[u8]) -> Option<Map<String, Value>> {
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let spki = cert.public_key();
    let mut m = Map::new();
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve_oid = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let (crv, len) = match curve_oid.to_id_string().as_str() {
                "1.2.840.10045.3.1.7" => ("P-256", 32),
                "1.3.132.0.34" => ("P-384", 48),
                _ => return None,
            };
            let xy = point.data().strip_prefix(&[0x04])?;
            if xy.len() != 2 * len {
                return None;
            }
            let (x, y) = xy.split_at(len);
            m.insert("kty".into(), json!("EC"));
            m.insert("crv".into(), json!(crv));
            m.insert("x".into(), json!(URL_SAFE_NO_PAD.encode(x)));
            m.insert("y".into(), json!(URL_SAFE_NO_PAD.encode(y)));
        }
        PublicKey::RSA(rsa) => {
            m.insert("kty".into(), json!("RSA"));
            m.insert(
                "n".into(),
                json!(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus))),
            );
            m.insert(
                "e".into(),
                json!(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent))),
            );
        }
        _ => return None,
    }
    Some(m)
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(start..).unwrap_or_default()
}

/// Parses JSON, refusing duplicate member names at any depth (serde_json alone keeps the
/// last one silently) and nesting deeper than a small limit.
///
/// # Errors
/// The serde_json error describing the first problem.
pub fn parse_strict_json(text: &str) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = StrictValue { depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct StrictValue {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(de::Error::custom("JSON nested too deeply"));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue {
            depth: self.depth + 1,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(de::Error::custom("JSON nested too deeply"));
        }
        let mut out = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate member {key:?}")));
            }
            let v = map.next_value_seed(StrictValue {
                depth: self.depth + 1,
            })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 section 3.1's example key and thumbprint.
    #[test]
    fn thumbprint_matches_rfc_7638() {
        let jwk: Jwk = serde_json::from_value(json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB"
        }))
        .unwrap();
        assert_eq!(
            jwk.thumbprint().unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        let incomplete = Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: None,
            y: None,
            n: None,
            e: None,
        };
        assert!(matches!(
            incomplete.thumbprint(),
            Err(BundleError::Jwk { .. })
        ));
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn duplicate_members_are_refused_at_any_depth() {
        assert!(parse_strict_json(r#"{"a":1,"a":2}"#).is_err());
        assert!(parse_strict_json(r#"{"keys":[{"use":"x","use":"y"}]}"#).is_err());
        assert!(Bundle::from_json(td(), r#"{"keys":[],"keys":[]}"#).is_err());
        assert!(parse_strict_json(r#"{"a":{"b":1},"c":{"b":2}}"#).is_ok());
    }

    #[test]
    fn unknown_use_and_kty_are_ignored() {
        let doc = r#"{"keys":[{"use":"enc","kty":"EC"},{"use":"jwt-svid","kty":"oct","kid":"k","k":"AA"},{"kty":"EC"}],"spiffe_sequence":3}"#;
        let b = Bundle::from_json(td(), doc).unwrap();
        assert!(b.x509_authorities().is_empty());
        assert!(b.jwt_authorities().is_empty());
        assert_eq!(b.sequence(), 3);
    }

    #[test]
    fn jwt_key_without_kid_is_refused() {
        let doc = r#"{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#;
        assert_eq!(
            Bundle::from_json(td(), doc),
            Err(BundleError::MissingKid { index: 0 })
        );
    }

    #[test]
    fn mutations_bump_sequence() {
        let mut b = Bundle::new(td());
        let jwk = Jwk::ec_p256(&[1; 32], &[2; 32]);
        b.put_jwt_authority("k".into(), jwk.clone()).unwrap();
        assert_eq!(b.sequence(), 1);
        b.put_jwt_authority("k".into(), jwk).unwrap();
        assert_eq!(b.sequence(), 1, "no change, no bump");
        b.remove_jwt_authority("k");
        assert_eq!(b.sequence(), 2);
        b.set_refresh_hint(Some(300));
        assert_eq!(b.sequence(), 3);
    }

    #[test]
    fn pem_rejects_non_certificates() {
        let text = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        assert!(matches!(
            Bundle::from_pem(td(), &text),
            Err(BundleError::Pem(_))
        ));
        assert!(matches!(
            Bundle::from_pem(td(), ""),
            Err(BundleError::Pem(_))
        ));
        let junk = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(matches!(
            Bundle::from_pem(td(), &junk),
            Err(BundleError::Certificate { .. })
        ));
    }
}
