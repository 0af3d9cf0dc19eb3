//! The SQL shared by both backends. The statements live in [`super::schema`]; the
//! code that runs them is the same for SQLite and PostgreSQL up to the connection type,
//! so it is written once here and stamped out for each backend by [`sql_store!`].

use futures::future::BoxFuture;
use sqlx::pool::PoolConnectionMetadata;

/// The pool's `after_release` check of both backends: a connection still inside a
/// transaction when it comes back is closed, never reused. A write that fails drops its
/// transaction, and sqlx queues a `ROLLBACK` for the connection's next command; when
/// that rollback fails too (SQLite rolls the transaction back by itself on a full disk,
/// so the queued `ROLLBACK` finds none), the connection would keep counting an open
/// transaction and refuse every later `BEGIN` ("attempted to call begin_with at
/// non-zero transaction depth") until a restart.
pub(super) fn release_clean<C: sqlx::Connection>(
    conn: &mut C,
    _meta: PoolConnectionMetadata,
) -> BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        if !conn.is_in_transaction() {
            return Ok(true);
        }
        // Let the queued rollback run, then look again.
        conn.ping().await?;
        if conn.is_in_transaction() {
            tracing::warn!("closing a store connection left inside a failed transaction");
            return Ok(false);
        }
        Ok(true)
    })
}

/// Implements the row-writing helpers and [`super::Store`] for a store type with a
/// `pool` field and a `begin_write()` method, over the given connection type. The
/// invoking module must import the same names both backends import (see `sqlite.rs`).
macro_rules! sql_store {
    ($store:ident, $conn:ty) => {
        /// Writes entries and their selectors, many rows per statement.
        async fn insert_entries(
            conn: &mut $conn,
            entries: &[EntryParams<'_>],
        ) -> Result<(), StoreError> {
            for chunk in entries.chunks(schema::ENTRY_ROWS_PER_INSERT) {
                let mut query = sqlx::query(schema::insert_entries_sql(chunk.len())?);
                for params in chunk {
                    query = bind_entry(query, params).bind(params.created_at);
                }
                query
                    .execute(&mut *conn)
                    .await
                    .map_err(schema::unique_violation_is("entry"))?;
            }
            insert_selectors(conn, entries).await
        }

        /// Writes the selector rows of entries already written.
        async fn insert_selectors(
            conn: &mut $conn,
            entries: &[EntryParams<'_>],
        ) -> Result<(), StoreError> {
            let rows: Vec<_> = schema::selector_rows(entries).collect();
            for chunk in rows.chunks(schema::SELECTOR_ROWS_PER_INSERT) {
                let mut query = sqlx::query(schema::insert_selectors_sql(chunk.len())?);
                for (entry_id, count, selector) in chunk {
                    query = query
                        .bind(*entry_id)
                        .bind(*count)
                        .bind(selector.kind())
                        .bind(selector.value());
                }
                query
                    .execute(&mut *conn)
                    .await
                    .map_err(schema::unique_violation_is("entry"))?;
            }
            Ok(())
        }

        /// The one lease `sql` selects by its single text parameter `key`.
        async fn fetch_lease_where<'e, E>(
            executor: E,
            sql: &'static str,
            key: &str,
        ) -> Result<Option<LeaseRecord>, StoreError>
        where
            E: sqlx::Executor<'e, Database = <$conn as sqlx::Connection>::Database>,
        {
            sqlx::query(sql)
                .bind(key)
                .fetch_optional(executor)
                .await?
                .as_ref()
                .map(lease_from_row)
                .transpose()
        }

        async fn fetch_entry_on(
            conn: &mut $conn,
            id: &str,
        ) -> Result<Option<RegistrationEntry>, StoreError> {
            sqlx::query(schema::FETCH_ENTRY)
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(entry_from_row)
                .transpose()
        }

        /// Appends checked `events` to the audit chain on `conn`, inside a transaction
        /// that already holds the chain head (`AUDIT_LOCK`, or SQLite's write lock).
        /// Returns the new head's sequence.
        async fn append_audit_on(
            conn: &mut $conn,
            events: &[super::audit::AuditEvent],
        ) -> Result<u64, StoreError> {
            use super::audit as a;
            let anchor = sqlx::query(a::FETCH_ANCHOR)
                .fetch_one(&mut *conn)
                .await
                .map_err(StoreError::from)
                .and_then(|row| a::anchor_from_sql(&row))?;
            let mut seq = anchor.head_seq;
            let mut prev = if anchor.head_seq == 0 {
                a::GENESIS_HASH.to_owned()
            } else {
                anchor.head_hash
            };
            for event in events {
                seq += 1;
                let hash = a::row_hash(seq, &prev, event);
                sqlx::query(a::INSERT_ROW)
                    .bind(schema::to_i64(seq, "seq")?)
                    .bind(event.at_ms)
                    .bind(event.kind.as_str())
                    .bind(event.decision.as_str())
                    .bind(event.txn.as_str())
                    .bind(event.sub.as_str())
                    .bind(event.caller.as_str())
                    .bind(event.service.as_str())
                    .bind(event.lease.as_str())
                    .bind(event.record.as_str())
                    .bind(prev.as_str())
                    .bind(hash.as_str())
                    .execute(&mut *conn)
                    .await?;
                prev = hash;
            }
            if !events.is_empty() {
                sqlx::query(a::SET_HEAD)
                    .bind(schema::to_i64(seq, "seq")?)
                    .bind(prev.as_str())
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(seq)
        }

        #[async_trait::async_trait]
        impl Store for $store {
            async fn create_entry(
                &self,
                entry: &RegistrationEntry,
            ) -> Result<RegistrationEntry, StoreError> {
                let params = EntryParams::new(entry)?;
                let mut tx = self.begin_write().await?;
                insert_entries(&mut tx, std::slice::from_ref(&params)).await?;
                tx.commit().await?;
                self.changed(StoreChange::Entry(entry.id.clone()));
                Ok(params.created(entry))
            }

            async fn create_entries(
                &self,
                entries: &[RegistrationEntry],
            ) -> Result<(), StoreError> {
                let params = entries
                    .iter()
                    .map(EntryParams::new)
                    .collect::<Result<Vec<_>, _>>()?;
                let mut tx = self.begin_write().await?;
                insert_entries(&mut tx, &params).await?;
                tx.commit().await?;
                if entries.len() > 64 {
                    self.changed(StoreChange::Resync);
                } else {
                    for entry in entries {
                        self.changed(StoreChange::Entry(entry.id.clone()));
                    }
                }
                Ok(())
            }

            async fn fetch_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, StoreError> {
                let mut conn = self.pool.acquire().await?;
                fetch_entry_on(&mut conn, id).await
            }

            async fn update_entry(
                &self,
                entry: &RegistrationEntry,
            ) -> Result<RegistrationEntry, StoreError> {
                let params = EntryParams::new(entry)?;
                let mut tx = self.begin_write().await?;
                let done = bind_entry(sqlx::query(schema::UPDATE_ENTRY), &params)
                    .bind(entry.revision)
                    .execute(&mut *tx)
                    .await
                    .map_err(schema::unique_violation_is("entry"))?;
                if done.rows_affected() == 0 {
                    let stored: Option<i64> = sqlx::query_scalar(schema::ENTRY_REVISION)
                        .bind(params.id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    return Err(schema::not_updated(stored));
                }
                sqlx::query(schema::DELETE_ENTRY_SELECTORS)
                    .bind(params.id)
                    .execute(&mut *tx)
                    .await?;
                insert_selectors(&mut tx, std::slice::from_ref(&params)).await?;
                let updated = fetch_entry_on(&mut tx, params.id)
                    .await?
                    .ok_or(StoreError::NotFound { kind: "entry" })?;
                tx.commit().await?;
                self.changed(StoreChange::Entry(updated.id.clone()));
                Ok(updated)
            }

            async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry, StoreError> {
                let mut tx = self.begin_write().await?;
                let entry = fetch_entry_on(&mut tx, id)
                    .await?
                    .ok_or(StoreError::NotFound { kind: "entry" })?;
                sqlx::query(schema::DELETE_ENTRY)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                self.changed(StoreChange::Entry(entry.id.clone()));
                Ok(entry)
            }

            async fn list_entries(
                &self,
                filter: &EntryFilter,
            ) -> Result<Vec<RegistrationEntry>, StoreError> {
                let query = match (&filter.spiffe_id, &filter.parent_id) {
                    (None, None) => sqlx::query(schema::LIST_ENTRIES),
                    (Some(id), None) => {
                        sqlx::query(schema::LIST_ENTRIES_BY_SPIFFE_ID).bind(id.as_str())
                    }
                    (None, Some(parent)) => {
                        sqlx::query(schema::LIST_ENTRIES_BY_PARENT_ID).bind(parent.as_str())
                    }
                    (Some(id), Some(parent)) => sqlx::query(schema::LIST_ENTRIES_BY_BOTH)
                        .bind(id.as_str())
                        .bind(parent.as_str()),
                };
                let rows = query.fetch_all(&self.pool).await?;
                rows.iter().map(entry_from_row).collect()
            }

            async fn find_entries_by_selectors(
                &self,
                selectors: &[Selector],
            ) -> Result<Vec<RegistrationEntry>, StoreError> {
                let Some(selectors) = schema::lookup_selectors(selectors)? else {
                    return Ok(Vec::new());
                };
                let mut query = sqlx::query(schema::find_by_selectors_sql(selectors.len())?);
                for selector in selectors {
                    query = query.bind(selector.kind()).bind(selector.value());
                }
                let rows = query.fetch_all(&self.pool).await?;
                rows.iter().map(entry_from_row).collect()
            }

            async fn count_entries(&self) -> Result<u64, StoreError> {
                let count: i64 = sqlx::query_scalar(schema::COUNT_ENTRIES)
                    .fetch_one(&self.pool)
                    .await?;
                schema::count_from_i64(count)
            }

            async fn create_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError> {
                sqlx::query(schema::INSERT_AGENT)
                    .bind(agent.spiffe_id.as_str())
                    .bind(agent.attestation_type.as_str())
                    .bind(agent.cert_serial.as_str())
                    .bind(agent.cert_expires_at)
                    .bind(schema::selectors_json(&agent.selectors)?)
                    .bind(agent.banned)
                    .bind(agent.created_at)
                    .bind(agent.cert_sha256.as_str())
                    .bind(agent.next_cert_sha256.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(schema::unique_violation_is("agent"))?;
                self.changed(StoreChange::Agent(agent.spiffe_id.to_string()));
                Ok(())
            }

            async fn fetch_agent(
                &self,
                id: &SpiffeId,
            ) -> Result<Option<AttestedAgent>, StoreError> {
                sqlx::query(schema::FETCH_AGENT)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(agent_from_row)
                    .transpose()
            }

            async fn update_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError> {
                let done = sqlx::query(schema::UPDATE_AGENT)
                    .bind(agent.spiffe_id.as_str())
                    .bind(agent.attestation_type.as_str())
                    .bind(agent.cert_serial.as_str())
                    .bind(agent.cert_expires_at)
                    .bind(schema::selectors_json(&agent.selectors)?)
                    .bind(agent.banned)
                    .bind(agent.created_at)
                    .bind(agent.cert_sha256.as_str())
                    .bind(agent.next_cert_sha256.as_str())
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "agent")?;
                self.changed(StoreChange::Agent(agent.spiffe_id.to_string()));
                Ok(())
            }

            async fn delete_agent(&self, id: &SpiffeId) -> Result<(), StoreError> {
                let done = sqlx::query(schema::DELETE_AGENT)
                    .bind(id.as_str())
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "agent")?;
                self.changed(StoreChange::Agent(id.to_string()));
                Ok(())
            }

            async fn list_agents(&self) -> Result<Vec<AttestedAgent>, StoreError> {
                let rows = sqlx::query(schema::LIST_AGENTS)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(agent_from_row).collect()
            }

            async fn switch_agent_svid(
                &self,
                id: &SpiffeId,
                cert_sha256: &str,
                cert_serial: &str,
                cert_expires_at: i64,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(schema::SWITCH_AGENT_SVID)
                    .bind(id.as_str())
                    .bind(cert_sha256)
                    .bind(cert_serial)
                    .bind(cert_expires_at)
                    .execute(&self.pool)
                    .await?;
                let switched = done.rows_affected() == 1;
                if switched {
                    self.changed(StoreChange::Agent(id.to_string()));
                }
                Ok(switched)
            }

            async fn set_next_agent_svid(
                &self,
                id: &SpiffeId,
                current_cert_sha256: &str,
                next_cert_sha256: &str,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(schema::SET_NEXT_AGENT_SVID)
                    .bind(id.as_str())
                    .bind(current_cert_sha256)
                    .bind(next_cert_sha256)
                    .execute(&self.pool)
                    .await?;
                let set = done.rows_affected() == 1;
                if set {
                    self.changed(StoreChange::Agent(id.to_string()));
                }
                Ok(set)
            }

            async fn record_trust_domain(&self, trust_domain: &str) -> Result<String, StoreError> {
                // Run to completion (not `fetch_one`): a write statement left part way
                // would keep its transaction open on the pooled connection.
                let recorded: Vec<String> = sqlx::query_scalar(schema::RECORD_TRUST_DOMAIN)
                    .bind(trust_domain)
                    .fetch_all(&self.pool)
                    .await?;
                recorded.into_iter().next().ok_or(StoreError::NotFound {
                    kind: "trust domain",
                })
            }

            async fn fetch_trust_domain(&self) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar(schema::FETCH_TRUST_DOMAIN)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
                sqlx::query(schema::INSERT_JOIN_TOKEN)
                    .bind(token.token_hash.as_str())
                    .bind(token.expires_at)
                    .bind(schema::selectors_json(&token.selectors)?)
                    .execute(&self.pool)
                    .await
                    .map_err(schema::unique_violation_is("join token"))?;
                Ok(())
            }

            async fn consume_join_token(
                &self,
                token_hash: &str,
                now: i64,
            ) -> Result<JoinTokenRecord, StoreError> {
                let row = sqlx::query(schema::CONSUME_JOIN_TOKEN)
                    .bind(token_hash)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or(StoreError::NotFound { kind: "join token" })?;
                schema::unexpired(join_token_from_row(&row)?, now)
            }

            async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
                let done = sqlx::query(schema::PRUNE_JOIN_TOKENS)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn put_bundle(&self, bundle: &BundleRecord) -> Result<(), StoreError> {
                sqlx::query(schema::PUT_BUNDLE)
                    .bind(bundle.trust_domain_id.as_str())
                    .bind(bundle.document.as_str())
                    .bind(schema::to_i64(bundle.sequence, "bundle sequence")?)
                    .execute(&self.pool)
                    .await?;
                self.changed(StoreChange::Bundle(bundle.trust_domain_id.clone()));
                Ok(())
            }

            async fn swap_bundle(
                &self,
                bundle: &BundleRecord,
                previous: Option<u64>,
            ) -> Result<bool, StoreError> {
                let query = match previous {
                    None => sqlx::query(schema::CREATE_BUNDLE),
                    Some(_) => sqlx::query(schema::SWAP_BUNDLE),
                }
                .bind(bundle.trust_domain_id.as_str())
                .bind(bundle.document.as_str())
                .bind(schema::to_i64(bundle.sequence, "bundle sequence")?);
                let query = match previous {
                    None => query,
                    Some(p) => query.bind(schema::to_i64(p, "bundle sequence")?),
                };
                let swapped = query.execute(&self.pool).await?.rows_affected() == 1;
                if swapped {
                    self.changed(StoreChange::Bundle(bundle.trust_domain_id.clone()));
                }
                Ok(swapped)
            }

            async fn fetch_bundle(
                &self,
                trust_domain_id: &str,
            ) -> Result<Option<BundleRecord>, StoreError> {
                sqlx::query(schema::FETCH_BUNDLE)
                    .bind(trust_domain_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(bundle_from_row)
                    .transpose()
            }

            async fn list_bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
                let rows = sqlx::query(schema::LIST_BUNDLES)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(bundle_from_row).collect()
            }

            async fn delete_bundle(&self, trust_domain_id: &str) -> Result<(), StoreError> {
                let done = sqlx::query(schema::DELETE_BUNDLE)
                    .bind(trust_domain_id)
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "bundle")?;
                self.changed(StoreChange::Bundle(trust_domain_id.to_owned()));
                Ok(())
            }

            async fn create_federation(&self, record: &FederationRecord) -> Result<(), StoreError> {
                schema::check_federation(record)?;
                sqlx::query(schema::CREATE_FEDERATION)
                    .bind(record.trust_domain_id.as_str())
                    .bind(record.bundle_endpoint_url.as_str())
                    .bind(record.profile.as_str())
                    .bind(record.endpoint_spiffe_id.as_str())
                    .bind(record.web_ca_pem.as_str())
                    .bind(record.created_at)
                    .execute(&self.pool)
                    .await
                    .map_err(schema::unique_violation_is("federation relationship"))?;
                Ok(())
            }

            async fn update_federation(&self, record: &FederationRecord) -> Result<(), StoreError> {
                schema::check_federation(record)?;
                let done = sqlx::query(schema::UPDATE_FEDERATION)
                    .bind(record.trust_domain_id.as_str())
                    .bind(record.bundle_endpoint_url.as_str())
                    .bind(record.profile.as_str())
                    .bind(record.endpoint_spiffe_id.as_str())
                    .bind(record.web_ca_pem.as_str())
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "federation relationship")
            }

            async fn fetch_federation(
                &self,
                trust_domain_id: &str,
            ) -> Result<Option<FederationRecord>, StoreError> {
                sqlx::query(schema::FETCH_FEDERATION.as_str())
                    .bind(trust_domain_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(federation_from_row)
                    .transpose()
            }

            async fn list_federations(&self) -> Result<Vec<FederationRecord>, StoreError> {
                let rows = sqlx::query(schema::LIST_FEDERATIONS.as_str())
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(federation_from_row).collect()
            }

            async fn delete_federation(&self, trust_domain_id: &str) -> Result<(), StoreError> {
                let done = sqlx::query(schema::DELETE_FEDERATION)
                    .bind(trust_domain_id)
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "federation relationship")
            }

            async fn record_federation_refresh(
                &self,
                trust_domain_id: &str,
                refreshed_at: Option<i64>,
                error: Option<&str>,
                next_refresh_at: i64,
            ) -> Result<bool, StoreError> {
                let error = error.map(|e| {
                    let mut end = e.len().min(super::MAX_FEDERATION_ERROR_BYTES);
                    while !e.is_char_boundary(end) {
                        end -= 1;
                    }
                    e.get(..end).unwrap_or_default()
                });
                let done = sqlx::query(schema::RECORD_FEDERATION_REFRESH)
                    .bind(trust_domain_id)
                    .bind(refreshed_at)
                    .bind(error)
                    .bind(next_refresh_at)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn put_journal(&self, record: &JournalRecord) -> Result<(), StoreError> {
                sqlx::query(schema::PUT_JOURNAL)
                    .bind(record.id.as_str())
                    .bind(record.kind.as_str())
                    .bind(record.payload.as_str())
                    .bind(record.updated_at)
                    .execute(&self.pool)
                    .await?;
                self.changed(StoreChange::Journal);
                Ok(())
            }

            async fn list_journal(&self) -> Result<Vec<JournalRecord>, StoreError> {
                let rows = sqlx::query(schema::LIST_JOURNAL)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(journal_from_row).collect()
            }

            async fn delete_journal(&self, id: &str) -> Result<(), StoreError> {
                let done = sqlx::query(schema::DELETE_JOURNAL)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "journal record")?;
                self.changed(StoreChange::Journal);
                Ok(())
            }

            async fn create_lease(&self, lease: &LeaseRecord) -> Result<(), StoreError> {
                sqlx::query(schema::INSERT_LEASE)
                    .bind(lease.id.as_str())
                    .bind(lease.child_id.as_str())
                    .bind(lease.parent_id.as_str())
                    .bind(lease.entry_id.as_str())
                    .bind(lease.agent_id.as_str())
                    .bind(i64::from(lease.depth))
                    .bind(lease.task.as_str())
                    .bind(i64::from(lease.child_pid))
                    .bind(schema::to_i64(lease.child_start_time, "child_start_time")?)
                    .bind(lease.created_at)
                    .bind(lease.expires_at)
                    .bind(lease.released_at)
                    .execute(&self.pool)
                    .await
                    .map_err(schema::unique_violation_is("lease"))?;
                Ok(())
            }

            async fn fetch_lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError> {
                fetch_lease_where(&self.pool, schema::FETCH_LEASE.as_str(), id).await
            }

            async fn fetch_lease_by_child(
                &self,
                child_id: &SpiffeId,
            ) -> Result<Option<LeaseRecord>, StoreError> {
                let sql = schema::FETCH_LEASE_BY_CHILD.as_str();
                fetch_lease_where(&self.pool, sql, child_id.as_str()).await
            }

            async fn release_lease(&self, id: &str, now: i64) -> Result<LeaseRecord, StoreError> {
                let done = sqlx::query(schema::RELEASE_LEASE)
                    .bind(id)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                schema::expect_one(done.rows_affected(), "lease")?;
                self.fetch_lease(id)
                    .await?
                    .ok_or(StoreError::NotFound { kind: "lease" })
            }

            async fn list_leases(
                &self,
                parent_id: Option<&SpiffeId>,
                live_at: Option<i64>,
            ) -> Result<Vec<LeaseRecord>, StoreError> {
                let rows = sqlx::query(schema::LIST_LEASES.as_str())
                    .bind(parent_id.map_or("", SpiffeId::as_str))
                    .bind(live_at.map_or(-1, |t| t.max(0)))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(lease_from_row).collect()
            }

            async fn prune_leases(&self, before: i64) -> Result<u64, StoreError> {
                let done = sqlx::query(schema::PRUNE_LEASES)
                    .bind(before)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn record_template_issue(
                &self,
                entry_id: &str,
                agent_id: &SpiffeId,
                spiffe_id: &SpiffeId,
                now: i64,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                let done = sqlx::query(schema::RECORD_TEMPLATE_ISSUE)
                    .bind(entry_id)
                    .bind(agent_id.as_str())
                    .bind(spiffe_id.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await;
                match done {
                    Ok(_) => {}
                    // The entry was deleted meanwhile: nothing to record against.
                    Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {
                        return Err(StoreError::NotFound { kind: "entry" });
                    }
                    Err(e) => return Err(e.into()),
                }
                sqlx::query(schema::PRUNE_TEMPLATE_ISSUES)
                    .bind(entry_id)
                    .bind(i64::from(super::MAX_TEMPLATE_ISSUES_PER_ENTRY))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn put_txn_key(&self, key: &TxnKeyRecord) -> Result<(), StoreError> {
                schema::check_txn_key(key)?;
                sqlx::query(schema::PUT_TXN_KEY)
                    .bind(key.kid.as_str())
                    .bind(key.jwk.as_str())
                    .bind(key.replica.as_str())
                    .bind(key.published_at)
                    .bind(key.expires_at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn list_txn_keys(&self, now: i64) -> Result<Vec<TxnKeyRecord>, StoreError> {
                let rows = sqlx::query(schema::LIST_TXN_KEYS)
                    .bind(now)
                    .bind(i64::from(super::MAX_TXN_KEYS))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(txn_key_from_row).collect()
            }

            async fn prune_txn_keys(&self, now: i64) -> Result<u64, StoreError> {
                let done = sqlx::query(schema::PRUNE_TXN_KEYS)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn append_audit(
                &self,
                events: &[super::audit::AuditEvent],
            ) -> Result<u64, StoreError> {
                use super::audit as a;
                if events.len() > a::MAX_APPEND {
                    return Err(StoreError::Invalid(format!(
                        "at most {} audit events per append",
                        a::MAX_APPEND
                    )));
                }
                events.iter().try_for_each(a::AuditEvent::check)?;
                let mut tx = self.begin_write().await?;
                if let Some(lock) = AUDIT_LOCK {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                let seq = append_audit_on(&mut tx, events).await?;
                tx.commit().await?;
                Ok(seq)
            }

            async fn audit_anchor(&self) -> Result<super::audit::AuditAnchor, StoreError> {
                let row = sqlx::query(super::audit::FETCH_ANCHOR)
                    .fetch_one(&self.pool)
                    .await?;
                super::audit::anchor_from_sql(&row)
            }

            async fn list_audit(
                &self,
                after: u64,
                limit: u32,
            ) -> Result<Vec<super::audit::AuditRow>, StoreError> {
                let rows = sqlx::query(super::audit::LIST_AFTER)
                    .bind(schema::to_i64(after, "after")?)
                    .bind(i64::from(limit.min(super::audit::MAX_READ)))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(super::audit::row_from_sql).collect()
            }

            async fn audit_txn(
                &self,
                txn: &str,
                limit: u32,
            ) -> Result<Vec<super::audit::AuditRow>, StoreError> {
                let rows = sqlx::query(super::audit::LIST_TXN)
                    .bind(txn)
                    .bind(i64::from(limit.min(super::audit::MAX_READ)))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(super::audit::row_from_sql).collect()
            }

            async fn list_audit_txns(
                &self,
                query: &str,
                limit: u32,
            ) -> Result<Vec<super::audit::AuditTxnSummary>, StoreError> {
                use super::audit as a;
                if query.len() > a::MAX_QUERY_BYTES {
                    return Err(StoreError::Invalid(format!(
                        "audit search text is longer than {} bytes",
                        a::MAX_QUERY_BYTES
                    )));
                }
                let pattern = if query.is_empty() {
                    String::new()
                } else {
                    a::like_pattern(query)
                };
                let rows = sqlx::query(a::LIST_TXNS)
                    .bind(pattern.as_str())
                    .bind(i64::from(limit.min(a::MAX_TXN_LIST)))
                    .fetch_all(&self.pool)
                    .await?;
                let mut out = rows
                    .iter()
                    .map(a::summary_from_sql)
                    .collect::<Result<Vec<_>, _>>()?;
                for summary in &mut out {
                    summary.workloads = sqlx::query_scalar(a::TXN_WORKLOADS)
                        .bind(summary.txn.as_str())
                        .fetch_all(&self.pool)
                        .await?;
                }
                Ok(out)
            }

            async fn audit_txns_after(
                &self,
                after: u64,
                limit: u32,
            ) -> Result<Vec<(String, u64)>, StoreError> {
                let rows: Vec<(String, i64)> = sqlx::query_as(super::audit::TXNS_AFTER)
                    .bind(schema::to_i64(after, "after")?)
                    .bind(i64::from(limit.min(super::audit::MAX_TXN_LIST)))
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|(txn, seq)| (txn, u64::try_from(seq).unwrap_or(0)))
                    .collect())
            }

            async fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
                use super::audit as a;
                let mut tx = self.begin_write().await?;
                if let Some(lock) = AUDIT_LOCK {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                let anchor = sqlx::query(a::FETCH_ANCHOR)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::from)
                    .and_then(|row| a::anchor_from_sql(&row))?;
                let past_head = schema::to_i64(anchor.head_seq, "seq")?.saturating_add(1);
                let cut: Option<(i64, String)> = sqlx::query_as(a::PRUNE_CUT)
                    .bind(before_ms)
                    .bind(past_head)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((seq, hash)) = cut else {
                    return Ok(0);
                };
                let done = sqlx::query(a::PRUNE).bind(seq).execute(&mut *tx).await?;
                sqlx::query(a::SET_PRUNED)
                    .bind(seq)
                    .bind(hash.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }

            async fn list_template_issues(
                &self,
                entry_id: &str,
            ) -> Result<Vec<TemplateIssue>, StoreError> {
                let rows = sqlx::query(schema::LIST_TEMPLATE_ISSUES)
                    .bind(entry_id)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(template_issue_from_row).collect()
            }

            async fn insert_revocation(
                &self,
                new: &super::revocation::NewRevocation,
            ) -> Result<writ_spiffe::revocation::Revocation, StoreError> {
                use super::revocation as r;
                new.check()?;
                let mut tx = self.begin_write().await?;
                // The audit lock also serializes revocations, so their seqs commit in order.
                if let Some(lock) = AUDIT_LOCK {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                let in_force: i64 = sqlx::query_scalar(r::COUNT_IN_FORCE)
                    .bind(new.revoked_at)
                    .fetch_one(&mut *tx)
                    .await?;
                if usize::try_from(in_force).unwrap_or(usize::MAX) >= r::MAX_IN_FORCE {
                    return Err(StoreError::TooMany {
                        kind: "revocations in force",
                        max: r::MAX_IN_FORCE,
                    });
                }
                let (kind, value, spiffe_id, subtree) = r::target_columns(&new.target);
                // Run to completion (not `fetch_one`), as every write statement.
                let seqs: Vec<i64> = sqlx::query_scalar(r::INSERT)
                    .bind(kind)
                    .bind(value)
                    .bind(spiffe_id)
                    .bind(subtree)
                    .bind(new.revoked_at)
                    .bind(new.lapses_at)
                    .bind(new.reason.as_deref())
                    .bind(new.revoked_by.as_str())
                    .fetch_all(&mut *tx)
                    .await?;
                let seq = seqs
                    .first()
                    .and_then(|s| u64::try_from(*s).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        kind: "revocation",
                        detail: "the insert returned no seq".into(),
                    })?;
                append_audit_on(&mut tx, &[new.audit_event(seq)]).await?;
                tx.commit().await?;
                self.changed(StoreChange::Revocation);
                Ok(new.with_seq(seq))
            }

            async fn list_revocations(
                &self,
                after: u64,
                now: i64,
                limit: u32,
            ) -> Result<Vec<super::revocation::RevocationRecord>, StoreError> {
                use super::revocation as r;
                let rows = sqlx::query(r::LIST)
                    .bind(schema::to_i64(after, "after")?)
                    .bind(now)
                    .bind(i64::from(limit.min(r::MAX_LIST)))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(r::from_sql).collect()
            }

            async fn prune_revocations(&self, now: i64) -> Result<u64, StoreError> {
                let done = sqlx::query(super::revocation::PRUNE)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            fn changes(&self) -> tokio::sync::broadcast::Receiver<StoreChange> {
                self.subscribe()
            }
        }
    };
}

pub(super) use sql_store;
