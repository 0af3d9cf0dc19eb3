//! The admin API's federation and foreign-bundle requests (`writ federation ...`,
//! `writ bundle set|list|delete`): validation, the store, and waking the refresher.
//! The server's own trust domain is refused everywhere here: its bundle is the CA's.

use super::refresh::{self, Refreshed};
use super::{FederationError, Relationship, parse_bundle_input, parse_profile};
use crate::bundle::Bundle;
use crate::proto::admin as pb;
use crate::server::ServerState;
use crate::server::admin::AdminError;
use crate::spiffe_id::TrustDomain;
use crate::store::{BundleRecord, FederationRecord, StoreError};

/// A foreign trust domain from its name or `spiffe://` form.
fn foreign(state: &ServerState, text: &str) -> Result<TrustDomain, AdminError> {
    let td = TrustDomain::new(text.trim()).map_err(|e| AdminError::Invalid {
        field: "trust_domain",
        reason: format!("{text:?}: {e}"),
    })?;
    if td == state.config.trust_domain {
        return Err(FederationError::OwnTrustDomain(td.to_string()).into());
    }
    Ok(td)
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

fn relationship(
    state: &ServerState,
    p: &pb::FederationRelationship,
) -> Result<Relationship, AdminError> {
    let td = foreign(state, &p.trust_domain)?;
    let profile = parse_profile(
        &p.bundle_endpoint_profile,
        non_empty(&p.endpoint_spiffe_id),
        non_empty(&p.web_ca_pem).map(str::to_owned),
    )?;
    Ok(Relationship::new(td, &p.bundle_endpoint_url, profile)?)
}

fn bootstrap(
    rel: &Relationship,
    p: &pb::FederationRelationship,
) -> Result<Option<Bundle>, AdminError> {
    if p.trust_domain_bundle.is_empty() {
        return Ok(None);
    }
    Ok(Some(parse_bundle_input(
        rel.trust_domain().clone(),
        &p.trust_domain_bundle,
        &p.trust_domain_bundle_format,
    )?))
}

async fn store_bundle(state: &ServerState, bundle: &Bundle) -> Result<(), AdminError> {
    state
        .store
        .put_bundle(&BundleRecord {
            trust_domain_id: bundle.trust_domain().id_string(),
            document: bundle.to_json(),
            sequence: bundle.sequence(),
        })
        .await?;
    Ok(())
}

fn to_proto(r: &FederationRecord, held: Option<&BundleRecord>) -> pb::FederationRelationship {
    pb::FederationRelationship {
        trust_domain: r
            .trust_domain_id
            .strip_prefix("spiffe://")
            .unwrap_or(&r.trust_domain_id)
            .to_owned(),
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        bundle_endpoint_profile: r.profile.clone(),
        endpoint_spiffe_id: r.endpoint_spiffe_id.clone(),
        web_ca_pem: r.web_ca_pem.clone(),
        trust_domain_bundle: String::new(),
        trust_domain_bundle_format: String::new(),
        created_at: r.created_at,
        last_refresh_at: r.last_refresh_at.unwrap_or(0),
        last_error: r.last_error.clone().unwrap_or_default(),
        next_refresh_at: r.next_refresh_at.unwrap_or(0),
        bundle_sequence: held.map_or(0, |b| b.sequence),
        has_bundle: held.is_some(),
    }
}

fn bundle_to_proto(record: &BundleRecord) -> pb::Bundle {
    let td = record
        .trust_domain_id
        .strip_prefix("spiffe://")
        .unwrap_or(&record.trust_domain_id)
        .to_owned();
    let pem = TrustDomain::new(&record.trust_domain_id)
        .ok()
        .and_then(|t| Bundle::from_json(t, &record.document).ok())
        .map(|b| b.to_pem())
        .unwrap_or_default();
    pb::Bundle {
        trust_domain: td,
        spiffe: record.document.clone(),
        pem,
        sequence: record.sequence,
    }
}

const NOT_FOUND: AdminError = AdminError::Store(StoreError::NotFound {
    kind: "federation relationship",
});

/// `CreateFederation`: stores a relationship (and its bootstrap bundle) and wakes the
/// refresher.
///
/// # Errors
/// [`AdminError`] for a malformed or duplicate relationship, or a store failure.
pub async fn create(
    state: &ServerState,
    p: pb::FederationRelationship,
) -> Result<pb::FederationRelationship, AdminError> {
    let rel = relationship(state, &p)?;
    let bundle = bootstrap(&rel, &p)?;
    state
        .store
        .create_federation(&rel.to_record(state.clock.unix_seconds()))
        .await?;
    if let Some(b) = &bundle {
        store_bundle(state, b).await?;
    }
    state.wake_federation();
    get(state, rel.trust_domain().as_str()).await
}

/// `UpdateFederation`: replaces a relationship's settings (and stores a bundle if one is
/// given), keeping its status.
///
/// # Errors
/// As [`create`]; NOT_FOUND for an unknown trust domain.
pub async fn update(
    state: &ServerState,
    p: pb::FederationRelationship,
) -> Result<pb::FederationRelationship, AdminError> {
    let rel = relationship(state, &p)?;
    let bundle = bootstrap(&rel, &p)?;
    let existing = state
        .store
        .fetch_federation(&rel.trust_domain().id_string())
        .await?
        .ok_or(NOT_FOUND)?;
    state
        .store
        .update_federation(&rel.to_record(existing.created_at))
        .await?;
    if let Some(b) = &bundle {
        store_bundle(state, b).await?;
    }
    state.wake_federation();
    get(state, rel.trust_domain().as_str()).await
}

/// `GetFederation`.
///
/// # Errors
/// NOT_FOUND for an unknown trust domain.
pub async fn get(state: &ServerState, td: &str) -> Result<pb::FederationRelationship, AdminError> {
    let td = foreign(state, td)?;
    let record = state
        .store
        .fetch_federation(&td.id_string())
        .await?
        .ok_or(NOT_FOUND)?;
    let held = state.store.fetch_bundle(&td.id_string()).await?;
    Ok(to_proto(&record, held.as_ref()))
}

/// `ListFederations`.
///
/// # Errors
/// A store failure.
pub async fn list(state: &ServerState) -> Result<Vec<pb::FederationRelationship>, AdminError> {
    let bundles = state.store.list_bundles().await?;
    Ok(state
        .store
        .list_federations()
        .await?
        .iter()
        .map(|r| {
            let held = bundles
                .iter()
                .find(|b| b.trust_domain_id == r.trust_domain_id);
            to_proto(r, held)
        })
        .collect())
}

/// `DeleteFederation`: stops the refresh; the stored bundle stays (`DeleteBundle`).
///
/// # Errors
/// NOT_FOUND for an unknown trust domain.
pub async fn delete(
    state: &ServerState,
    td: &str,
) -> Result<pb::FederationRelationship, AdminError> {
    let before = get(state, td).await?;
    let td = foreign(state, td)?;
    state.store.delete_federation(&td.id_string()).await?;
    state.wake_federation();
    Ok(before)
}

/// `RefreshFederation`: fetches now, records the outcome as the refresher would, and
/// returns the relationship.
///
/// # Errors
/// NOT_FOUND for an unknown trust domain; a refused fetch is not an error (it is in
/// `last_error`).
pub async fn refresh(
    state: &ServerState,
    td: &str,
) -> Result<pb::FederationRelationship, AdminError> {
    let td = foreign(state, td)?;
    let record = state
        .store
        .fetch_federation(&td.id_string())
        .await?
        .ok_or(NOT_FOUND)?;
    let rel = Relationship::from_record(&record)?;
    let limits = state.config.federation.limits;
    let now = state.clock.unix_seconds();
    let (refreshed_at, error, wait) = match refresh::refresh_one(state, &rel, limits).await {
        Ok((what, interval)) => {
            if let Refreshed::Stored(seq) = what {
                tracing::info!(trust_domain = %td, sequence = seq, "federation: stored a new bundle (refresh asked)");
            }
            (Some(now), None, interval)
        }
        Err(e) => {
            tracing::warn!(trust_domain = %td, error = %e, "federation: refresh failed; the last good bundle is kept");
            (None, Some(e.to_string()), limits.min_refresh)
        }
    };
    let next = now.saturating_add(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
    state
        .store
        .record_federation_refresh(&td.id_string(), refreshed_at, error.as_deref(), next)
        .await?;
    get(state, td.as_str()).await
}

/// `SetBundle`: stores (replaces) a foreign trust domain's bundle.
///
/// # Errors
/// INVALID_ARGUMENT for the own trust domain or an invalid bundle.
pub async fn set_bundle(
    state: &ServerState,
    p: pb::SetBundleRequest,
) -> Result<pb::Bundle, AdminError> {
    let td = foreign(state, &p.trust_domain)?;
    let bundle = parse_bundle_input(td, &p.bundle, &p.format)?;
    store_bundle(state, &bundle).await?;
    let record = state
        .store
        .fetch_bundle(&bundle.trust_domain().id_string())
        .await?
        .ok_or(AdminError::Store(StoreError::NotFound { kind: "bundle" }))?;
    Ok(bundle_to_proto(&record))
}

/// `ListBundles`: the foreign bundles held.
///
/// # Errors
/// A store failure.
pub async fn list_bundles(state: &ServerState) -> Result<Vec<pb::Bundle>, AdminError> {
    let own = state.config.trust_domain.id_string();
    Ok(state
        .store
        .list_bundles()
        .await?
        .iter()
        .filter(|b| b.trust_domain_id != own)
        .map(bundle_to_proto)
        .collect())
}

/// `DeleteBundle`: removes a foreign bundle; refused while a relationship refreshes it.
///
/// # Errors
/// INVALID_ARGUMENT for the own trust domain, FAILED_PRECONDITION while a relationship
/// exists, NOT_FOUND if none is held.
pub async fn delete_bundle(state: &ServerState, td: &str) -> Result<pb::Bundle, AdminError> {
    let td = foreign(state, td)?;
    let id = td.id_string();
    if state.store.fetch_federation(&id).await?.is_some() {
        return Err(AdminError::Precondition(format!(
            "a federation relationship refreshes the bundle of {td}: delete it first \
             (`writ federation delete --trust-domain {td}`)"
        )));
    }
    let record = state
        .store
        .fetch_bundle(&id)
        .await?
        .ok_or(AdminError::Store(StoreError::NotFound { kind: "bundle" }))?;
    state.store.delete_bundle(&id).await?;
    Ok(bundle_to_proto(&record))
}
