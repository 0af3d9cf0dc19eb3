//! The X509-SVID leaf certificate, encoded from a template fixed per X.509 authority.
//!
//! Every leaf the CA signs has the same shape (RFC 5280 `TBSCertificate`, the X509-SVID
//! standard's leaf rules): version 3, a random 16-byte serial, ecdsa-with-SHA256, the
//! authority's subject as issuer, a validity, a subject of `O=Writ` (plus the server
//! marker and a common name where they apply), the workload's public key, and the
//! extensions authorityKeyIdentifier, subjectAltName (one URI SAN, then DNS and IP
//! SANs), keyUsage `digitalSignature` (critical), extKeyUsage serverAuth and clientAuth,
//! subjectKeyIdentifier and basicConstraints `cA = false` (critical). What does not
//! change between leaves of one authority (the issuer name, the authority key
//! identifier, the parsed signing key) is prepared once in [`LeafTemplate::new`]; a
//! leaf is then one pass of DER writing, one SHA-256 (the subject key identifier) and
//! one signature.

use std::net::IpAddr;

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

use super::CaError;
use crate::key_manager::PrivateKey;

/// DER tags used here.
mod tag {
    pub(super) const BOOLEAN: u8 = 0x01;
    pub(super) const INTEGER: u8 = 0x02;
    pub(super) const BIT_STRING: u8 = 0x03;
    pub(super) const OCTET_STRING: u8 = 0x04;
    pub(super) const OID: u8 = 0x06;
    pub(super) const UTF8_STRING: u8 = 0x0c;
    pub(super) const UTC_TIME: u8 = 0x17;
    pub(super) const GENERALIZED_TIME: u8 = 0x18;
    pub(super) const SEQUENCE: u8 = 0x30;
    pub(super) const SET: u8 = 0x31;
    /// `[0]` constructed (the version).
    pub(super) const EXPLICIT_0: u8 = 0xa0;
    /// `[3]` constructed (the extensions).
    pub(super) const EXPLICIT_3: u8 = 0xa3;
    /// `[0]` primitive (keyIdentifier in authorityKeyIdentifier).
    pub(super) const IMPLICIT_0: u8 = 0x80;
    /// GeneralName dNSName `[2]`.
    pub(super) const DNS_NAME: u8 = 0x82;
    /// GeneralName uniformResourceIdentifier `[6]`.
    pub(super) const URI: u8 = 0x86;
    /// GeneralName iPAddress `[7]`.
    pub(super) const IP_ADDRESS: u8 = 0x87;
}

/// Object identifiers, as their DER content octets.
mod oid {
    /// ecdsa-with-SHA256 (1.2.840.10045.4.3.2).
    pub(super) const ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    /// id-at-commonName (2.5.4.3).
    pub(super) const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    /// id-at-organizationName (2.5.4.10).
    pub(super) const ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
    /// id-at-organizationalUnitName (2.5.4.11).
    pub(super) const ORGANIZATIONAL_UNIT: &[u8] = &[0x55, 0x04, 0x0b];
    /// id-ce-authorityKeyIdentifier (2.5.29.35).
    pub(super) const AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
    /// id-ce-subjectAltName (2.5.29.17).
    pub(super) const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    /// id-ce-keyUsage (2.5.29.15).
    pub(super) const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
    /// id-ce-extKeyUsage (2.5.29.37).
    pub(super) const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
    /// id-ce-subjectKeyIdentifier (2.5.29.14).
    pub(super) const SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
    /// id-ce-basicConstraints (2.5.29.19).
    pub(super) const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    /// id-kp-serverAuth (1.3.6.1.5.5.7.3.1).
    pub(super) const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
    /// id-kp-clientAuth (1.3.6.1.5.5.7.3.2).
    pub(super) const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
}

/// A leaf's own fields: everything the template does not fix.
pub(super) struct LeafFields<'a> {
    /// The serial number's 16 bytes, positive and without a leading zero byte.
    pub serial: [u8; 16],
    /// notBefore and notAfter, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The subject's organizational unit (the server marker), if any.
    pub organizational_unit: Option<&'a str>,
    /// The subject's common name, if any.
    pub common_name: Option<&'a str>,
    /// The URI SAN: the SPIFFE ID.
    pub spiffe_id: &'a str,
    /// DNS SANs and IP SANs, in order, after the URI SAN.
    pub names: &'a [SanName<'a>],
    /// The subject's public key: a DER SubjectPublicKeyInfo.
    pub spki: &'a [u8],
}

/// A SAN beside the SPIFFE ID.
pub(super) enum SanName<'a> {
    Dns(&'a str),
    Ip(IpAddr),
}

/// What every leaf of one X.509 authority shares, prepared once.
pub(super) struct LeafTemplate {
    /// The issuer Name: the authority certificate's subject, byte for byte.
    issuer: Vec<u8>,
    /// The complete authorityKeyIdentifier extension.
    authority_key_id: Vec<u8>,
    /// Encoded once, the parts every leaf has alike (see [`Fixed`]).
    fixed: Fixed,
    /// The authority's key, parsed once.
    signer: EcdsaKeyPair,
}

impl LeafTemplate {
    /// The template of the authority whose certificate is `ca_der` and key is `key`.
    ///
    /// # Errors
    /// [`CaError::Certificate`] if the certificate does not parse or the key is not
    /// EC P-256 (the key every X.509 authority of the CA is generated with).
    pub(super) fn new(ca_der: &[u8], key: &PrivateKey) -> Result<Self, CaError> {
        let bad = |what: String| CaError::Certificate(format!("authority certificate: {what}"));
        let (_, ca) =
            x509_parser::parse_x509_certificate(ca_der).map_err(|e| bad(e.to_string()))?;
        // The key identifier leaves name: the authority's own subjectKeyIdentifier, or
        // (a certificate without one) the same derivation as ours, over its public key.
        let own_id = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            });
        let key_id = match own_id {
            Some(id) => id.to_vec(),
            None => key_identifier(ca.public_key().raw).to_vec(),
        };
        let mut authority_key_id = Vec::with_capacity(40);
        extension(&mut authority_key_id, oid::AUTHORITY_KEY_ID, false, |v| {
            tlv(v, tag::SEQUENCE, |v| bytes(v, tag::IMPLICIT_0, &key_id));
        });
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.pkcs8_der())
            .map_err(|_| bad("the authority's key is not EC P-256".into()))?;
        Ok(Self {
            issuer: ca.subject().as_raw().to_vec(),
            authority_key_id,
            fixed: Fixed::new(),
            signer,
        })
    }

    /// The signed certificate (DER) for `leaf`.
    ///
    /// # Errors
    /// [`CaError::InvalidRequest`] for a name that is not ASCII (an IA5String SAN), or
    /// a time that cannot be written; [`CaError::Certificate`] if signing fails.
    pub(super) fn sign(&self, leaf: &LeafFields<'_>) -> Result<Vec<u8>, CaError> {
        for name in
            std::iter::once(leaf.spiffe_id).chain(leaf.names.iter().filter_map(|n| match n {
                SanName::Dns(d) => Some(*d),
                SanName::Ip(_) => None,
            }))
        {
            if !name.is_ascii() {
                return Err(CaError::InvalidRequest(format!(
                    "{name:?} is not ASCII: a SAN is an IA5String"
                )));
            }
        }
        let not_before = Time::from_unix(leaf.not_before)?;
        let not_after = Time::from_unix(leaf.not_after)?;
        let mut tbs = Vec::with_capacity(512);
        tlv(&mut tbs, tag::SEQUENCE, |t| {
            t.extend_from_slice(&self.fixed.version);
            bytes(t, tag::INTEGER, &leaf.serial);
            t.extend_from_slice(&self.fixed.signature_algorithm);
            t.extend_from_slice(&self.issuer);
            tlv(t, tag::SEQUENCE, |t| {
                not_before.write(t);
                not_after.write(t);
            });
            tlv(t, tag::SEQUENCE, |t| {
                t.extend_from_slice(&self.fixed.organization);
                if let Some(ou) = leaf.organizational_unit {
                    attribute(t, oid::ORGANIZATIONAL_UNIT, ou);
                }
                if let Some(cn) = leaf.common_name {
                    attribute(t, oid::COMMON_NAME, cn);
                }
            });
            t.extend_from_slice(leaf.spki);
            tlv(t, tag::EXPLICIT_3, |t| {
                tlv(t, tag::SEQUENCE, |t| self.extensions(t, leaf));
            });
        });
        let signature = self
            .signer
            .sign(&SystemRandom::new(), &tbs)
            .map_err(|_| CaError::Certificate("signing the X509-SVID failed".into()))?;
        let mut cert = Vec::with_capacity(tbs.len() + 96);
        tlv(&mut cert, tag::SEQUENCE, |c| {
            c.extend_from_slice(&tbs);
            c.extend_from_slice(&self.fixed.signature_algorithm);
            tlv(c, tag::BIT_STRING, |c| {
                c.push(0);
                c.extend_from_slice(signature.as_ref());
            });
        });
        Ok(cert)
    }

    fn extensions(&self, out: &mut Vec<u8>, leaf: &LeafFields<'_>) {
        out.extend_from_slice(&self.authority_key_id);
        // RFC 5280 4.2.1.6: critical only when the subject is empty, never here.
        extension(out, oid::SUBJECT_ALT_NAME, false, |v| {
            tlv(v, tag::SEQUENCE, |v| {
                bytes(v, tag::URI, leaf.spiffe_id.as_bytes());
                for name in leaf.names {
                    match name {
                        SanName::Dns(d) => bytes(v, tag::DNS_NAME, d.as_bytes()),
                        SanName::Ip(IpAddr::V4(ip)) => bytes(v, tag::IP_ADDRESS, &ip.octets()),
                        SanName::Ip(IpAddr::V6(ip)) => bytes(v, tag::IP_ADDRESS, &ip.octets()),
                    }
                }
            });
        });
        out.extend_from_slice(&self.fixed.usages);
        extension(out, oid::SUBJECT_KEY_ID, false, |v| {
            bytes(v, tag::OCTET_STRING, &key_identifier(leaf.spki));
        });
        out.extend_from_slice(&self.fixed.basic_constraints);
    }
}

/// The DER of what every leaf has alike, encoded once per template.
struct Fixed {
    /// `[0] { INTEGER 2 }`: version 3.
    version: Vec<u8>,
    /// ecdsa-with-SHA256, as the TBS and the certificate name it.
    signature_algorithm: Vec<u8>,
    /// The subject's first RDN, `O=Writ`.
    organization: Vec<u8>,
    /// keyUsage (critical) and extKeyUsage.
    usages: Vec<u8>,
    /// basicConstraints (critical).
    basic_constraints: Vec<u8>,
}

impl Fixed {
    fn new() -> Self {
        let encoded = |write: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            write(&mut out);
            out
        };
        Self {
            version: encoded(&|t| tlv(t, tag::EXPLICIT_0, |t| bytes(t, tag::INTEGER, &[2]))),
            signature_algorithm: encoded(&|t| {
                tlv(t, tag::SEQUENCE, |a| {
                    bytes(a, tag::OID, oid::ECDSA_WITH_SHA256)
                });
            }),
            organization: encoded(&|t| attribute(t, oid::ORGANIZATION, "Writ")),
            usages: encoded(&|out| {
                // digitalSignature only: bit 0, seven unused bits.
                extension(out, oid::KEY_USAGE, true, |v| {
                    bytes(v, tag::BIT_STRING, &[0x07, 0x80]);
                });
                extension(out, oid::EXT_KEY_USAGE, false, |v| {
                    tlv(v, tag::SEQUENCE, |v| {
                        bytes(v, tag::OID, oid::SERVER_AUTH);
                        bytes(v, tag::OID, oid::CLIENT_AUTH);
                    });
                });
            }),
            // cA defaults to false, so the sequence is empty.
            basic_constraints: encoded(&|out| {
                extension(out, oid::BASIC_CONSTRAINTS, true, |v| {
                    bytes(v, tag::SEQUENCE, &[]);
                });
            }),
        }
    }
}

/// The DER header of an EC P-256 SubjectPublicKeyInfo (RFC 5480: id-ecPublicKey,
/// prime256v1, a BIT STRING of 66 bytes: no unused bits, then a 65-byte point).
const P256_SPKI_HEADER: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The DER SubjectPublicKeyInfo `der`, checked: one whole structure (no trailing
/// bytes) of a key type a workload may hold (EC P-256, P-384 or P-521, Ed25519, RSA).
///
/// # Errors
/// [`CaError::InvalidRequest`] naming what is wrong.
pub(super) fn subject_public_key(der: &[u8]) -> Result<&[u8], CaError> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
        OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
    };
    use x509_parser::prelude::FromDer as _;
    // What agents send nearly always: an uncompressed P-256 key, whose encoding is
    // fixed but for the point, so its header and length say all a parse would.
    if der.len() == P256_SPKI_HEADER.len() + 65 && der.starts_with(&P256_SPKI_HEADER) {
        return Ok(der);
    }
    let bad = |what: &str| CaError::InvalidRequest(format!("public key: {what}"));
    let (rest, spki) =
        x509_parser::x509::SubjectPublicKeyInfo::from_der(der).map_err(|e| bad(&e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the SubjectPublicKeyInfo"));
    }
    let alg = &spki.algorithm;
    let known = if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        curve.is_some_and(|c| c == OID_EC_P256 || c == OID_NIST_EC_P384 || c == OID_NIST_EC_P521)
    } else {
        alg.algorithm == OID_SIG_ED25519 || alg.algorithm == OID_PKCS1_RSAENCRYPTION
    };
    if !known {
        return Err(bad("not an EC P-256/P-384/P-521, Ed25519 or RSA key"));
    }
    Ok(der)
}

/// A key identifier: the first 20 bytes of the SHA-256 of the DER bytes given (RFC 7093
/// method 1 takes the subjectPublicKey bits; like rcgen, Writ hashes the whole
/// SubjectPublicKeyInfo, so identifiers stay the same across the change of encoder).
fn key_identifier(spki: &[u8]) -> [u8; 20] {
    let hash = digest(&SHA256, spki);
    let mut id = [0; 20];
    id.iter_mut().zip(hash.as_ref()).for_each(|(i, h)| *i = *h);
    id
}

/// One relative distinguished name of one UTF8String attribute.
fn attribute(out: &mut Vec<u8>, oid: &[u8], value: &str) {
    tlv(out, tag::SET, |s| {
        tlv(s, tag::SEQUENCE, |s| {
            bytes(s, tag::OID, oid);
            bytes(s, tag::UTF8_STRING, value.as_bytes());
        });
    });
}

/// `Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }`.
fn extension(out: &mut Vec<u8>, oid: &[u8], critical: bool, value: impl FnOnce(&mut Vec<u8>)) {
    tlv(out, tag::SEQUENCE, |e| {
        bytes(e, tag::OID, oid);
        if critical {
            bytes(e, tag::BOOLEAN, &[0xff]);
        }
        tlv(e, tag::OCTET_STRING, value);
    });
}

/// A primitive TLV of `content`.
fn bytes(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    tlv(out, tag, |o| o.extend_from_slice(content));
}

/// A TLV whose content `body` writes; the tag and length go in front once the length
/// is known (the content moved once, by a few bytes; nothing allocated).
fn tlv(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    body(out);
    let len = out.len() - start;
    // Short form: [tag, len]; long form: [tag, 0x80 | n, n length octets].
    let octets = len.to_be_bytes();
    let n = octets.iter().take_while(|b| **b == 0).count();
    let long = octets.len() - n;
    let (first, rest) = if len < 0x80 {
        (len as u8, 0)
    } else {
        (0x80 | long as u8, long)
    };
    let mut header = [0u8; 2 + size_of::<usize>()];
    header
        .iter_mut()
        .zip([tag, first].into_iter().chain(octets.into_iter().skip(n)))
        .for_each(|(h, b)| *h = b);
    let used = 2 + rest;
    // An exact-size iterator: the splice moves the content once and allocates nothing.
    out.splice(start..start, header.into_iter().take(used));
}

/// A certificate time: UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280
/// 4.1.2.5), always in seconds and `Z`.
struct Time(time::OffsetDateTime);

impl Time {
    fn from_unix(secs: i64) -> Result<Self, CaError> {
        time::OffsetDateTime::from_unix_timestamp(secs)
            .map(Self)
            .map_err(|e| CaError::InvalidRequest(format!("certificate time {secs}: {e}")))
    }

    fn write(&self, out: &mut Vec<u8>) {
        let t = self.0;
        // Years are 0..=9999 here: `time` keeps them in that range by default.
        let year = u32::try_from(t.year()).unwrap_or(0);
        let utc = (1950..2050).contains(&year);
        let tag = if utc {
            tag::UTC_TIME
        } else {
            tag::GENERALIZED_TIME
        };
        tlv(out, tag, |o| {
            if !utc {
                two_digits(o, year / 100);
            }
            for n in [
                year % 100,
                u32::from(u8::from(t.month())),
                u32::from(t.day()),
                u32::from(t.hour()),
                u32::from(t.minute()),
                u32::from(t.second()),
            ] {
                two_digits(o, n);
            }
            o.push(b'Z');
        });
    }
}

fn two_digits(out: &mut Vec<u8>, n: u32) {
    // Both digits of n < 100, as ASCII.
    out.extend_from_slice(&[b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8]);
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
    };
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::key_manager::ToRcgen as _;

    const SPIFFE_ID: &str = "spiffe://example.org/ns/prod/sa/agent";

    /// A self-signed authority certificate made the way the CA makes one.
    fn authority(key: &PrivateKey) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Writ");
        dn.push(DnType::CommonName, "Writ CA 0123abcd");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.use_authority_key_identifier_extension = true;
        params
            .self_signed(&key.to_rcgen().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    /// The same leaf as rcgen encodes it (the encoder Writ used before the template).
    fn rcgen_leaf(ca: &[u8], ca_key: &PrivateKey, leaf: &LeafFields<'_>) -> Vec<u8> {
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(ca), ca_key.to_rcgen().unwrap())
                .unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Writ");
        if let Some(ou) = leaf.organizational_unit {
            dn.push(DnType::OrganizationalUnitName, ou);
        }
        if let Some(cn) = leaf.common_name {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut sans = vec![SanType::URI(leaf.spiffe_id.try_into().unwrap())];
        for name in leaf.names {
            sans.push(match name {
                SanName::Dns(d) => SanType::DnsName((*d).try_into().unwrap()),
                SanName::Ip(ip) => SanType::IpAddress(*ip),
            });
        }
        params.subject_alt_names = sans;
        params.serial_number = Some(SerialNumber::from_slice(&leaf.serial));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(leaf.not_before).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(leaf.not_after).unwrap();
        params.use_authority_key_identifier_extension = true;
        let spki = rcgen::SubjectPublicKeyInfo::from_der(leaf.spki).unwrap();
        params.signed_by(&spki, &issuer).unwrap().der().to_vec()
    }

    fn tbs(der: &[u8]) -> Vec<u8> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        assert!(rest.is_empty(), "trailing bytes after the certificate");
        cert.tbs_certificate.as_ref().to_vec()
    }

    fn workload_spki() -> Vec<u8> {
        PrivateKey::generate()
            .unwrap()
            .to_rcgen()
            .unwrap()
            .subject_public_key_info()
    }

    /// Byte for byte the TBSCertificate rcgen writes for the same fields, for every
    /// shape of leaf; and the signature verifies with the authority's key.
    #[test]
    fn leaves_match_rcgen_and_verify() {
        let ca_key = PrivateKey::generate().unwrap();
        let ca = authority(&ca_key);
        let template = LeafTemplate::new(&ca, &ca_key).unwrap();
        let spki = workload_spki();
        let long_name = format!("{}.example.org", "a".repeat(200));
        let names = [
            SanName::Dns("api.example.org"),
            SanName::Ip("127.0.0.1".parse().unwrap()),
            SanName::Ip("::1".parse().unwrap()),
            SanName::Dns(&long_name),
        ];
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca).unwrap();
        let ca_public = ca_cert.public_key().subject_public_key.data.to_vec();
        // 2026, then a notAfter past 2049 (GeneralizedTime).
        for (names, ou, cn, not_after) in [
            (&names[..0], None, None, 1_800_000_000),
            (&names[..], None, Some("api.example.org"), 1_800_000_000),
            (
                &names[..0],
                Some("Writ identity server"),
                None,
                2_600_000_000,
            ),
        ] {
            let leaf = LeafFields {
                serial: [0x5a; 16],
                not_before: 1_790_000_000,
                not_after,
                organizational_unit: ou,
                common_name: cn,
                spiffe_id: SPIFFE_ID,
                names,
                spki: &spki,
            };
            let ours = template.sign(&leaf).unwrap();
            assert_eq!(tbs(&ours), tbs(&rcgen_leaf(&ca, &ca_key, &leaf)));
            let (_, cert) = x509_parser::parse_x509_certificate(&ours).unwrap();
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &ca_public)
                .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
                .expect("the authority's signature verifies");
        }
    }

    #[test]
    fn garbage_public_keys_are_refused() {
        let spki = workload_spki();
        assert!(
            spki.starts_with(&P256_SPKI_HEADER),
            "the fast path's header"
        );
        assert!(subject_public_key(&spki).is_ok());
        // Other key types take the parse.
        let p384 = {
            use aws_lc_rs::signature::{ECDSA_P384_SHA384_ASN1_SIGNING, KeyPair as _};
            let doc =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &SystemRandom::new())
                    .unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, doc.as_ref()).unwrap();
            let point = pair.public_key().as_ref().to_vec();
            // SEQUENCE { SEQUENCE { id-ecPublicKey, secp384r1 }, BIT STRING point }
            let mut spki = Vec::new();
            tlv(&mut spki, tag::SEQUENCE, |s| {
                tlv(s, tag::SEQUENCE, |a| {
                    bytes(a, tag::OID, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
                    bytes(a, tag::OID, &[0x2b, 0x81, 0x04, 0x00, 0x22]);
                });
                tlv(s, tag::BIT_STRING, |b| {
                    b.push(0);
                    b.extend_from_slice(&point);
                });
            });
            spki
        };
        assert!(subject_public_key(&p384).is_ok());
        let mut trailing = spki.clone();
        trailing.push(0);
        let unknown_curve = {
            // id-ecPublicKey with an unknown curve (P-256's last arc changed).
            let mut s = spki.clone();
            let at = s
                .windows(8)
                .position(|w| w == [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
            s[at.unwrap() + 7] = 0x09;
            s
        };
        for bad in [
            &[][..],
            &[0x30, 0x80][..],
            &spki[..spki.len() - 1],
            &trailing[..],
            &unknown_curve[..],
            b"not der at all",
        ] {
            let err = subject_public_key(bad).unwrap_err();
            assert!(
                matches!(err, CaError::InvalidRequest(ref m) if m.starts_with("public key")),
                "{err}"
            );
        }
    }

    #[test]
    fn non_ascii_names_are_refused() {
        let ca_key = PrivateKey::generate().unwrap();
        let template = LeafTemplate::new(&authority(&ca_key), &ca_key).unwrap();
        let spki = workload_spki();
        let names = [SanName::Dns("bücher.example.org")];
        let leaf = LeafFields {
            serial: [0x5a; 16],
            not_before: 1_790_000_000,
            not_after: 1_800_000_000,
            organizational_unit: None,
            common_name: None,
            spiffe_id: SPIFFE_ID,
            names: &names,
            spki: &spki,
        };
        assert!(matches!(
            template.sign(&leaf),
            Err(CaError::InvalidRequest(_))
        ));
    }
}
