//! The names the token service is reached by (`dns_names` in `txn.toml`), checked
//! against the X509-SVID it presents.
//!
//! The service does not choose its certificate: the identity server signs its X509-SVID
//! with the SANs of the service's registration entry (`writ entry create --dns-name`;
//! an IP address there becomes an IP SAN). An ordinary HTTPS client (curl, Python `ssl`,
//! Node `https`) checks the name it dialed against those SANs (RFC 6125: a host name
//! against the DNS SANs, an IP address against the IP SANs), so a name missing from the
//! SVID fails every such client. The service checks at start, and again at each
//! rotation, that its SVID carries every configured name, the way a client would
//! (rustls' `verify_server_name`): at start a missing name refuses the start, naming the
//! entry to update; after a rotation it is logged as an error (the service keeps
//! serving the SPIFFE clients that do not check names).
//!
//! ```
//! use writ_txn_service::server_name::ServerNames;
//!
//! let names = ServerNames::new(["localhost", "127.0.0.1"])?;
//! assert_eq!(names.as_slice(), ["localhost", "127.0.0.1"]);
//! assert!(ServerNames::new(["*.example.org"]).is_err(), "a client dials a name, not a pattern");
//! # Ok::<(), writ_txn_service::server_name::ServerNameError>(())
//! ```

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ParsedCertificate;
use writ_identity::entry::{MAX_DNS_NAMES, is_san_name};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::svid::x509::X509Svid;
use writ_sdk::workload::X509Source;

/// Why configured names are refused, or missing from the service's X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerNameError {
    /// A name is neither a DNS name nor an IP address literal.
    #[error("`dns_names`: {0:?} is neither a DNS name nor an IP address")]
    Invalid(String),
    /// A wildcard is a certificate's pattern, not a name a client dials.
    #[error("`dns_names`: {0:?} is a wildcard; list the names clients dial")]
    Wildcard(String),
    /// Too many names.
    #[error("`dns_names`: at most {max} names")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// The service's X509-SVID lacks configured names.
    #[error(
        "the X509-SVID of {spiffe_id} does not carry {missing:?}, which `dns_names` says \
         clients reach this service by, so HTTPS clients would refuse it. Add every name to \
         its registration entry: `writ entry update --entry-id <ID> {flags}` (the id is in \
         `writ entry list --spiffe-id {spiffe_id}`; the flags replace the entry's names), \
         then start the service again once the agent has the new SVID"
    )]
    Missing {
        /// The SVID's SPIFFE ID.
        spiffe_id: SpiffeId,
        /// The configured names the SVID lacks.
        missing: Vec<String>,
        /// `--dns-name` flags for every configured name.
        flags: String,
    },
    /// The SVID's leaf certificate could not be parsed.
    #[error("the X509-SVID of {spiffe_id}: {reason}")]
    Certificate {
        /// The SVID's SPIFFE ID.
        spiffe_id: SpiffeId,
        /// What is wrong.
        reason: String,
    },
}

/// The validated `dns_names` of `txn.toml`: DNS names and IP address literals, no
/// wildcard, at most [`MAX_DNS_NAMES`], without repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames(Vec<String>);

impl ServerNames {
    /// Validates `names` (order kept, repeats dropped).
    ///
    /// # Errors
    /// [`ServerNameError`] for the first name that is not a DNS name or IP literal, a
    /// wildcard, or more than [`MAX_DNS_NAMES`] names.
    pub fn new<I, S>(names: I) -> Result<Self, ServerNameError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let name = name.into();
            if out.len() >= MAX_DNS_NAMES {
                return Err(ServerNameError::TooMany { max: MAX_DNS_NAMES });
            }
            if name.starts_with("*.") {
                return Err(ServerNameError::Wildcard(short(&name)));
            }
            if !is_san_name(&name) {
                return Err(ServerNameError::Invalid(short(&name)));
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
        Ok(Self(out))
    }

    /// The names, in configured order.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Whether no name is configured (nothing to check).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks that `svid`'s leaf is valid for every name, as an HTTPS client checks
    /// the name it dialed.
    ///
    /// # Errors
    /// [`ServerNameError::Missing`] naming the names it lacks and the entry update
    /// that adds them; [`ServerNameError::Certificate`] if the leaf does not parse.
    pub fn check(&self, svid: &X509Svid) -> Result<(), ServerNameError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let certificate = |reason: String| ServerNameError::Certificate {
            spiffe_id: svid.spiffe_id.clone(),
            reason,
        };
        let leaf = svid
            .cert_chain
            .first()
            .ok_or_else(|| certificate("no certificate".into()))?;
        let der = CertificateDer::from(leaf.as_slice());
        let parsed = ParsedCertificate::try_from(&der).map_err(|e| certificate(e.to_string()))?;
        let missing: Vec<String> = self
            .0
            .iter()
            .filter(|name| {
                !ServerName::try_from(name.as_str()).is_ok_and(|server_name| {
                    rustls::client::verify_server_name(&parsed, &server_name).is_ok()
                })
            })
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(ServerNameError::Missing {
            spiffe_id: svid.spiffe_id.clone(),
            missing,
            flags: self
                .0
                .iter()
                .map(|n| format!("--dns-name {n}"))
                .collect::<Vec<_>>()
                .join(" "),
        })
    }

    /// Checks the SVID of `source` at each rotation, logging an error when it lacks a
    /// name (the check at start is [`ServerNames::check`], which the service runs
    /// before serving). The task ends with the source.
    pub fn watch(self, source: X509Source) -> tokio::task::JoinHandle<()> {
        let mut updated = source.updated();
        tokio::spawn(async move {
            updated.borrow_and_update();
            while updated.changed().await.is_ok() {
                match self.check(&source.svid()) {
                    Ok(()) => tracing::debug!(
                        names = ?self.0,
                        "the rotated X509-SVID carries every configured name"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "HTTPS clients that check names will refuse the rotated X509-SVID"
                    ),
                }
            }
        })
    }
}

/// A refused name, cut for the message.
fn short(name: &str) -> String {
    name.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use writ_identity::ca::{CaConfig, CertificateAuthority};
    use writ_identity::clock::ManualClock;
    use writ_identity::key_manager::MemoryKeyManager;
    use writ_identity::spiffe_id::TrustDomain;
    use writ_identity::store::sqlite::SqliteStore;

    use super::*;

    async fn svid(names: &[&str]) -> X509Svid {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let td = TrustDomain::new("example.org").unwrap();
        let ca = CertificateAuthority::load(
            CaConfig::new(td.clone()),
            Arc::new(clock),
            Arc::new(MemoryKeyManager::new()),
            Arc::new(SqliteStore::open_in_memory().await.unwrap()),
        )
        .await
        .unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        ca.mint_x509_svid(&td.spiffe_id("/tts").unwrap(), None, &names)
            .unwrap()
    }

    #[tokio::test]
    async fn an_svid_with_every_name_passes() {
        let svid = svid(&["localhost", "127.0.0.1", "::1", "tts.example.org"]).await;
        ServerNames::new(["localhost", "127.0.0.1", "::1"])
            .unwrap()
            .check(&svid)
            .unwrap();
        ServerNames::default().check(&svid).unwrap();
    }

    #[tokio::test]
    async fn a_missing_name_is_named_with_the_entry_update() {
        // A DNS SAN spelling an address is no IP SAN: clients dialing 10.0.0.1 refuse it.
        let svid = svid(&["localhost"]).await;
        let names = ServerNames::new(["localhost", "127.0.0.1", "tts.example.org"]).unwrap();
        let err = names.check(&svid).unwrap_err();
        let ServerNameError::Missing { missing, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(missing, &["127.0.0.1", "tts.example.org"]);
        let text = err.to_string();
        assert!(
            text.contains(
                "writ entry update --entry-id <ID> --dns-name localhost \
                 --dns-name 127.0.0.1 --dns-name tts.example.org"
            ),
            "{text}"
        );
        assert!(
            text.contains("writ entry list --spiffe-id spiffe://example.org/tts"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_garbage_certificate_is_an_error() {
        let mut svid = svid(&["localhost"]).await;
        svid.cert_chain = vec![b"not a certificate".to_vec()];
        let names = ServerNames::new(["localhost"]).unwrap();
        assert!(matches!(
            names.check(&svid),
            Err(ServerNameError::Certificate { .. })
        ));
        svid.cert_chain.clear();
        assert!(matches!(
            names.check(&svid),
            Err(ServerNameError::Certificate { .. })
        ));
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(
            ServerNames::new(["a.org", "a.org", "::1"])
                .unwrap()
                .as_slice(),
            ["a.org", "::1"]
        );
        for bad in ["", "10.0.0", "[::1]", "a_b", "1.2.3.4:443", "https://a.org"] {
            assert_eq!(
                ServerNames::new([bad]),
                Err(ServerNameError::Invalid(bad.to_owned()))
            );
        }
        assert_eq!(
            ServerNames::new(["*.a.org"]),
            Err(ServerNameError::Wildcard("*.a.org".into()))
        );
        let many = (0..=MAX_DNS_NAMES).map(|i| format!("n{i}.org"));
        assert_eq!(
            ServerNames::new(many),
            Err(ServerNameError::TooMany { max: MAX_DNS_NAMES })
        );
    }

    proptest! {
        #[test]
        fn garbage_names_never_panic(names in proptest::collection::vec(".{0,300}", 0..40)) {
            if let Ok(ok) = ServerNames::new(names) {
                prop_assert!(ok.as_slice().iter().all(|n| is_san_name(n) && !n.starts_with("*.")));
                prop_assert!(ok.as_slice().len() <= MAX_DNS_NAMES);
            }
        }
    }
}
