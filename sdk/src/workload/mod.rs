//! A SPIFFE Workload API client over the agent's Unix socket.
//!
//! The socket is given explicitly or comes from `SPIFFE_ENDPOINT_SOCKET`
//! (`unix:///path`); with neither, connecting fails with
//! [`WorkloadError::EndpointUnset`] (as in go-spiffe: the library has no default
//! socket). Every call carries the `workload.spiffe.io: true` header.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::Status;
use tonic::transport::{Channel, Endpoint, Uri};
use writ_spiffe::proto::workload as pb;
use writ_spiffe::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use writ_spiffe::spiffe_id::{SpiffeId, SpiffeIdError};

/// The environment variable that names the Workload API socket.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

#[cfg(feature = "jwt-source")]
mod jwt_source;
#[cfg(feature = "wpt")]
mod wit;
#[cfg(feature = "x509-source")]
mod x509_source;

#[cfg(feature = "jwt-source")]
pub use jwt_source::{JwtSource, JwtSourceBuilder};
#[cfg(feature = "wpt")]
pub use wit::WitWatch;
#[cfg(feature = "x509-source")]
pub use x509_source::{DEFAULT_WAIT, X509Snapshot, X509Source, X509SourceBuilder};

/// The endpoint named by `SPIFFE_ENDPOINT_SOCKET`.
///
/// # Errors
/// [`WorkloadError::EndpointUnset`] if the variable is unset or empty;
/// [`WorkloadError::Endpoint`] if it is not valid UTF-8.
pub fn endpoint_from_env() -> Result<String, WorkloadError> {
    endpoint_from(std::env::var_os(ENDPOINT_ENV).as_deref())
}

/// The endpoint given the value of `SPIFFE_ENDPOINT_SOCKET` (`None`: unset), for a
/// caller that reads its environment another way. There is no default socket: an
/// unset or empty value is an error, never a guess.
///
/// # Errors
/// [`WorkloadError::EndpointUnset`] if `value` is `None` or empty;
/// [`WorkloadError::Endpoint`] if it is not valid UTF-8.
pub fn endpoint_from(value: Option<&std::ffi::OsStr>) -> Result<String, WorkloadError> {
    match value {
        None => Err(WorkloadError::EndpointUnset {
            variable: ENDPOINT_ENV,
        }),
        Some(v) if v.is_empty() => Err(WorkloadError::EndpointUnset {
            variable: ENDPOINT_ENV,
        }),
        Some(v) => v
            .to_str()
            .map(str::to_owned)
            .ok_or_else(|| WorkloadError::Endpoint(v.to_string_lossy().into_owned())),
    }
}

/// Why a Workload API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// No endpoint was given and the environment variable `variable`
    /// (`SPIFFE_ENDPOINT_SOCKET`) is unset or empty.
    #[error(
        "no Workload API endpoint: {variable} is not set (set it to unix:///path/to/agent.sock, \
         or give the endpoint explicitly)"
    )]
    EndpointUnset {
        /// The environment variable that was read.
        variable: &'static str,
    },
    /// The endpoint is not `unix:///path` (or a plain path).
    #[error("invalid Workload API endpoint {0:?}: expected unix:///path")]
    Endpoint(String),
    /// The socket could not be reached.
    #[error("cannot reach the Workload API at {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The agent issued no identity to this process.
    #[error("no identity issued")]
    NoIdentity,
    /// The agent answered with another error.
    #[error("Workload API: {0}")]
    Status(String),
    /// The agent's response was malformed.
    #[error("malformed Workload API response: {0}")]
    Malformed(String),
    /// The stream ended.
    #[error("the Workload API stream ended")]
    StreamEnded,
}

impl From<Status> for WorkloadError {
    fn from(s: Status) -> Self {
        if s.code() == tonic::Code::PermissionDenied && s.message() == "no identity issued" {
            WorkloadError::NoIdentity
        } else {
            WorkloadError::Status(format!("{:?}: {}", s.code(), s.message()))
        }
    }
}

impl From<SpiffeIdError> for WorkloadError {
    fn from(e: SpiffeIdError) -> Self {
        WorkloadError::Malformed(e.to_string())
    }
}

/// One X509-SVID as the agent sent it. Its `Debug` shows the SPIFFE ID, the chain's
/// length and the leaf's SHA-256, never the private key.
#[derive(Clone)]
pub struct X509SvidEntry {
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub private_key: Vec<u8>,
    /// DER certificates of the trust domain bundle.
    pub bundle: Vec<Vec<u8>>,
    /// The entry's hint.
    pub hint: String,
}

impl std::fmt::Debug for X509SvidEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509SvidEntry")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("cert_chain_len", &self.cert_chain.len())
            .field(
                "leaf_sha256",
                &self
                    .cert_chain
                    .first()
                    .map(|leaf| writ_spiffe::fingerprint::sha256_hex(leaf)),
            )
            .field("private_key", &"<redacted>")
            .field("bundle_len", &self.bundle.len())
            .field("hint", &self.hint)
            .finish()
    }
}

/// The X.509 state the agent gives this workload.
#[derive(Debug, Clone)]
pub struct X509Context {
    /// SVIDs, the default first.
    pub svids: Vec<X509SvidEntry>,
    /// Federated trust domain ID -> DER certificates.
    pub federated: Vec<(String, Vec<Vec<u8>>)>,
}

/// A Workload API client.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    client: SpiffeWorkloadApiClient<Channel>,
}

/// Splits concatenated DER certificates.
///
/// # Errors
/// [`WorkloadError::Malformed`] if the bytes are not a sequence of DER certificates.
pub fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, WorkloadError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (cert, tail) = bytes.split_at(der_element_len(bytes)?);
        out.push(cert.to_vec());
        bytes = tail;
    }
    Ok(out)
}

/// The length (header included) of the DER SEQUENCE at the start of `bytes`.
fn der_element_len(bytes: &[u8]) -> Result<usize, WorkloadError> {
    let malformed = || WorkloadError::Malformed("not DER certificates".into());
    let (&tag, rest) = bytes.split_first().ok_or_else(malformed)?;
    if tag != 0x30 {
        return Err(malformed());
    }
    let (&first, rest) = rest.split_first().ok_or_else(malformed)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(malformed());
        }
        let (len_bytes, rest) = rest.split_at(n);
        (
            len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
            rest,
        )
    };
    if rest.len() < len {
        return Err(malformed());
    }
    Ok(bytes.len() - rest.len() + len)
}

fn socket_path(endpoint: &str) -> Result<PathBuf, WorkloadError> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        if path.starts_with('/') {
            return Ok(PathBuf::from(path));
        }
    } else if let Some(path) = endpoint.strip_prefix("unix:") {
        if path.starts_with('/') {
            return Ok(PathBuf::from(path));
        }
    } else if endpoint.starts_with('/') {
        return Ok(PathBuf::from(endpoint));
    }
    Err(WorkloadError::Endpoint(endpoint.to_owned()))
}

pub(crate) fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// A gRPC channel to the agent socket at `endpoint` (`unix:///path`).
pub(crate) async fn channel(endpoint: &str) -> Result<Channel, WorkloadError> {
    let path = socket_path(endpoint)?;
    Endpoint::from_static("http://workload-api.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| WorkloadError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}

impl WorkloadClient {
    /// Connects to the socket named by `SPIFFE_ENDPOINT_SOCKET`.
    ///
    /// # Errors
    /// [`WorkloadError::EndpointUnset`] if the variable is unset; [`WorkloadError`] if
    /// the endpoint is malformed or unreachable.
    pub async fn connect_env() -> Result<Self, WorkloadError> {
        Self::connect(&endpoint_from_env()?).await
    }

    /// Connects to `unix:///path` (or a plain absolute path).
    ///
    /// # Errors
    /// [`WorkloadError`] if the endpoint is malformed or unreachable.
    pub async fn connect(endpoint: &str) -> Result<Self, WorkloadError> {
        Ok(Self {
            client: SpiffeWorkloadApiClient::new(channel(endpoint).await?),
        })
    }

    /// The first X.509 context the agent sends.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers.
    pub async fn fetch_x509(&mut self) -> Result<X509Context, WorkloadError> {
        let mut stream = self.watch_x509().await?;
        stream.next().await
    }

    /// A stream of X.509 contexts: the current one, then one per change.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers.
    pub async fn watch_x509(&mut self) -> Result<X509Watch, WorkloadError> {
        let stream = self
            .client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await?
            .into_inner();
        Ok(X509Watch { stream })
    }

    /// JWT-SVIDs for `audience` (all identities, or the one named).
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers.
    pub async fn fetch_jwt(
        &mut self,
        audience: &[String],
        spiffe_id: Option<&SpiffeId>,
    ) -> Result<Vec<(SpiffeId, String)>, WorkloadError> {
        let response = self
            .client
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience: audience.to_vec(),
                spiffe_id: spiffe_id.map(ToString::to_string).unwrap_or_default(),
            }))
            .await?
            .into_inner();
        response
            .svids
            .into_iter()
            .map(|s| Ok((SpiffeId::new(&s.spiffe_id)?, s.svid)))
            .collect()
    }

    /// The JWT bundles (trust domain ID -> JWKS bytes) the agent has for this workload.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers.
    pub async fn fetch_jwt_bundles(&mut self) -> Result<Vec<(String, Vec<u8>)>, WorkloadError> {
        let mut stream = self
            .client
            .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
            .await?
            .into_inner();
        let response = stream.message().await?.ok_or(WorkloadError::StreamEnded)?;
        Ok(response.bundles.into_iter().collect())
    }

    /// Has the agent validate a JWT-SVID for `audience`; returns its SPIFFE ID and claims.
    ///
    /// # Errors
    /// [`WorkloadError`] if the token is invalid or the agent refuses.
    pub async fn validate_jwt(
        &mut self,
        audience: &str,
        token: &str,
    ) -> Result<(SpiffeId, serde_json::Value), WorkloadError> {
        let r = self
            .client
            .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
                audience: audience.to_owned(),
                svid: token.to_owned(),
            }))
            .await?
            .into_inner();
        let claims = r
            .claims
            .map(struct_to_json)
            .unwrap_or(serde_json::Value::Null);
        Ok((SpiffeId::new(&r.spiffe_id)?, claims))
    }
}

/// An open FetchX509SVID stream.
#[derive(Debug)]
pub struct X509Watch {
    stream: tonic::Streaming<pb::X509svidResponse>,
}

impl X509Watch {
    /// The next X.509 context.
    ///
    /// # Errors
    /// [`WorkloadError`] if the stream fails or ends.
    pub async fn next(&mut self) -> Result<X509Context, WorkloadError> {
        let r = self
            .stream
            .message()
            .await?
            .ok_or(WorkloadError::StreamEnded)?;
        let svids = r
            .svids
            .into_iter()
            .map(|s| {
                Ok(X509SvidEntry {
                    spiffe_id: SpiffeId::new(&s.spiffe_id)?,
                    cert_chain: split_der(&s.x509_svid)?,
                    private_key: s.x509_svid_key,
                    bundle: split_der(&s.bundle)?,
                    hint: s.hint,
                })
            })
            .collect::<Result<Vec<_>, WorkloadError>>()?;
        let federated = r
            .federated_bundles
            .into_iter()
            .map(|(td, der)| Ok((td, split_der(&der)?)))
            .collect::<Result<Vec<_>, WorkloadError>>()?;
        Ok(X509Context { svids, federated })
    }
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(n as i64)
            } else {
                serde_json::Value::from(n)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[test]
    fn an_unset_endpoint_is_an_error_naming_the_variable() {
        use std::ffi::OsStr;
        for unset in [None, Some(OsStr::new(""))] {
            let err = endpoint_from(unset).unwrap_err();
            assert!(
                matches!(
                    err,
                    WorkloadError::EndpointUnset {
                        variable: "SPIFFE_ENDPOINT_SOCKET"
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
            assert!(!err.to_string().contains("/tmp/writ"), "{err}");
        }
        assert_eq!(
            endpoint_from(Some(OsStr::new("unix:///run/agent.sock"))).unwrap(),
            "unix:///run/agent.sock"
        );
    }

    #[test]
    fn x509_svid_entry_debug_never_shows_the_private_key() {
        let key = writ_spiffe::key::PrivateKey::generate().unwrap();
        let der = key.pkcs8_der().to_vec();
        let pem = key.to_pem();
        let entry = X509SvidEntry {
            spiffe_id: SpiffeId::new("spiffe://example.org/w").unwrap(),
            cert_chain: vec![vec![0x30, 0x03, 1, 2, 3], vec![0x30, 0x01, 9]],
            private_key: der.clone(),
            bundle: vec![vec![0x30, 0x01, 7]],
            hint: "internal".into(),
        };
        let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        // Any 8 consecutive key bytes, as `Vec<u8>`'s Debug would print them.
        let windows: Vec<String> = der
            .windows(8)
            .map(|w| format!("{w:?}").trim_matches(['[', ']']).to_owned())
            .collect();
        for text in [format!("{entry:?}"), format!("{entry:#?}")] {
            assert!(text.contains("spiffe://example.org/w"), "{text}");
            assert!(text.contains("cert_chain_len: 2"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
            assert!(!text.contains(&hex), "{text}");
            for window in &windows {
                assert!(!text.contains(window.as_str()), "key bytes in {text}");
            }
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!text.contains(line), "PEM in {text}");
            }
        }
    }

    #[test]
    fn split_der_refuses_garbage() {
        assert!(
            split_der(&[0x30, 0x03, 1, 2, 3, 0x30, 0x01, 9])
                .unwrap()
                .len()
                == 2
        );
        assert!(split_der(&[0x31, 0x00]).is_err());
        assert!(split_der(&[0x30, 0x05, 1]).is_err());
        assert!(split_der(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err());
        assert!(split_der(&[]).unwrap().is_empty());
    }
}
