//! What the `writ demo` programs share: each hop answers a JSON report of what it
//! verified, with the next hop's report under `"next"`, so the caller sees the whole
//! path.

use serde_json::{Value, json};
use writ_sdk::middleware::Verified;

/// Largest request or report body the demo programs read (64 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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
