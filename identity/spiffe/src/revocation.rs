//! The kill switch's one vocabulary: what an operator revokes ([`Target`]), one entry in
//! force ([`Revocation`]), a page of the revocation feed ([`FeedPage`]) and the set a
//! verifier keeps ([`RevocationSet`]).
//!
//! An entry is made by `writ txn revoke`, kept durably in the identity store, enforced
//! by every token service replica (no exchange or replacement it covers), by every
//! agent (no SVID for a revoked workload) and by every SDK verifier, which follows the
//! token service's feed at [`FEED_PATH`]. An entry is in force from `revoked_at` until
//! `lapses_at`, the moment everything it covers has expired; after that it is dropped.
//!
//! ```
//! use writ_spiffe::revocation::{Revocation, RevocationSet, Target};
//!
//! let mut set = RevocationSet::default();
//! set.insert(Revocation {
//!     seq: 1,
//!     target: Target::Workload { spiffe_id: "spiffe://example.org/agents/planner".into(), subtree: true },
//!     revoked_at: 1_000,
//!     lapses_at: 5_000,
//!     reason: Some("compromised".into()),
//! });
//! // A sub-agent under the planner is covered by the subtree entry.
//! assert!(set.workload("spiffe://example.org/agents/planner/sub/7", 2_000).is_some());
//! assert!(set.workload("spiffe://example.org/agents/planner-2", 2_000).is_none());
//! // After the entry lapses nothing is covered.
//! assert!(set.workload("spiffe://example.org/agents/planner", 5_000).is_none());
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Where the token service serves the revocation feed (`GET`, mTLS with any SVID of its
/// trust domain; query `after=<seq>` and `wait=<seconds>`, at most [`MAX_WAIT_SECS`]).
pub const FEED_PATH: &str = "/revocations";
/// At most this many entries in one [`FeedPage`].
pub const MAX_PAGE: usize = 1000;
/// A feed request waits at most this long for an entry newer than `after`.
pub const MAX_WAIT_SECS: u64 = 30;
/// At most this many bytes in a target's value (a txn, a user, a SPIFFE ID, a lease).
pub const MAX_VALUE: usize = 2048;
/// At most this many bytes in a reason.
pub const MAX_REASON: usize = 256;
/// At most this many entries in force at once; a revoke beyond it is refused.
pub const MAX_IN_FORCE: usize = 100_000;

/// What one revocation covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Every Txn-Token of one transaction (`txn` claim).
    Txn {
        /// The transaction id.
        txn: String,
    },
    /// Every transaction of one user (`sub` claim).
    Sub {
        /// The user, as the Txn-Token's `sub` names them.
        sub: String,
    },
    /// One workload: Txn-Tokens it requested or acts in (`req_wl` or any `act` entry),
    /// its SVIDs, and it as an mTLS peer. With `subtree`, every identity under its path
    /// too (its sub-agents).
    Workload {
        /// The workload's SPIFFE ID.
        spiffe_id: String,
        /// Cover identities whose path continues below this one's.
        #[serde(default)]
        subtree: bool,
    },
    /// One sub-agent lease: the child identity it grants.
    Lease {
        /// The lease id.
        lease: String,
        /// The child SPIFFE ID the lease granted (resolved when revoked).
        spiffe_id: String,
    },
}

impl Target {
    /// Whether the workload `id` is covered (only [`Target::Workload`] and [`Target::Lease`]
    /// cover workloads).
    pub fn covers_workload(&self, id: &str) -> bool {
        match self {
            Target::Workload { spiffe_id, subtree } => {
                id == spiffe_id
                    || (*subtree
                        && id.len() > spiffe_id.len()
                        && id.starts_with(spiffe_id.as_str())
                        && id.as_bytes().get(spiffe_id.len()) == Some(&b'/'))
            }
            Target::Lease { spiffe_id, .. } => id == spiffe_id,
            Target::Txn { .. } | Target::Sub { .. } => false,
        }
    }

    /// Whether a Txn-Token with these claims is covered: its `txn`, its `sub`, or any of
    /// `workloads` (its `req_wl` and every `act` entry).
    pub fn covers_token<'a>(
        &self,
        txn: &str,
        sub: &str,
        mut workloads: impl Iterator<Item = &'a str>,
    ) -> bool {
        match self {
            Target::Txn { txn: t } => t == txn,
            Target::Sub { sub: s } => s == sub,
            Target::Workload { .. } | Target::Lease { .. } => {
                workloads.any(|w| self.covers_workload(w))
            }
        }
    }

    /// The target's value (for listings and errors).
    pub fn value(&self) -> &str {
        match self {
            Target::Txn { txn } => txn,
            Target::Sub { sub } => sub,
            Target::Workload { spiffe_id, .. } => spiffe_id,
            Target::Lease { lease, .. } => lease,
        }
    }

    /// Check the limits: a non-empty value of at most [`MAX_VALUE`] bytes, with no
    /// control characters.
    pub fn check(&self) -> Result<(), RevocationError> {
        let values: &[&str] = match self {
            Target::Lease { lease, spiffe_id } => &[lease, spiffe_id],
            other => &[other.value()],
        };
        for v in values {
            if v.is_empty() || v.len() > MAX_VALUE || v.chars().any(char::is_control) {
                return Err(RevocationError::BadValue);
            }
        }
        Ok(())
    }
}

/// One revocation in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// Its place in the store's order (strictly increasing; the feed's cursor).
    pub seq: u64,
    /// What it covers.
    pub target: Target,
    /// When it was made, Unix seconds.
    pub revoked_at: i64,
    /// When everything it covers has expired, Unix seconds; it is dropped then.
    pub lapses_at: i64,
    /// Why, as the operator said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Revocation {
    /// Whether it is in force at `now` (Unix seconds).
    pub fn in_force(&self, now: i64) -> bool {
        now < self.lapses_at
    }
}

/// One answer of the revocation feed: the entries with `seq` greater than the request's
/// `after`, oldest first, at most [`MAX_PAGE`]; `more` when further ones wait.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedPage {
    /// The highest `seq` the service knows (the next request's `after` when `more` is false).
    pub seq: u64,
    /// Entries in force newer than `after`.
    pub revocations: Vec<Revocation>,
    /// Whether another page follows at once.
    #[serde(default)]
    pub more: bool,
}

impl FeedPage {
    /// Check the page against the limits before using it.
    pub fn check(&self) -> Result<(), RevocationError> {
        if self.revocations.len() > MAX_PAGE {
            return Err(RevocationError::PageTooLarge);
        }
        for r in &self.revocations {
            r.target.check()?;
            if r.reason.as_ref().is_some_and(|s| s.len() > MAX_REASON) {
                return Err(RevocationError::BadValue);
            }
            if r.seq > self.seq {
                return Err(RevocationError::BadSeq);
            }
        }
        Ok(())
    }
}

/// Why a revocation or a feed page was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// A value was empty, too long or held control characters.
    #[error(
        "a revocation target must be 1 to {MAX_VALUE} bytes without control characters (reason: at most {MAX_REASON})"
    )]
    BadValue,
    /// A feed page held more than [`MAX_PAGE`] entries.
    #[error("a revocation feed page holds at most {MAX_PAGE} entries")]
    PageTooLarge,
    /// An entry's `seq` was beyond the page's.
    #[error("a revocation's seq is beyond its page's")]
    BadSeq,
}

/// The revocations in force, as a verifier, an agent or a token service replica keeps
/// them: indexed by transaction, user, workload and subtree root, so a lookup costs a
/// few hash lookups (one per path segment of a workload) whatever the number in force.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    seq: u64,
    by_seq: BTreeMap<u64, Revocation>,
    txn: HashMap<String, Vec<u64>>,
    sub: HashMap<String, Vec<u64>>,
    /// Workloads named exactly (a workload without `subtree`, a lease's child).
    exact: HashMap<String, Vec<u64>>,
    /// Roots of subtree entries.
    subtree: HashMap<String, Vec<u64>>,
}

impl RevocationSet {
    /// The highest `seq` seen (the feed cursor).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// How many entries are held (some may have lapsed since the last [`Self::prune`]).
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    fn index(&mut self, target: &Target) -> &mut HashMap<String, Vec<u64>> {
        match target {
            Target::Txn { .. } => &mut self.txn,
            Target::Sub { .. } => &mut self.sub,
            Target::Workload { subtree: true, .. } => &mut self.subtree,
            Target::Workload { .. } | Target::Lease { .. } => &mut self.exact,
        }
    }

    fn key(target: &Target) -> &str {
        match target {
            Target::Lease { spiffe_id, .. } => spiffe_id,
            other => other.value(),
        }
    }

    fn unindex(&mut self, revocation: &Revocation) {
        let key = Self::key(&revocation.target).to_owned();
        let index = self.index(&revocation.target);
        if let Some(seqs) = index.get_mut(&key) {
            seqs.retain(|s| *s != revocation.seq);
            if seqs.is_empty() {
                index.remove(&key);
            }
        }
    }

    /// Add one entry (an entry already held is replaced).
    pub fn insert(&mut self, revocation: Revocation) {
        self.seq = self.seq.max(revocation.seq);
        if let Some(old) = self.by_seq.remove(&revocation.seq) {
            self.unindex(&old);
        }
        let key = Self::key(&revocation.target).to_owned();
        self.index(&revocation.target)
            .entry(key)
            .or_default()
            .push(revocation.seq);
        self.by_seq.insert(revocation.seq, revocation);
    }

    /// Apply a feed page: its entries, and its cursor.
    pub fn apply(&mut self, page: FeedPage) {
        self.seq = self.seq.max(page.seq);
        for r in page.revocations {
            self.insert(r);
        }
    }

    /// Drop the entries lapsed at `now` (Unix seconds).
    pub fn prune(&mut self, now: i64) {
        let lapsed: Vec<u64> = self
            .by_seq
            .values()
            .filter(|r| !r.in_force(now))
            .map(|r| r.seq)
            .collect();
        for seq in lapsed {
            if let Some(old) = self.by_seq.remove(&seq) {
                self.unindex(&old);
            }
        }
    }

    /// The entries in force at `now`, oldest first.
    pub fn in_force(&self, now: i64) -> impl Iterator<Item = &Revocation> {
        self.by_seq.values().filter(move |r| r.in_force(now))
    }

    fn find<'a>(
        &'a self,
        index: &'a HashMap<String, Vec<u64>>,
        key: &str,
        now: i64,
    ) -> Option<&'a Revocation> {
        index
            .get(key)?
            .iter()
            .filter_map(|seq| self.by_seq.get(seq))
            .find(|r| r.in_force(now))
    }

    /// The first entry in force at `now` that covers the workload `id`: one naming it, or
    /// a subtree rooted at it or at one of its ancestors.
    pub fn workload(&self, id: &str, now: i64) -> Option<&Revocation> {
        if let Some(r) = self.find(&self.exact, id, now) {
            return Some(r);
        }
        if self.subtree.is_empty() {
            return None;
        }
        // The ID itself, then every prefix that ends before a `/` of its path.
        let path_start = id.find("://").map_or(0, |i| i + 3);
        let path_start = id
            .get(path_start..)
            .and_then(|rest| rest.find('/'))
            .map_or(id.len(), |i| path_start + i);
        std::iter::once(id)
            .chain(
                id.char_indices()
                    .filter(|(i, c)| *c == '/' && *i > path_start)
                    .filter_map(|(i, _)| id.get(..i)),
            )
            .find_map(|prefix| self.find(&self.subtree, prefix, now))
    }

    /// The first entry in force at `now` that covers a Txn-Token with this `txn`, `sub`
    /// and these workloads (`req_wl` and the `act` chain).
    pub fn token<'a>(
        &self,
        txn: &str,
        sub: &str,
        mut workloads: impl Iterator<Item = &'a str>,
        now: i64,
    ) -> Option<&Revocation> {
        if self.by_seq.is_empty() {
            return None;
        }
        self.find(&self.txn, txn, now)
            .or_else(|| self.find(&self.sub, sub, now))
            .or_else(|| workloads.find_map(|w| self.workload(w, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, target: Target) -> Revocation {
        Revocation {
            seq,
            target,
            revoked_at: 100,
            lapses_at: 200,
            reason: None,
        }
    }

    #[test]
    fn targets_cover_what_they_name_and_nothing_else() {
        let mut set = RevocationSet::default();
        set.insert(entry(1, Target::Txn { txn: "t1".into() }));
        set.insert(entry(
            2,
            Target::Sub {
                sub: "alice".into(),
            },
        ));
        set.insert(entry(
            3,
            Target::Workload {
                spiffe_id: "spiffe://td/a".into(),
                subtree: false,
            },
        ));
        set.insert(entry(
            4,
            Target::Lease {
                lease: "L".into(),
                spiffe_id: "spiffe://td/p/sub/L".into(),
            },
        ));
        let none = std::iter::empty::<&str>;
        assert_eq!(set.token("t1", "bob", none(), 150).map(|r| r.seq), Some(1));
        assert_eq!(
            set.token("t2", "alice", none(), 150).map(|r| r.seq),
            Some(2)
        );
        assert!(set.token("t2", "bob", none(), 150).is_none());
        let chain = ["spiffe://td/gw", "spiffe://td/a"];
        assert_eq!(
            set.token("t2", "bob", chain.iter().copied(), 150)
                .map(|r| r.seq),
            Some(3)
        );
        // Without subtree, children are not covered; a lease covers its child only.
        assert!(set.workload("spiffe://td/a/child", 150).is_none());
        assert!(set.workload("spiffe://td/ab", 150).is_none());
        assert_eq!(
            set.workload("spiffe://td/p/sub/L", 150).map(|r| r.seq),
            Some(4)
        );
        assert!(set.workload("spiffe://td/p", 150).is_none());
        // Lapsed entries cover nothing and prune away.
        assert!(set.token("t1", "bob", none(), 200).is_none());
        set.prune(200);
        assert!(set.is_empty());
        assert_eq!(set.seq(), 4);
    }

    #[test]
    fn the_index_follows_replacements_and_pruning() {
        let mut set = RevocationSet::default();
        let subtree = |seq, lapses_at| Revocation {
            lapses_at,
            ..entry(
                seq,
                Target::Workload {
                    spiffe_id: "spiffe://td/p".into(),
                    subtree: true,
                },
            )
        };
        set.insert(subtree(1, 150));
        set.insert(subtree(2, 300));
        let deep = "spiffe://td/p/sub/a/b";
        assert_eq!(set.workload(deep, 120).map(|r| r.seq), Some(1));
        assert_eq!(set.workload(deep, 160).map(|r| r.seq), Some(2));
        set.prune(160);
        assert_eq!(set.len(), 1);
        assert_eq!(set.subtree.get("spiffe://td/p").map(Vec::len), Some(1));
        // Replacing an entry by its seq re-indexes it.
        set.insert(entry(2, Target::Sub { sub: "bob".into() }));
        assert!(set.workload(deep, 160).is_none());
        assert!(set.subtree.is_empty());
        assert_eq!(
            set.token("t", "bob", std::iter::empty(), 160)
                .map(|r| r.seq),
            Some(2)
        );
        set.prune(300);
        assert!(set.sub.is_empty() && set.is_empty());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(
            serde_json::from_str::<Target>(r#"{"kind":"everything","x":"y"}"#).is_err(),
            "unknown kind"
        );
        assert!(serde_json::from_str::<Target>(r#"{"kind":"txn","txn":"a","extra":1}"#).is_err());
        assert_eq!(
            Target::Sub { sub: String::new() }.check(),
            Err(RevocationError::BadValue)
        );
        assert_eq!(
            Target::Txn {
                txn: "x".repeat(MAX_VALUE + 1)
            }
            .check(),
            Err(RevocationError::BadValue)
        );
        assert_eq!(
            Target::Sub { sub: "a\nb".into() }.check(),
            Err(RevocationError::BadValue)
        );
        let page = FeedPage {
            seq: 1,
            revocations: vec![entry(2, Target::Txn { txn: "t".into() })],
            more: false,
        };
        assert_eq!(page.check(), Err(RevocationError::BadSeq));
        let page = FeedPage {
            seq: 5000,
            revocations: (0..=MAX_PAGE as u64)
                .map(|i| entry(i, Target::Txn { txn: "t".into() }))
                .collect(),
            more: false,
        };
        assert_eq!(page.check(), Err(RevocationError::PageTooLarge));
    }

    #[test]
    fn pages_apply_in_order_and_round_trip() {
        let page = FeedPage {
            seq: 9,
            revocations: vec![entry(7, Target::Sub { sub: "u".into() })],
            more: false,
        };
        let json = serde_json::to_string(&page).unwrap_or_default();
        let back: FeedPage = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, page);
        let mut set = RevocationSet::default();
        set.apply(back);
        assert_eq!(set.seq(), 9);
        assert_eq!(set.len(), 1);
    }
}
