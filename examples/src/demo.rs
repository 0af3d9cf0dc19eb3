//! What the `writ demo` programs share: each hop answers a JSON report of what it
//! verified, with the next hop's report under `"next"`, so the caller sees the whole
//! path.

use serde_json::{Value, json};
use writ_sdk::audit::{LogSink, TtsSink};
use writ_sdk::exchange::{ExchangeError, TxnClient};
use writ_sdk::middleware::Verified;
use writ_sdk::tls::{self, Authorizer, TlsError};
use writ_sdk::trace::TraceContext;
use writ_sdk::txn_token::{JwksSource, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_sdk::{SpiffeId, TrustDomain};

/// Largest request or report body the demo programs read (64 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Where the transaction token service is, and who it must be.
#[derive(Debug, Clone, clap::Args)]
pub struct TtsArgs {
    /// The transaction token service's base URL.
    #[arg(long)]
    pub tts_url: String,
    /// The transaction token service's SPIFFE ID (its server SVID must have it).
    #[arg(long)]
    pub tts_id: SpiffeId,
}

impl TtsArgs {
    /// An exchange client that authenticates with `source`'s SVID.
    ///
    /// # Errors
    /// [`ExchangeError::Tls`] if the TLS configuration cannot be built.
    pub fn client(&self, source: &X509Source) -> Result<TxnClient, ExchangeError> {
        TxnClient::new(source, &self.tts_url, self.tts_id.clone())
    }

    /// The sink a demo service records its verifications to: the token service (over
    /// `client`'s mTLS) and the log.
    ///
    /// # Errors
    /// Outside a Tokio runtime.
    pub fn audit_sink(
        &self,
        client: &TxnClient,
    ) -> Result<(TtsSink, LogSink), writ_sdk::audit::SinkError> {
        Ok((client.audit_sink()?, LogSink))
    }

    /// A Txn-Token verifier for `trust_domain` whose keys come from the service's JWKS,
    /// fetched over mTLS, and which requires the service as the issuer.
    ///
    /// # Errors
    /// [`TlsError`] if the TLS configuration cannot be built.
    pub fn verifier(
        &self,
        source: &X509Source,
        trust_domain: &TrustDomain,
    ) -> Result<TxnVerifier, TlsError> {
        let keys = JwksSource::Url {
            url: format!("{}/.well-known/jwks.json", self.tts_url),
            http: tls::http_client(source, Authorizer::id(self.tts_id.clone()))?,
        };
        Ok(TxnVerifier::builder(trust_domain.clone(), keys)
            .issuer(self.tts_url.clone())
            .build())
    }
}

/// What a hop verified about its caller and the Txn-Token it carried.
pub fn verified_json(v: &Verified) -> Value {
    json!({
        "caller": v.caller.to_string(),
        "user": v.txn.sub,
        "scope": v.txn.scope,
        "txn": v.txn.txn,
        "req_wl": v.txn.req_wl,
        "chain": v.txn.chain(),
        "expires_at": v.txn.exp,
        "trace_id": v.trace.as_ref().map(TraceContext::trace_id),
    })
}

/// The JSON body of a successful response, or an error naming `who` with its status
/// and error body.
///
/// # Errors
/// A non-2xx status, an oversized body, or a body that is not JSON.
pub async fn json_or_error(response: reqwest::Response, who: &str) -> anyhow::Result<Value> {
    let status = response.status();
    let bytes = response.bytes().await?;
    anyhow::ensure!(
        bytes.len() <= MAX_BODY_BYTES,
        "{who} answered more than {MAX_BODY_BYTES} bytes"
    );
    let text = String::from_utf8_lossy(&bytes);
    anyhow::ensure!(status.is_success(), "{who} answered {status}: {text}");
    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{who} answered non-JSON: {e}"))
}
