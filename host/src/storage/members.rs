//! The member set of each network, as this host holds it: folded
//! ([`crate::storage::membership::fold`]) from the membership events it
//! has routed, and kept in SQLite for the CLI, `status`, and what builds
//! on it (docs/design/membership.md).
//!
//! Why fold a network's whole log again rather than apply each new event:
//! an event's effect depends on its causal past, and one that arrives late
//! can change what others did (a removal wins over an add it did not see).
//! Folding everything again is what makes this host's set the one any
//! other host computes from the same events. Membership events are few, so
//! this costs little.
//!
//! - The event store marks a network (`membership_dirty`) as it routes one
//!   of its `quiet.*` events, in the transaction that routes it;
//! - at the end of each pipeline run, [`refold`] folds the marked networks
//!   into `membership_roles` (each peer and its role) and `membership` (the genesis,
//!   the heads new membership events depend on, how many events had no
//!   effect);
//! - [`write()`] is how this host authors a membership event: signed, stored,
//!   routed and folded in one transaction, whether or not the host runs.
//!
//! **Which genesis.** A network's id is derived from its creator and the
//! salt in its genesis ([`network_id_of`]), so every host recognises the
//! real genesis alone: a `quiet.network` event that derives the id is the
//! genesis (the smallest id, should the creator have written two). A
//! network made before membership has a random id, which no genesis
//! derives. For one of those, and only while no event derives the id, a
//! host takes the genesis its creator wrote if it created the network
//! itself, or else the one written by the peer whose invite it joined
//! with: the peer whose word it took for the network's key. A host can
//! tell no other, so it shows "membership not yet known" until one comes,
//! and one invited by a member other than the creator trusts that member
//! here as it trusted it with the key (docs/design/membership.md, §7).

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use crate::{
    crypto::{identity::HostIdentity, signed_event::EventId},
    storage::{
        db,
        event_store::{EventStore, MARK_MEMBERSHIP},
        membership::{fold, network_id_of, peer_of_hex, Event, Op, Peer},
        statements::Statements,
    },
};

/// The membership events of a network, routed: the partial index
/// `events_membership` serves this, as its condition is the same.
const MEMBERSHIP_EVENTS: &str = "SELECT event FROM events
     WHERE network_id = ?1 AND event_type >= 'quiet.' AND event_type < 'quiet/'
       AND routed IS NOT NULL";

/// Folds every network the event store marked again, in the caller's
/// transaction. Returns how many it folded.
pub fn refold(conn: &Connection, store: &EventStore) -> rusqlite::Result<usize> {
    let dirty: Vec<String> = conn
        .prepare_cached("SELECT network_id FROM membership_dirty")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for network_id in &dirty {
        fold_network(conn, store, network_id)?;
        conn.prepare_cached("DELETE FROM membership_dirty WHERE network_id = ?1")?
            .execute([network_id])?;
    }
    Ok(dirty.len())
}

/// How this host tells a network's genesis (see the module docs).
struct GenesisRule {
    /// Whose genesis it takes while none derives the network's id: this
    /// host's for a network it created before membership, the inviter's
    /// for one it joined; `None` for one it created since.
    fallback: Option<Peer>,
}

impl GenesisRule {
    fn of(conn: &Connection, network_id: &str, me: Option<Peer>) -> rusqlite::Result<Self> {
        let row: Option<(Option<String>, bool)> = conn
            .prepare_cached(
                "SELECT invited_by, salt IS NOT NULL FROM networks WHERE network_id = ?1",
            )?
            .query_row([network_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let fallback = match row {
            Some((Some(inviter), _)) => peer_of_hex(&inviter),
            Some((None, false)) => me,
            // Created since (its id is derived), or not a network of this
            // host (its row is gone).
            Some((None, true)) | None => None,
        };
        Ok(GenesisRule { fallback })
    }

    /// The genesis among `events`.
    fn pick(&self, network_id: &str, events: &[Event]) -> Option<EventId> {
        let geneses = || {
            events.iter().filter_map(|e| match &e.op {
                Op::Genesis { salt, .. } => Some((e, salt)),
                _ => None,
            })
        };
        let derived = geneses()
            .filter(|(e, salt)| network_id_of(&e.author, salt) == network_id)
            .map(|(e, _)| e.id)
            .min();
        derived.or_else(|| {
            geneses()
                .filter(|(e, _)| Some(e.author) == self.fallback)
                .map(|(e, _)| e.id)
                .min()
        })
    }
}

fn fold_network(conn: &Connection, store: &EventStore, network_id: &str) -> rusqlite::Result<()> {
    let me = store.me().map(|me| *me.signing().peer_id());
    let rule = GenesisRule::of(conn, network_id, me)?;
    let rows: Vec<Vec<u8>> = conn
        .prepare_cached(MEMBERSHIP_EVENTS)?
        .query_map([network_id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let (mut events, mut malformed, mut unopened) = (Vec::with_capacity(rows.len()), 0, 0);
    for bytes in rows {
        let Some(event) = store.reopen_signed(network_id, &bytes) else {
            unopened += 1;
            continue;
        };
        match Event::of(&event) {
            Some(Ok(e)) => events.push(e),
            // A membership event whose content no host would apply: it
            // stays stored (it is synced like any event), without effect.
            Some(Err(_)) | None => malformed += 1,
        }
    }
    if unopened > 0 {
        tracing::warn!(
            network = network_id,
            "{unopened} stored membership events no longer open (is the network key gone?): \
             the member set leaves them out"
        );
    }
    let malformed = malformed + unopened;
    let genesis = rule.pick(network_id, &events);
    conn.prepare_cached("DELETE FROM membership_roles WHERE network_id = ?1")?
        .execute([network_id])?;
    let (heads, invalid) = match &genesis {
        None => (Vec::new(), events.len()),
        Some(genesis) => {
            let m = fold(genesis, &events);
            let mut insert = conn.prepare_cached(
                "INSERT INTO membership_roles(network_id, peer_id, role) VALUES (?1, ?2, ?3)",
            )?;
            for (peer, admin) in &m.members {
                let role = match (m.creator == Some(*peer), admin) {
                    (true, _) => "creator",
                    (false, true) => "admin",
                    (false, false) => "member",
                };
                insert.execute((network_id, hex::encode(peer), role))?;
            }
            for peer in &m.removed {
                insert.execute((network_id, hex::encode(peer), "removed"))?;
            }
            (m.heads, m.invalid.len())
        }
    };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO membership(network_id, genesis, events, invalid, heads, folded_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(rusqlite::params![
        network_id,
        genesis.as_ref().map(|g| &g[..]),
        (events.len() + malformed) as i64,
        (invalid + malformed) as i64,
        heads.concat(),
        db::now_ms(),
    ])?;
    Ok(())
}

/// The membership heads of `network_id`: what a new membership event
/// depends on. At most [`MAX_DEPS`](crate::crypto::signed_event::MAX_DEPS),
/// the newest if there are more.
fn heads(conn: &Connection, network_id: &str) -> rusqlite::Result<Vec<EventId>> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT heads FROM membership WHERE network_id = ?1")?
        .query_row([network_id], |r| r.get(0))
        .optional()?;
    let mut heads: Vec<EventId> = bytes
        .unwrap_or_default()
        .chunks_exact(32)
        .map(|h| h.try_into().expect("32 bytes"))
        .collect();
    heads.sort_unstable();
    let keep = heads
        .len()
        .saturating_sub(crate::crypto::signed_event::MAX_DEPS);
    Ok(heads.split_off(keep))
}

fn signer(store: &EventStore) -> Result<&HostIdentity, String> {
    store
        .me()
        .ok_or_else(|| "this host has no identity to sign membership events with".into())
}

/// Authors `op` in `network_id` as the host `store` signs for: signed,
/// depending on the network's membership heads, stored and routed, and
/// folded, in one transaction. Returns the event's id.
pub fn write(
    conn: &Connection,
    store: &EventStore,
    network_id: &str,
    op: &Op,
) -> Result<EventId, String> {
    db::with_write_tx(conn, |c| write_in(c, store, network_id, op)).map_err(|Failed(e)| e)
}

/// [`write()`], in the caller's transaction.
fn write_in(
    c: &Connection,
    store: &EventStore,
    network_id: &str,
    op: &Op,
) -> Result<EventId, Failed> {
    let me = signer(store)?;
    let deps = heads(c, network_id)?;
    let (id, envelope) = store.new_local_event(
        me.signing(),
        network_id,
        op.event_type(),
        &op.content(),
        &deps,
    )?;
    if store.store(&Statements::new(c), envelope)?.is_none() {
        return Err(format!("this host's own {} event was refused", op.event_type()).into());
    }
    refold(c, store)?;
    Ok(id)
}

/// Why [`write()`] failed, in one line: its transaction takes both kinds.
struct Failed(String);

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Self {
        Failed(e.to_string())
    }
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed(e)
    }
}

/// The most first members a genesis lists: what fits in one event
/// (a 64 KiB event holds about 1,900 peer ids).
pub const MAX_GENESIS_MEMBERS: usize = 1_800;

/// Writes the genesis of each network this host created that has none:
/// one just created, or one created before membership, on the first start
/// since (whose genesis lists every author of an event stored in it and
/// every peer this host syncs it with, so that no one who took part is
/// left out). Returns the networks it wrote one for, and one line for
/// each it could not, having gone on with the others.
pub fn ensure_geneses(conn: &Connection, store: &EventStore) -> (Vec<String>, Vec<String>) {
    let created: rusqlite::Result<Vec<(String, Option<Vec<u8>>)>> = conn
        .prepare(
            "SELECT n.network_id, n.salt FROM networks n
             LEFT JOIN membership m ON m.network_id = n.network_id
             WHERE n.invited_by IS NULL AND m.genesis IS NULL ORDER BY n.network_id",
        )
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect());
    let created = match created {
        Ok(created) => created,
        Err(e) => return (Vec::new(), vec![format!("reading the networks: {e}")]),
    };
    let (mut written, mut failed) = (Vec::new(), Vec::new());
    for (network_id, salt) in created {
        // One transaction from the check to the write, so that a command
        // and a starting host cannot both write one.
        let done = db::with_write_tx(conn, |c| -> Result<bool, Failed> {
            // Its genesis may be stored but not folded yet (a host stopped
            // between the two): fold first.
            c.execute(MARK_MEMBERSHIP, [&network_id])?;
            refold(c, store)?;
            if roster(c, &network_id)?.known {
                return Ok(false);
            }
            let salt = match salt.as_deref().map(<[u8; 16]>::try_from) {
                Some(Ok(salt)) => salt,
                Some(Err(_)) => return Err(Failed("its stored salt is not 16 bytes".into())),
                // Created before membership: its id says nothing, so any
                // salt will do.
                None => crate::crypto::entropy::random(),
            };
            let members = first_members(c, store, &network_id)?;
            write_in(c, store, &network_id, &Op::Genesis { members, salt })?;
            Ok(true)
        });
        match done {
            Ok(true) => written.push(network_id),
            Ok(false) => {}
            Err(Failed(e)) => failed.push(format!("network {network_id}: {e}")),
        }
    }
    (written, failed)
}

/// Everyone known to have taken part in `network_id`, but `me`: the
/// authors of its stored events and the peers this host syncs it with, at
/// most [`MAX_GENESIS_MEMBERS`].
fn first_members(
    conn: &Connection,
    store: &EventStore,
    network_id: &str,
) -> Result<Vec<Peer>, Failed> {
    let me = signer(store)?;
    let mut peers = std::collections::BTreeSet::new();
    let mut authors = conn.prepare("SELECT event FROM events WHERE network_id = ?1")?;
    let mut rows = authors.query([network_id])?;
    while let Some(row) = rows.next()? {
        let bytes: Vec<u8> = row.get(0)?;
        if let Some(e) = store.reopen_signed(network_id, &bytes) {
            peers.insert(e.author);
        }
    }
    let addressed: Vec<String> = conn
        .prepare("SELECT peer_id FROM addresses WHERE network_id = ?1")?
        .query_map([network_id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for peer_id in addressed {
        peers.extend(peer_of_hex(&peer_id));
    }
    peers.remove(me.signing().peer_id());
    if peers.len() > MAX_GENESIS_MEMBERS {
        tracing::warn!(
            network = network_id,
            "{} peers took part, more than a genesis lists: the first {MAX_GENESIS_MEMBERS} by peer id are members",
            peers.len()
        );
    }
    Ok(peers.into_iter().take(MAX_GENESIS_MEMBERS).collect())
}

/// One member, as `network members` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Its peer id.
    pub peer_id: String,
    /// `creator`, `admin`, `member`, or `removed`.
    pub role: String,
}

/// What this host knows of `network_id`'s membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Roster {
    /// Whether this host holds the network's genesis, so that `members`
    /// is the network's member set. `false`: it has not arrived yet, or
    /// this host cannot tell it (a network made before membership, see the
    /// module docs).
    pub known: bool,
    /// The members, creator first, then admins, members, removed peers.
    pub members: Vec<Member>,
    /// Membership events folded.
    pub events: i64,
    /// Of those, the ones without effect (not allowed, or malformed).
    pub invalid: i64,
}

/// What this host knows of `network_id`'s membership, as last folded.
pub fn roster(conn: &Connection, network_id: &str) -> rusqlite::Result<Roster> {
    let state: Option<(bool, i64, i64)> = conn
        .prepare_cached(
            "SELECT genesis IS NOT NULL, events, invalid FROM membership WHERE network_id = ?1",
        )?
        .query_row([network_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (known, events, invalid) = state.unwrap_or((false, 0, 0));
    let members = conn
        .prepare_cached(
            "SELECT peer_id, role FROM membership_roles WHERE network_id = ?1
             ORDER BY CASE role WHEN 'creator' THEN 0 WHEN 'admin' THEN 1
                                WHEN 'member' THEN 2 ELSE 3 END, peer_id",
        )?
        .query_map([network_id], |r| {
            Ok(Member {
                peer_id: r.get(0)?,
                role: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Roster {
        known,
        members,
        events,
        invalid,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use quiet_plugin_api::{field, Envelope, Value};

    use super::*;
    use crate::{
        crypto::event_crypto::NetworkKey,
        storage::{counters::Counters, networks},
    };

    /// A data folder: its identity, database, and a store signing as it.
    struct Host {
        dir: tempfile::TempDir,
        conn: Connection,
        store: EventStore,
    }

    impl Host {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let me = Arc::new(HostIdentity::load_or_create(dir.path()).unwrap());
            let keys = Arc::new(networks::NetworkKeys::new(dir.path()));
            let store = EventStore::new(keys, Arc::new(Counters::default())).signing_as(me);
            let conn = db::open(dir.path()).unwrap();
            Host { dir, conn, store }
        }

        fn me(&self) -> &HostIdentity {
            self.store.me().unwrap()
        }

        fn peer(&self) -> Peer {
            *self.me().signing().peer_id()
        }

        /// Holds `key` for `network_id`, as if it joined through `inviter`
        /// (`None`: it created it before membership).
        fn holds(&self, network_id: &str, key: &NetworkKey, inviter: Option<Peer>) {
            networks::NetworkKeys::new(self.dir.path())
                .store(network_id, key)
                .unwrap();
            self.conn
                .execute(
                    "INSERT INTO networks(network_id, created_ms, invited_by) VALUES (?1, 0, ?2)",
                    rusqlite::params![network_id, inviter.map(hex::encode)],
                )
                .unwrap();
        }

        fn ensure(&self) -> Vec<String> {
            let (written, failed) = ensure_geneses(&self.conn, &self.store);
            assert!(failed.is_empty(), "{failed:?}");
            written
        }

        fn key(&self, network_id: &str) -> NetworkKey {
            networks::NetworkKeys::new(self.dir.path())
                .get(network_id)
                .unwrap()
        }

        /// An event of `event_type` by this host, sealed but not stored.
        fn event(&self, network_id: &str, event_type: &str, content: &Value) -> Envelope {
            self.store
                .new_local_event(self.me().signing(), network_id, event_type, content, &[])
                .unwrap()
                .1
        }

        /// Receives `envelope` as the pipeline would: stored, routed, folded.
        fn receive(&self, envelope: &Envelope) {
            db::with_write_tx(&self.conn, |c| {
                self.store.store(&Statements::new(c), envelope.clone())?;
                refold(c, &self.store)
            })
            .unwrap();
        }

        fn roster(&self, network_id: &str) -> Roster {
            roster(&self.conn, network_id).unwrap()
        }
    }

    fn roles(r: &Roster) -> Vec<(String, &str)> {
        r.members
            .iter()
            .map(|m| (m.peer_id.clone(), m.role.as_str()))
            .collect()
    }

    /// Every event of `network_id` in `host`'s store, oldest first.
    fn stored(host: &Host, network_id: &str) -> Vec<Envelope> {
        host.conn
            .prepare("SELECT event FROM events WHERE network_id = ?1 ORDER BY routed")
            .unwrap()
            .query_map([network_id], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|bytes| {
                Envelope::of_type(crate::storage::event_store::STORE_EVENT)
                    .with(field::NETWORK_ID, network_id)
                    .with(field::EVENT_CIPHERTEXT, bytes.unwrap())
            })
            .collect()
    }

    #[test]
    fn a_new_network_knows_its_creator_and_a_genesis_a_member_makes_up_counts_for_nothing() {
        let creator = Host::new();
        let created = networks::create(
            creator.dir.path(),
            &creator.conn,
            &creator.me().peer_id(),
            "127.0.0.1:1",
        )
        .unwrap();
        let net = created.network_id.clone();
        assert_eq!(creator.ensure(), vec![net.clone()]);
        // Once written, never again.
        assert!(creator.ensure().is_empty());
        let me = hex::encode(creator.peer());
        let expected = vec![(me.clone(), "creator")];
        assert_eq!(roles(&creator.roster(&net)), expected);

        // Mallory holds the key and writes a genesis of her own, naming
        // herself creator and B a member. B joined through Mallory, and her
        // genesis reaches B first: B takes its inviter's word, as it took
        // its word for the key, while no genesis derives the id.
        let mallory = Host::new();
        let b = Host::new();
        let key = creator.key(&net);
        mallory.holds(&net, &key, Some(creator.peer()));
        b.holds(&net, &key, Some(mallory.peer()));
        let forged = Op::Genesis {
            members: vec![b.peer()],
            salt: [9; 16],
        };
        let forged = mallory.event(&net, forged.event_type(), &forged.content());
        b.receive(&forged);
        let r = b.roster(&net);
        assert_eq!(r.members[0].peer_id, hex::encode(mallory.peer()), "{r:?}");
        // The real one derives the id, and wins wherever it arrives.
        for e in stored(&creator, &net) {
            b.receive(&e);
            creator.receive(&forged);
        }
        for host in [&creator, &b] {
            let r = host.roster(&net);
            assert!(r.known);
            assert_eq!(roles(&r), expected);
            assert_eq!((r.events, r.invalid), (2, 1));
        }
    }

    #[test]
    fn a_legacy_network_gets_a_genesis_naming_everyone_who_took_part() {
        let creator = Host::new();
        let (b, c, d) = (Host::new(), Host::new(), Host::new());
        let net = "cd".repeat(16);
        let key = NetworkKey::generate();
        creator.holds(&net, &key, None);
        for (host, inviter) in [(&b, creator.peer()), (&c, creator.peer()), (&d, b.peer())] {
            host.holds(&net, &key, Some(inviter));
        }
        // B and C wrote events; D is a peer the creator syncs with.
        let text = Value::map([("text", Value::from("hi"))]);
        for host in [&b, &c] {
            creator.receive(&host.event(&net, "message", &text));
        }
        creator
            .conn
            .execute(
                "INSERT INTO addresses(peer_id, network_id, ip, port) VALUES (?1, ?2, '127.0.0.1', 1)",
                (hex::encode(d.peer()), &net),
            )
            .unwrap();
        assert_eq!(creator.ensure(), vec![net.clone()]);
        let mut expected = vec![(hex::encode(creator.peer()), "creator")];
        let mut others: Vec<_> = [&b, &c, &d]
            .iter()
            .map(|h| (hex::encode(h.peer()), "member"))
            .collect();
        others.sort();
        expected.extend(others);
        assert_eq!(roles(&creator.roster(&net)), expected);
        // B and C joined through the creator, so they know its genesis; D
        // joined through B and cannot tell it from one B made up: it waits
        // for B's word.
        for e in stored(&creator, &net) {
            for host in [&b, &c, &d] {
                host.receive(&e);
            }
        }
        assert_eq!(roles(&b.roster(&net)), expected);
        assert_eq!(roles(&c.roster(&net)), expected);
        let r = d.roster(&net);
        assert!(!r.known && r.members.is_empty(), "{r:?}");
    }
}
