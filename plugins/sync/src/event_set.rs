//! This host's set of events of one network, as reconciliation needs it,
//! kept in memory between rounds and sessions and brought up to date by
//! reading only the events added since.
//!
//! Why: rebuilding negentropy's storage from `events` for every round made
//! each round cost a full read of the network's ids (a second at a million
//! events), and even a round between identical sets cost a fingerprint over
//! every id. Instead the set keeps
//! - a **summary**: the count and the 256-bit sum of all ids, updated as
//!   events are added. Two peers whose summaries match hold the same set,
//!   unless a member built them to collide (a sum is open to generalised
//!   birthday searches, far cheaper than a hash collision: see
//!   docs/sync.md), so a session between peers in sync is one small round
//!   and no reconciliation at all;
//! - the negentropy storage, shared (not copied) by every reconciliation
//!   round that runs against it. No session keeps it between rounds: one
//!   that did made every update while it lasted copy the whole set (see
//!   [`EventSet::insert`]), and kept the old copy alive: 40 MB each at a
//!   million events, the largest part of a catch-up's peak.

use std::sync::Arc;

use negentropy::{Bound, Error, Id, Item, NegentropyStorageBase, NegentropyStorageVector};
use quiet_plugin_api::{params, Context, PluginError, Rows};

/// Rows read per query while loading, so that a million events never sit in
/// memory twice. A row costs about 140 bytes on its way through the host
/// (7 MiB a chunk of 50,000, at the peak of a 1M catch-up). Tiny in unit
/// tests, so that their sessions page through many chunks on both the full
/// and the incremental path.
const LOAD_CHUNK: i64 = if cfg!(test) { 7 } else { 10_000 };

/// The bytes of a [`EventSet::summary`]: count (8, big-endian) ‖ sum (32).
pub const SUMMARY_LEN: usize = 40;

/// This host's events of one network; see the [module docs](self).
pub struct EventSet {
    /// The events table's largest rowid when this set was last brought up
    /// to date. Events are never deleted, so rowids only grow.
    version: i64,
    count: u64,
    /// The ids' sum, four little-endian 64-bit lanes with carry.
    sum: [u64; 4],
    storage: SharedStorage,
}

impl EventSet {
    /// The set of `network_id` as the database holds it now: `cached`,
    /// brought up to date, or loaded afresh.
    pub fn current(
        cached: Option<EventSet>,
        ctx: &mut Context<'_>,
        network_id: &str,
    ) -> Result<EventSet, PluginError> {
        // One index step: the table's largest rowid.
        let version = ctx
            .query("SELECT COALESCE(MAX(rowid), 0) FROM events", params![])?
            .first()
            .and_then(|r| r.int(0))
            .unwrap_or(0);
        let mut set = match cached {
            Some(set) if set.version == version => return Ok(set),
            Some(set) => set,
            None => EventSet::empty()?,
        };
        // Chunk by chunk straight into the set: a million ids never sit
        // in memory twice (the rows of one query, then a list of them, then
        // the storage was the peak of a 1M catch-up).
        if set.version == 0 {
            // Everything: through the network index, which holds both
            // columns, in keyset-paged chunks.
            let mut after = (i64::MIN, Vec::new());
            loop {
                let rows = ctx.query(
                    "SELECT created_ms, event_id FROM events \
                     WHERE network_id = ?1 AND (created_ms, event_id) > (?2, ?3) \
                     ORDER BY created_ms, event_id LIMIT ?4",
                    params![network_id, after.0, after.1.clone(), LOAD_CHUNK],
                )?;
                set.insert(&rows)?;
                match rows.iter().last().map(|r| (r.int(0), r.bytes(1))) {
                    Some((Some(t), Some(id))) if rows.len() as i64 == LOAD_CHUNK => {
                        after = (t, id.to_vec())
                    }
                    _ => break,
                }
            }
        } else {
            // Only the rows added since, by rowid: NOT INDEXED keeps SQLite
            // on the rowid range rather than scanning the network index.
            let mut after = set.version;
            loop {
                let rows = ctx.query(
                    "SELECT created_ms, event_id, rowid FROM events NOT INDEXED \
                     WHERE rowid > ?1 AND rowid <= ?2 AND network_id = ?3 \
                     ORDER BY rowid LIMIT ?4",
                    params![after, version, network_id, LOAD_CHUNK],
                )?;
                set.insert(&rows)?;
                match rows.iter().last().and_then(|r| r.int(2)) {
                    Some(last) if rows.len() as i64 == LOAD_CHUNK => after = last,
                    _ => break,
                }
            }
        }
        set.seal()?;
        set.version = version;
        Ok(set)
    }

    fn empty() -> Result<EventSet, PluginError> {
        let mut storage = NegentropyStorageVector::new();
        storage.seal()?;
        Ok(EventSet {
            version: 0,
            count: 0,
            sum: [0; 4],
            storage: SharedStorage(Arc::new(storage)),
        })
    }

    /// Adds the `(created_ms, event_id)` of `rows` (their first two
    /// columns), leaving the storage unsealed until [`seal`](Self::seal).
    fn insert(&mut self, rows: &Rows) -> Result<(), PluginError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Copied only if a reconciliation round still holds the old
        // version, which none does between plugin calls.
        let storage = Arc::make_mut(&mut self.storage.0);
        storage.unseal()?;
        for r in rows.iter() {
            let (Some(created_ms), Some(Ok(id))) = (r.int(0), r.bytes(1).map(Id::from_slice))
            else {
                continue;
            };
            add_id(&mut self.sum, id.as_bytes());
            self.count += 1;
            storage.insert(created_ms.max(0) as u64, id)?;
        }
        Ok(())
    }

    /// Sorts what [`insert`](Self::insert) added, if anything.
    fn seal(&mut self) -> Result<(), PluginError> {
        // Unsealed only if rows were inserted, and then it is ours alone:
        // `make_mut` copies nothing here.
        if self.storage.0.size().is_err() {
            Arc::make_mut(&mut self.storage.0).seal()?;
        }
        Ok(())
    }

    /// The count and sum of the set's ids, to compare with a peer's.
    pub fn summary(&self) -> [u8; SUMMARY_LEN] {
        let mut out = [0u8; SUMMARY_LEN];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        for (i, lane) in self.sum.iter().enumerate() {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    /// The storage to reconcile against, shared.
    pub fn storage(&self) -> SharedStorage {
        self.storage.clone()
    }
}

/// Adds a 32-byte id to a 256-bit sum, modulo 2²⁵⁶.
fn add_id(sum: &mut [u64; 4], id: &[u8; 32]) {
    let mut carry = false;
    for (i, lane) in sum.iter_mut().enumerate() {
        let x = u64::from_le_bytes(id[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let (s, c1) = lane.overflowing_add(x);
        let (s, c2) = s.overflowing_add(carry as u64);
        *lane = s;
        carry = c1 || c2;
    }
}

/// Negentropy storage behind an `Arc`: sessions hold it without copying.
#[derive(Clone)]
pub struct SharedStorage(Arc<NegentropyStorageVector>);

impl NegentropyStorageBase for SharedStorage {
    fn size(&self) -> Result<usize, Error> {
        self.0.size()
    }

    fn get_item(&self, i: usize) -> Result<Option<Item>, Error> {
        self.0.get_item(i)
    }

    fn iterate(
        &self,
        begin: usize,
        end: usize,
        cb: &mut dyn FnMut(Item, usize) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        self.0.iterate(begin, end, cb)
    }

    fn find_lower_bound(&self, first: usize, last: usize, value: &Bound) -> usize {
        self.0.find_lower_bound(first, last, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_carry_across_lanes_and_wrap() {
        let mut sum = [u64::MAX, 0, 0, 0];
        let mut one = [0u8; 32];
        one[0] = 1;
        add_id(&mut sum, &one);
        assert_eq!(sum, [0, 1, 0, 0]);
        let mut all = [u64::MAX; 4];
        add_id(&mut all, &one);
        assert_eq!(all, [0; 4]);
    }
}
