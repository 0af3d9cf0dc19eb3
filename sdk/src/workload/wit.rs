//! The WIT-SVID profile of the Workload API: `FetchWITSVID` and `FetchWITBundles`.

use writ_spiffe::proto::workload as pb;
use writ_spiffe::spiffe_id::TrustDomain;
use writ_spiffe::svid::wit::WitBundles;

use super::{WorkloadClient, WorkloadError, with_header};
use crate::wpt::WitSvid;

fn wit_svids(response: pb::WitsvidResponse) -> Result<Vec<WitSvid>, WorkloadError> {
    response
        .svids
        .into_iter()
        .map(|s| {
            let svid = WitSvid::new(s.wit_svid, &s.wit_svid_key)
                .map_err(|e| WorkloadError::Malformed(e.to_string()))?;
            if svid.spiffe_id().as_str() != s.spiffe_id {
                return Err(WorkloadError::Malformed(
                    "a WIT-SVID's sub is not its spiffe_id".into(),
                ));
            }
            Ok(svid.with_hint(s.hint))
        })
        .collect()
}

impl WorkloadClient {
    /// This workload's WIT-SVIDs (the default identity first), each with its key.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers (`Unimplemented` from an agent without the
    /// WIT-SVID profile), or [`WorkloadError::Malformed`] for an unreadable WIT or key.
    pub async fn fetch_wit(&mut self) -> Result<Vec<WitSvid>, WorkloadError> {
        self.watch_wit().await?.next().await
    }

    /// Opens the `FetchWITSVID` stream: the WIT-SVIDs now and after every renewal.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers.
    pub async fn watch_wit(&mut self) -> Result<WitWatch, WorkloadError> {
        let stream = self
            .client
            .fetch_witsvid(with_header(pb::WitsvidRequest::default()))
            .await?
            .into_inner();
        Ok(WitWatch { stream })
    }

    /// The WIT-SVID signing keys of the trust domains this workload trusts.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers, or [`WorkloadError::Malformed`] for a bad
    /// trust domain or JWKS.
    pub async fn fetch_wit_bundles(&mut self) -> Result<WitBundles, WorkloadError> {
        let mut stream = self
            .client
            .fetch_wit_bundles(with_header(pb::WitBundlesRequest {}))
            .await?
            .into_inner();
        let response = stream.message().await?.ok_or(WorkloadError::StreamEnded)?;
        let mut bundles = WitBundles::new();
        for (td, jwks) in response.bundles {
            let td = TrustDomain::new(&td)?;
            bundles
                .insert_jwks(td, &jwks)
                .map_err(|e| WorkloadError::Malformed(e.to_string()))?;
        }
        Ok(bundles)
    }
}

/// An open `FetchWITSVID` stream.
#[derive(Debug)]
pub struct WitWatch {
    stream: tonic::Streaming<pb::WitsvidResponse>,
}

impl WitWatch {
    /// The next set of WIT-SVIDs.
    ///
    /// # Errors
    /// [`WorkloadError`] if the stream fails or ends.
    pub async fn next(&mut self) -> Result<Vec<WitSvid>, WorkloadError> {
        let response = self
            .stream
            .message()
            .await?
            .ok_or(WorkloadError::StreamEnded)?;
        wit_svids(response)
    }
}
