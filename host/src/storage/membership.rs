//! Membership: who is in a network, computed from its membership events.
//!
//! Why a fold over signed events rather than a table admins edit: every
//! host must reach the same member set from the same events, whatever
//! order they arrived in, and a removal must not be undone by a clock.
//! So each event is judged against its own causal past (the events its
//! deps name, and theirs), never against what a host happened to hold
//! when it arrived; and the set is defined by causality alone:
//!
//! - a peer is a member if a valid genesis or add names it, and every
//!   valid removal (or leave) of it is in the causal past of a valid add
//!   of it: a removal wins over an add it did not see;
//! - a member is an admin if it is the creator, or a valid grant names it
//!   and every valid revoke of its role, and every removal of it, is in
//!   the causal past of a valid grant;
//! - who may do what is in [`Op`]. The creator cannot be removed, so a
//!   network always keeps an admin; two admins who remove each other at
//!   once are both removed, as each removal was valid where it was made.
//!
//! The plan, and what builds on this (key rotation, invites, sync), is in
//! `docs/design/membership.md`. This module is pure: it reads no database
//! and no clock, so its property tests can permute arrival orders freely.
//!
//! Cost: the causal past of every event judged is kept as a bit set, n²
//! bits for n membership events (a network with 2,000 membership events:
//! 500 KB, for the length of a fold), and judging is quadratic too. So
//! what no causal past could make valid is set aside unjudged (see
//! [`fold`]): only the creator and the admins it made can add to the
//! cost, not any member. Membership events are rare next to messages; a
//! network whose admins outgrow this needs snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use quiet_plugin_api::Value;

use crate::{
    crypto::signed_event::{EventId, SignedEvent},
    encoding::event_type::HOSTS_PREFIX,
};

/// A peer id's bytes: the X25519 public key, whose Ed25519 form signs.
pub type Peer = [u8; 32];

/// A peer id's bytes, from its hex form; `None` if it is not one.
pub fn peer_of_hex(peer_id: &str) -> Option<Peer> {
    let mut p = [0u8; 32];
    hex::decode_to_slice(peer_id, &mut p).ok().map(|()| p)
}

/// What a membership event does; see the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Starts the network: its author is the creator and first admin;
    /// `members` join with it. Only the genesis the network was created
    /// with (see [`fold`]) counts.
    Genesis {
        /// The first members besides the creator.
        members: Vec<Peer>,
        /// What the network id was derived from, with the creator's peer
        /// id ([`network_id_of`]), so that any host can tell the real
        /// genesis from one a member made up.
        salt: [u8; 16],
    },
    /// An admin adds `peer`, admitted with the invite `invite`.
    Add {
        /// Who joins.
        peer: Peer,
        /// The invite's id, so that a revoked invite admits no one.
        invite: [u8; 16],
    },
    /// An admin removes `peer`, a member and not the creator.
    Remove {
        /// Who goes.
        peer: Peer,
    },
    /// A member other than the creator leaves.
    Leave,
    /// The creator makes `peer`, a member, an admin, or takes the role
    /// back.
    Admin {
        /// Whose role changes.
        peer: Peer,
        /// Whether it is an admin after.
        admin: bool,
    },
    /// An admin revokes an invite: adds made with it after this (with it
    /// in their causal past) are not valid.
    Revoke {
        /// The invite's id.
        invite: [u8; 16],
    },
    /// An admin rotates the network key (after a leave, or to merge
    /// concurrent rotations).
    Key,
}

/// One membership event, verified: its author is the signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its id.
    pub id: EventId,
    /// Its verified author.
    pub author: Peer,
    /// The events it depends on. Ids of events that are not membership
    /// events are ignored here.
    pub deps: Vec<EventId>,
    /// What it does.
    pub op: Op,
}

impl Op {
    /// The event type it travels as: [`HOSTS_PREFIX`] and a name.
    pub fn event_type(&self) -> &'static str {
        match self {
            Op::Genesis { .. } => "quiet.network",
            Op::Add { .. } => "quiet.add",
            Op::Remove { .. } => "quiet.remove",
            Op::Leave => "quiet.leave",
            Op::Admin { .. } => "quiet.admin",
            Op::Revoke { .. } => "quiet.revoke",
            Op::Key => "quiet.key",
        }
    }

    /// Its content, as signed.
    pub fn content(&self) -> Value {
        let peer = |p: &Peer| Value::from(&p[..]);
        let fields: Vec<(&str, Value)> = match self {
            Op::Genesis { members, salt } => vec![
                (
                    "members",
                    Value::from(members.iter().map(peer).collect::<Vec<_>>()),
                ),
                ("salt", Value::from(&salt[..])),
            ],
            Op::Add { peer: p, invite } => {
                vec![("peer", peer(p)), ("invite", Value::from(&invite[..]))]
            }
            Op::Remove { peer: p } => vec![("peer", peer(p))],
            Op::Admin { peer: p, admin } => vec![("peer", peer(p)), ("admin", Value::from(*admin))],
            Op::Revoke { invite } => vec![("invite", Value::from(&invite[..]))],
            Op::Leave | Op::Key => vec![],
        };
        Value::map(fields)
    }

    /// The op an event of `event_type` with `content` carries; `None` for
    /// a type that is not a membership event. The error, one line, says
    /// what is wrong with a membership event's content: it may come from
    /// any member, so nothing in it is taken on trust.
    pub fn decode(event_type: &str, content: &Value) -> Option<Result<Op, String>> {
        let name = event_type.strip_prefix(HOSTS_PREFIX)?;
        let fixed = |key: &str| -> Result<&[u8], String> {
            content
                .get(key)
                .and_then(Value::as_bytes)
                .ok_or_else(|| format!("{event_type}: `{key}` is missing or not bytes"))
        };
        fn sized<const N: usize>(of: &str, key: &str, bytes: &[u8]) -> Result<[u8; N], String> {
            bytes
                .try_into()
                .map_err(|_| format!("{of}: `{key}` is {} bytes, not {N}", bytes.len()))
        }
        let array = |key: &str, bytes: &[u8]| sized::<32>(event_type, key, bytes);
        let peer = || array("peer", fixed("peer")?);
        let invite = || sized::<16>(event_type, "invite", fixed("invite")?);
        let (op, keys): (Result<Op, String>, &[&str]) = match name {
            "network" => (
                content
                    .get("members")
                    .and_then(Value::as_list)
                    .ok_or_else(|| format!("{event_type}: `members` is missing or not a list"))
                    .and_then(|list| {
                        let members = list.iter().map(|m| {
                            let bytes = m
                                .as_bytes()
                                .ok_or_else(|| format!("{event_type}: a member is not bytes"))?;
                            array("members", bytes)
                        });
                        Ok(Op::Genesis {
                            members: members.collect::<Result<_, _>>()?,
                            salt: sized(event_type, "salt", fixed("salt")?)?,
                        })
                    }),
                &["members", "salt"],
            ),
            "add" => (
                peer().and_then(|peer| {
                    Ok(Op::Add {
                        peer,
                        invite: invite()?,
                    })
                }),
                &["peer", "invite"],
            ),
            "remove" => (peer().map(|peer| Op::Remove { peer }), &["peer"]),
            "leave" => (Ok(Op::Leave), &[]),
            "admin" => (
                peer().and_then(|peer| {
                    let admin = content
                        .get("admin")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| {
                            format!("{event_type}: `admin` is missing or not a boolean")
                        })?;
                    Ok(Op::Admin { peer, admin })
                }),
                &["peer", "admin"],
            ),
            "revoke" => (invite().map(|invite| Op::Revoke { invite }), &["invite"]),
            "key" => (Ok(Op::Key), &[]),
            _ => {
                return Some(Err(format!(
                    "{event_type}: not a membership event this host knows"
                )))
            }
        };
        let fields = content.as_map().unwrap_or_default();
        if let Some(f) = fields.iter().find(|f| !keys.contains(&f.key.as_str())) {
            return Some(Err(format!(
                "{event_type}: unexpected key {:?}",
                f.key.as_str()
            )));
        }
        Some(op)
    }
}

impl Event {
    /// The membership event `event` is, if its type is one; the error
    /// says why its content is not one.
    pub fn of(event: &SignedEvent) -> Option<Result<Event, String>> {
        let op = Op::decode(&event.event_type, &event.content)?;
        Some(op.map(|op| Event {
            id: event.id,
            author: event.author,
            deps: event.deps.clone(),
            op,
        }))
    }
}

/// Why an event has no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A genesis other than the network's own.
    NotTheGenesis,
    /// Its author was not a member in its causal past.
    NotAMember,
    /// It needs an admin (or the creator), and its author was not one.
    NotAllowed,
    /// It removes, leaves, or changes the role of someone it cannot: the
    /// creator, or a peer that was not a member.
    BadTarget,
    /// An add with an invite revoked in its causal past.
    InviteRevoked,
    /// Its deps go round in a circle, or through an event that does.
    Cycle,
}

/// The member set, and what became of each event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// The creator, once the genesis is among the events.
    pub creator: Option<Peer>,
    /// The members, each with whether it is an admin.
    pub members: BTreeMap<Peer, bool>,
    /// Peers that were members and are no longer.
    pub removed: BTreeSet<Peer>,
    /// The events without effect, and why.
    pub invalid: BTreeMap<EventId, Invalid>,
    /// The valid events no other valid one names as a dep: what a new
    /// membership event depends on.
    pub heads: Vec<EventId>,
}

impl Membership {
    /// Whether `peer` is a member.
    pub fn is_member(&self, peer: &Peer) -> bool {
        self.members.contains_key(peer)
    }

    /// Whether `peer` is an admin.
    pub fn is_admin(&self, peer: &Peer) -> bool {
        self.members.get(peer).copied().unwrap_or(false)
    }
}

/// The id of the network `creator` starts with `salt`: the first 16
/// bytes of a keyed BLAKE3 of both, in hex. Deriving the id so binds a
/// network to its creator: a `quiet.network` event whose author and salt
/// do not give the network's id is not its genesis, so no member can make
/// up another, and a host needs no word from anyone to know the real one.
pub fn network_id_of(creator: &Peer, salt: &[u8; 16]) -> String {
    let mut h = blake3::Hasher::new_derive_key("quiet-host 2026 network id");
    h.update(creator);
    h.update(salt);
    hex::encode(&h.finalize().as_bytes()[..16])
}

/// The membership that `events` give, for the network created by the
/// genesis `genesis`. The order of `events` does not matter; an id given
/// twice counts once.
///
/// What a member can make cost: the fold is quadratic in the events it
/// judges by their causal past, so it first sets aside, as invalid, every
/// event that no causal past could make valid: a second genesis, an
/// event whose causal past lacks the genesis, an event that needs an admin
/// by an author no event by the creator ever made one, and a leave by a
/// peer no genesis or add by such an author ever let in. So of the
/// members, only the creator and those it ever made admins can add to the
/// fold's cost, and every other member only with leaves that name the
/// genesis in their past (each signed and sent, within what the network
/// lets one peer send).
pub fn fold(genesis: &EventId, events: &[Event]) -> Membership {
    fold_judging(genesis, events, &set_aside(genesis, events))
}

/// The events of `events` that no causal past could make valid, with why
/// (see [`fold`]).
fn set_aside(genesis: &EventId, events: &[Event]) -> BTreeMap<EventId, Invalid> {
    let creator = events
        .iter()
        .find(|e| e.id == *genesis && matches!(e.op, Op::Genesis { .. }))
        .map(|e| e.author);
    // Who could ever be an admin: the creator, and whom it granted.
    let mut admins: BTreeSet<Peer> = creator.into_iter().collect();
    for e in events {
        if let Op::Admin { peer, admin: true } = &e.op {
            if Some(e.author) == creator {
                admins.insert(*peer);
            }
        }
    }
    // Who could ever be a member: they, and whom a genesis or add of
    // theirs let in.
    let mut members = admins.clone();
    for e in events.iter().filter(|e| admins.contains(&e.author)) {
        match &e.op {
            Op::Genesis { members: first, .. } if e.id == *genesis => {
                members.extend(first.iter().copied())
            }
            Op::Add { peer, .. } => {
                members.insert(*peer);
            }
            _ => {}
        }
    }
    events
        .iter()
        .filter_map(|e| {
            let why = match &e.op {
                Op::Genesis { .. } if e.id == *genesis => None,
                Op::Genesis { .. } => Some(Invalid::NotTheGenesis),
                _ if !members.contains(&e.author) => Some(Invalid::NotAMember),
                Op::Leave => None,
                _ if !admins.contains(&e.author) => Some(Invalid::NotAllowed),
                _ => None,
            };
            why.map(|why| (e.id, why))
        })
        .collect()
}

/// [`fold`], judging by its causal past every event but those in
/// `set_aside`, which are invalid for the reason it gives. They stay in
/// the log, since causality runs through them.
fn fold_judging(
    genesis: &EventId,
    events: &[Event],
    set_aside: &BTreeMap<EventId, Invalid>,
) -> Membership {
    let log = Log::new(events, genesis, set_aside);
    let mut valid = vec![false; log.events.len()];
    let mut invalid = set_aside.clone();
    for e in log.rootless() {
        invalid.entry(e.id).or_insert(Invalid::NotAMember);
    }
    for &i in &log.order {
        if log.slot[i].is_none() {
            continue;
        }
        match log.check(i, genesis, &valid) {
            Ok(()) => valid[i] = true,
            Err(why) => {
                invalid.insert(log.events[i].id, why);
            }
        }
    }
    for (i, e) in log.events.iter().enumerate() {
        if !log.ordered[i] {
            invalid.insert(e.id, Invalid::Cycle);
        }
    }
    let everything = BitSet::full(log.judged);
    let view = View {
        log: &log,
        valid: &valid,
        within: &everything,
    };
    let mut membership = Membership {
        creator: view.creator(),
        invalid,
        heads: log.heads(&valid),
        ..Membership::default()
    };
    for peer in log.peers(&valid) {
        if view.is_member(&peer) {
            membership.members.insert(peer, view.is_admin(&peer));
        } else if view.was_member(&peer) {
            membership.removed.insert(peer);
        }
    }
    membership
}

/// The events in a topological order, with their causal pasts.
struct Log<'a> {
    events: Vec<&'a Event>,
    /// Indices in a topological order, ties broken by id.
    order: Vec<usize>,
    /// The judged ones among them, in that order: what a [`View`] walks.
    judged_order: Vec<usize>,
    /// Whether an event is in `order` (not caught in a cycle).
    ordered: Vec<bool>,
    /// Whether an event's causal past holds the genesis, or it is it.
    rooted: Vec<bool>,
    /// Each judged event's place in the bit sets of `past`; `None` for
    /// one set aside or rootless.
    slot: Vec<Option<usize>>,
    /// How many events are judged.
    judged: usize,
    /// Each event's causal past (the events its deps name, and theirs), of
    /// judged events only: a bit set as large as they are many, so that
    /// events set aside cost a bit per judged event each, not per event.
    past: Vec<BitSet>,
    /// For each event, the indices of the events that name it as a dep.
    named_by: Vec<Vec<usize>>,
}

impl<'a> Log<'a> {
    /// The log of `given`, judging all but the events `set_aside` names
    /// and those whose causal past lacks `genesis` (no one is a member
    /// there: see [`Log::rootless`]).
    fn new(given: &'a [Event], genesis: &EventId, set_aside: &BTreeMap<EventId, Invalid>) -> Self {
        let mut by_id: BTreeMap<EventId, &Event> = BTreeMap::new();
        for e in given {
            by_id.entry(e.id).or_insert(e);
        }
        let events: Vec<&Event> = by_id.into_values().collect();
        let index: HashMap<EventId, usize> =
            events.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
        let deps: Vec<BTreeSet<usize>> = events
            .iter()
            .map(|e| {
                e.deps
                    .iter()
                    .filter_map(|d| index.get(d).copied())
                    .collect()
            })
            .collect();
        let mut named_by = vec![Vec::new(); events.len()];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                named_by[d].push(i);
            }
        }
        // Kahn's algorithm; the ready set is ordered by index, which is
        // the order of ids.
        let mut waiting: Vec<usize> = deps.iter().map(BTreeSet::len).collect();
        let mut ready: BTreeSet<usize> = (0..events.len()).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(events.len());
        let mut rooted = vec![false; events.len()];
        while let Some(i) = ready.pop_first() {
            rooted[i] = events[i].id == *genesis || deps[i].iter().any(|&d| rooted[d]);
            order.push(i);
            for &j in &named_by[i] {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        let mut ordered = vec![false; events.len()];
        for &i in &order {
            ordered[i] = true;
        }
        let mut judged = 0;
        let slot: Vec<Option<usize>> = (0..events.len())
            .map(|i| {
                (rooted[i] && !set_aside.contains_key(&events[i].id)).then(|| {
                    judged += 1;
                    judged - 1
                })
            })
            .collect();
        let mut past = vec![BitSet::empty(judged); events.len()];
        for &i in &order {
            let mut p = BitSet::empty(judged);
            for &d in &deps[i] {
                p.union_with(&past[d]);
                if let Some(at) = slot[d] {
                    p.insert(at);
                }
            }
            past[i] = p;
        }
        let judged_order = order
            .iter()
            .copied()
            .filter(|&i| slot[i].is_some())
            .collect();
        Log {
            events,
            order,
            judged_order,
            ordered,
            rooted,
            slot,
            judged,
            past,
            named_by,
        }
    }

    /// The events whose causal past lacks the genesis (the genesis aside):
    /// no one is a member there, so none is valid.
    fn rootless(&self) -> impl Iterator<Item = &Event> + '_ {
        self.order
            .iter()
            .filter(|&&i| !self.rooted[i])
            .map(|&i| self.events[i])
    }

    /// Whether event `i`, a judged one, is in `past`.
    fn in_past(&self, past: &BitSet, i: usize) -> bool {
        self.slot[i].is_some_and(|at| past.contains(at))
    }

    /// Whether event `i` is valid, judged by its causal past.
    fn check(&self, i: usize, genesis: &EventId, valid: &[bool]) -> Result<(), Invalid> {
        let e = self.events[i];
        let before = View {
            log: self,
            valid,
            within: &self.past[i],
        };
        let creator = before.creator();
        let member = |p: &Peer| before.is_member(p);
        let admin = |p: &Peer| before.is_admin(p);
        let not_creator = |p: &Peer| creator.as_ref() != Some(p);
        match &e.op {
            Op::Genesis { .. } if e.id == *genesis => Ok(()),
            Op::Genesis { .. } => Err(Invalid::NotTheGenesis),
            _ if !member(&e.author) => Err(Invalid::NotAMember),
            Op::Add { invite, .. } => {
                if !admin(&e.author) {
                    Err(Invalid::NotAllowed)
                } else if before.revoked(invite) {
                    Err(Invalid::InviteRevoked)
                } else {
                    Ok(())
                }
            }
            Op::Remove { .. } if !admin(&e.author) => Err(Invalid::NotAllowed),
            Op::Remove { peer } if member(peer) && not_creator(peer) => Ok(()),
            Op::Remove { .. } => Err(Invalid::BadTarget),
            Op::Leave if not_creator(&e.author) => Ok(()),
            Op::Leave => Err(Invalid::BadTarget),
            Op::Admin { .. } if creator != Some(e.author) => Err(Invalid::NotAllowed),
            Op::Admin { peer, .. } if member(peer) && not_creator(peer) => Ok(()),
            Op::Admin { .. } => Err(Invalid::BadTarget),
            Op::Revoke { .. } | Op::Key if admin(&e.author) => Ok(()),
            Op::Revoke { .. } | Op::Key => Err(Invalid::NotAllowed),
        }
    }

    /// Every peer a valid event names: no other can be a member.
    fn peers(&self, valid: &[bool]) -> BTreeSet<Peer> {
        let mut peers = BTreeSet::new();
        for e in (0..self.events.len())
            .filter(|&i| valid[i])
            .map(|i| self.events[i])
        {
            peers.insert(e.author);
            match &e.op {
                Op::Genesis { members, .. } => peers.extend(members.iter().copied()),
                Op::Add { peer, .. } | Op::Remove { peer } | Op::Admin { peer, .. } => {
                    peers.insert(*peer);
                }
                Op::Leave | Op::Revoke { .. } | Op::Key => {}
            }
        }
        peers
    }

    /// The valid events no valid event names. Invalid ones are left out:
    /// any member can make as many as it likes, and a new event's deps are
    /// bounded.
    fn heads(&self, valid: &[bool]) -> Vec<EventId> {
        (0..self.events.len())
            .filter(|&i| valid[i] && self.named_by[i].iter().all(|&j| !valid[j]))
            .map(|i| self.events[i].id)
            .collect()
    }
}

/// The valid events among `within`, a causally closed set of a log.
struct View<'a> {
    log: &'a Log<'a>,
    valid: &'a [bool],
    within: &'a BitSet,
}

impl View<'_> {
    fn each(&self) -> impl Iterator<Item = (usize, &Event)> + '_ {
        self.log
            .judged_order
            .iter()
            .copied()
            .filter(|&i| self.valid[i] && self.log.in_past(self.within, i))
            .map(|i| (i, self.log.events[i]))
    }

    fn creator(&self) -> Option<Peer> {
        self.each().find_map(|(_, e)| match e.op {
            Op::Genesis { .. } => Some(e.author),
            _ => None,
        })
    }

    /// Whether `peer` was ever let in.
    fn was_member(&self, peer: &Peer) -> bool {
        self.each().any(|(_, e)| lets_in(e, peer))
    }

    /// Let in, and every removal of it seen by a later add.
    fn is_member(&self, peer: &Peer) -> bool {
        let adds: Vec<usize> = self
            .each()
            .filter(|(_, e)| lets_in(e, peer))
            .map(|(i, _)| i)
            .collect();
        !adds.is_empty()
            && self
                .each()
                .filter(|(_, e)| lets_out(e, peer))
                .all(|(r, _)| adds.iter().any(|&a| self.log.in_past(&self.log.past[a], r)))
    }

    /// The creator, or granted, and every revoke or removal of it seen by
    /// a later grant.
    fn is_admin(&self, peer: &Peer) -> bool {
        if self.creator().as_ref() == Some(peer) {
            return true;
        }
        if !self.is_member(peer) {
            return false;
        }
        let grants: Vec<usize> = self
            .each()
            .filter(|(_, e)| matches!(e.op, Op::Admin { peer: p, admin: true } if p == *peer))
            .map(|(i, _)| i)
            .collect();
        !grants.is_empty()
            && self
                .each()
                .filter(|(_, e)| {
                    lets_out(e, peer)
                        || matches!(e.op, Op::Admin { peer: p, admin: false } if p == *peer)
                })
                .all(|(r, _)| {
                    grants
                        .iter()
                        .any(|&g| self.log.in_past(&self.log.past[g], r))
                })
    }

    fn revoked(&self, invite: &[u8; 16]) -> bool {
        self.each()
            .any(|(_, e)| matches!(&e.op, Op::Revoke { invite: i } if i == invite))
    }
}

/// Whether `e` lets `peer` in.
fn lets_in(e: &Event, peer: &Peer) -> bool {
    match &e.op {
        Op::Genesis { members, .. } => e.author == *peer || members.contains(peer),
        Op::Add { peer: p, .. } => p == peer,
        _ => false,
    }
}

/// Whether `e` takes `peer` out.
fn lets_out(e: &Event, peer: &Peer) -> bool {
    match &e.op {
        Op::Remove { peer: p } => p == peer,
        Op::Leave => e.author == *peer,
        _ => false,
    }
}

/// A fixed-size set of indices.
#[derive(Clone)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn empty(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)])
    }

    fn full(n: usize) -> Self {
        let mut s = BitSet::empty(n);
        for i in 0..n {
            s.insert(i);
        }
        s
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn union_with(&mut self, other: &BitSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Peer = [1; 32];
    const B: Peer = [2; 32];
    const C: Peer = [3; 32];
    const D: Peer = [4; 32];

    /// Builds logs: ids in the order events are made.
    #[derive(Default)]
    struct Maker {
        events: Vec<Event>,
    }

    impl Maker {
        fn make(&mut self, author: Peer, deps: &[EventId], op: Op) -> EventId {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(self.events.len() as u64 + 1).to_be_bytes());
            self.events.push(Event {
                id,
                author,
                deps: deps.to_vec(),
                op,
            });
            id
        }

        fn genesis(&mut self, creator: Peer, members: &[Peer]) -> EventId {
            let members = members.to_vec();
            self.make(
                creator,
                &[],
                Op::Genesis {
                    members,
                    salt: [0; 16],
                },
            )
        }

        fn fold(&self) -> Membership {
            fold(&self.events[0].id, &self.events)
        }
    }

    fn add(peer: Peer) -> Op {
        Op::Add {
            peer,
            invite: [9; 16],
        }
    }

    fn admin(peer: Peer) -> Op {
        Op::Admin { peer, admin: true }
    }

    fn members(m: &Membership) -> Vec<(Peer, bool)> {
        m.members.iter().map(|(p, a)| (*p, *a)).collect()
    }

    #[test]
    fn the_creator_adds_and_removes_and_a_removed_member_can_be_added_again() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[]);
        let b = log.make(A, &[g], add(B));
        let c = log.make(A, &[b], add(C));
        let r = log.make(A, &[c], Op::Remove { peer: C });
        let m = log.fold();
        assert_eq!(m.creator, Some(A));
        assert_eq!(members(&m), vec![(A, true), (B, false)]);
        assert_eq!(m.removed, BTreeSet::from([C]));
        assert_eq!(m.heads, vec![r]);
        log.make(A, &[r], add(C));
        let m = log.fold();
        assert!(m.is_member(&C) && m.removed.is_empty());
    }

    #[test]
    fn members_that_are_not_admins_cannot_add_remove_or_grant() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[B, C]);
        let add_d = log.make(B, &[g], add(D));
        let remove_c = log.make(B, &[g], Op::Remove { peer: C });
        let grant = log.make(B, &[g], admin(B));
        let by_stranger = log.make(D, &[g], Op::Key);
        let m = log.fold();
        assert_eq!(members(&m), vec![(A, true), (B, false), (C, false)]);
        assert_eq!(m.invalid[&add_d], Invalid::NotAllowed);
        assert_eq!(m.invalid[&remove_c], Invalid::NotAllowed);
        assert_eq!(m.invalid[&grant], Invalid::NotAllowed);
        assert_eq!(m.invalid[&by_stranger], Invalid::NotAMember);
        // Events without effect are no heads: a member could make a
        // thousand, and a new event names at most 16 deps.
        assert_eq!(m.heads, vec![g]);
    }

    #[test]
    fn the_creator_cannot_be_removed_nor_leave_and_another_genesis_counts_for_nothing() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[B]);
        let grant = log.make(A, &[g], admin(B));
        let remove_a = log.make(B, &[grant], Op::Remove { peer: A });
        let leave = log.make(A, &[grant], Op::Leave);
        let other = log.genesis(B, &[]);
        let m = log.fold();
        assert_eq!(members(&m), vec![(A, true), (B, true)]);
        assert_eq!(m.invalid[&remove_a], Invalid::BadTarget);
        assert_eq!(m.invalid[&leave], Invalid::BadTarget);
        assert_eq!(m.invalid[&other], Invalid::NotTheGenesis);
    }

    #[test]
    fn two_admins_who_remove_each_other_at_once_are_both_removed() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[B, C]);
        let gb = log.make(A, &[g], admin(B));
        let gc = log.make(A, &[gb], admin(C));
        // Concurrent: neither names the other.
        let b_removes_c = log.make(B, &[gc], Op::Remove { peer: C });
        let c_removes_b = log.make(C, &[gc], Op::Remove { peer: B });
        let m = log.fold();
        assert_eq!(members(&m), vec![(A, true)]);
        assert_eq!(m.removed, BTreeSet::from([B, C]));
        assert!(m.invalid.is_empty());
        assert_eq!(m.heads, vec![b_removes_c, c_removes_b]);
    }

    #[test]
    fn a_removal_wins_over_what_it_did_not_see_and_acts_after_it_did_not_count() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[B, C]);
        let grant = log.make(A, &[g], admin(B));
        // Concurrent with B's removal: the creator grants C; B, not yet
        // knowing, adds D.
        let remove_b = log.make(A, &[grant], Op::Remove { peer: B });
        log.make(A, &[grant], admin(C));
        let d = log.make(B, &[grant], add(D));
        // After its removal, B's acts are not valid.
        let late = log.make(B, &[remove_b, d], Op::Remove { peer: C });
        let m = log.fold();
        assert_eq!(members(&m), vec![(A, true), (C, true), (D, false)]);
        assert_eq!(m.removed, BTreeSet::from([B]));
        assert_eq!(m.invalid[&late], Invalid::NotAMember);
    }

    #[test]
    fn an_add_concurrent_with_a_removal_does_not_undo_it_whatever_their_ids() {
        for add_first in [true, false] {
            let mut log = Maker::default();
            let g = log.genesis(A, &[B, C]);
            let grant = log.make(A, &[g], admin(B));
            // B adds C again while A removes C; neither saw the other.
            if add_first {
                log.make(B, &[grant], add(C));
                log.make(A, &[grant], Op::Remove { peer: C });
            } else {
                log.make(A, &[grant], Op::Remove { peer: C });
                log.make(B, &[grant], add(C));
            }
            let m = log.fold();
            assert!(!m.is_member(&C), "add first: {add_first}");
            assert_eq!(m.removed, BTreeSet::from([C]));
        }
    }

    #[test]
    fn a_revoked_invite_admits_no_one_after_the_revoke() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[]);
        let revoke = log.make(A, &[g], Op::Revoke { invite: [9; 16] });
        let before = log.make(A, &[g], add(B));
        let after = log.make(A, &[revoke], add(C));
        let m = log.fold();
        assert!(m.is_member(&B), "{before:?} did not see the revoke");
        assert_eq!(m.invalid[&after], Invalid::InviteRevoked);
        assert!(!m.is_member(&C));
    }

    #[test]
    fn events_in_a_circle_count_for_nothing() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[]);
        let x = log.make(A, &[g], add(B));
        let y = log.make(A, &[x], add(C));
        // x names y as well: the two wait for each other.
        log.events[1].deps.push(y);
        let m = log.fold();
        assert_eq!(members(&m), vec![(A, true)]);
        assert_eq!(m.invalid[&x], Invalid::Cycle);
        assert_eq!(m.invalid[&y], Invalid::Cycle);
        assert_eq!(m.heads, vec![g]);
    }

    #[test]
    fn every_op_travels_as_its_content_and_comes_back() {
        let ops = [
            Op::Genesis {
                members: vec![B, C],
                salt: [3; 16],
            },
            Op::Genesis {
                members: vec![],
                salt: [0; 16],
            },
            add(D),
            Op::Remove { peer: C },
            Op::Leave,
            admin(B),
            Op::Admin {
                peer: B,
                admin: false,
            },
            Op::Revoke { invite: [7; 16] },
            Op::Key,
        ];
        for op in ops {
            let t = op.event_type();
            assert!(t.starts_with(HOSTS_PREFIX), "{t}");
            let bytes = crate::encoding::codec::encode(&op.content());
            let content = crate::encoding::codec::decode(&bytes).unwrap();
            assert_eq!(Op::decode(t, &content), Some(Ok(op)));
        }
        assert_eq!(Op::decode("message", Value::EMPTY_MAP), None);
    }

    #[test]
    fn a_membership_event_with_bad_content_is_named_in_one_line() {
        let bad = |t: &str, content: Value| Op::decode(t, &content).unwrap().unwrap_err();
        let short = Value::map([("peer", Value::from(&[1u8; 31][..]))]);
        assert_eq!(
            bad("quiet.remove", short),
            "quiet.remove: `peer` is 31 bytes, not 32"
        );
        let no_peer = Value::map([("invite", Value::from(&[1u8; 16][..]))]);
        assert_eq!(
            bad("quiet.add", no_peer),
            "quiet.add: `peer` is missing or not bytes"
        );
        let extra = Value::map([("peer", Value::from(&B[..])), ("seals", Value::from(1))]);
        assert_eq!(
            bad("quiet.remove", extra),
            "quiet.remove: unexpected key \"seals\""
        );
        let text_member = Value::map([("members", Value::from(vec![Value::from("b")]))]);
        assert_eq!(
            bad("quiet.network", text_member),
            "quiet.network: a member is not bytes"
        );
        let admin_text = Value::map([("peer", Value::from(&B[..])), ("admin", Value::from("yes"))]);
        assert!(bad("quiet.admin", admin_text).contains("`admin` is missing or not a boolean"));
        assert_eq!(
            bad("quiet.party", Value::map([("x", Value::from(1))])),
            "quiet.party: not a membership event this host knows"
        );
        let forged = bad("quiet.leave", Value::map([("x\nforged", Value::from(1))]));
        assert!(!forged.contains('\n'), "{forged}");
    }

    #[test]
    fn what_no_causal_past_could_make_valid_is_set_aside_unjudged() {
        let mut log = Maker::default();
        let g = log.genesis(A, &[B, C]);
        // C, a member but no admin, adds at will; a stranger signs a
        // removal; B leaves, then signs leaves that name no genesis, and
        // leaves after its leave (it is no longer a member there).
        let by_c: Vec<EventId> = (0..50).map(|_| log.make(C, &[g], add(D))).collect();
        let stranger = log.make([9; 32], &[g], Op::Remove { peer: B });
        let leave = log.make(B, &[g], Op::Leave);
        let rootless: Vec<EventId> = (0..20).map(|_| log.make(B, &[], Op::Leave)).collect();
        let after: Vec<EventId> = (0..20).map(|_| log.make(B, &[leave], Op::Leave)).collect();
        let m = fold(&g, &log.events);
        assert!(by_c.iter().all(|e| m.invalid[e] == Invalid::NotAllowed));
        assert_eq!(m.invalid[&stranger], Invalid::NotAMember);
        assert!(rootless
            .iter()
            .chain(&after)
            .all(|e| m.invalid[e] == Invalid::NotAMember));
        // None of them undoes the one leave that counts.
        assert!(!m.invalid.contains_key(&leave));
        assert!(m.removed.contains(&B) && m.is_member(&C) && !m.is_member(&D));
        assert_eq!(m.heads, vec![leave]);
    }

    /// A log made by several admins and members acting on what each has
    /// seen: a step takes an actor, the events it depends on (some of all
    /// so far, as if others' had not reached it), and an op.
    fn random_log(steps: Vec<(u8, Vec<prop::sample::Index>, u8, u8)>) -> Vec<Event> {
        let peers = [A, B, C, D, [5; 32], [6; 32]];
        let mut log = Maker::default();
        let g = log.genesis(A, &[B, C]);
        let mut ids = vec![g];
        for (actor, deps, op, target) in steps {
            let author = peers[actor as usize % peers.len()];
            let target = peers[target as usize % peers.len()];
            let mut deps: Vec<EventId> = deps.iter().map(|i| *i.get(&ids)).collect();
            deps.sort();
            deps.dedup();
            let op = match op % 7 {
                0 | 1 => add(target),
                2 => Op::Remove { peer: target },
                3 => Op::Leave,
                4 => Op::Admin {
                    peer: target,
                    admin: target[0].is_multiple_of(2),
                },
                5 => Op::Revoke { invite: [9; 16] },
                _ => Op::Key,
            };
            ids.push(log.make(author, &deps, op));
        }
        log.events
    }

    proptest! {
        #[test]
        fn every_arrival_order_gives_the_same_membership(
            steps in prop::collection::vec(
                (any::<u8>(), prop::collection::vec(any::<prop::sample::Index>(), 1..3), any::<u8>(), any::<u8>()),
                1..40,
            ),
            shuffle in any::<u64>(),
            again in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let events = random_log(steps);
            let genesis = events[0].id;
            let first = fold(&genesis, &events);
            // Another order, some events twice.
            let mut other = events.clone();
            let mut state = shuffle | 1;
            for i in (1..other.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                other.swap(i, (state % (i as u64 + 1)) as usize);
            }
            for i in &again {
                other.push(i.get(&events).clone());
            }
            prop_assert_eq!(&fold(&genesis, &other), &first);
            // What the fold sets aside unjudged, it would have found
            // invalid: judging everything gives the same set, and the same
            // events without effect (for a reason that may differ: set
            // aside, a non-admin's add is `NotAllowed` even where its
            // author was not yet a member).
            let all = fold_judging(&genesis, &events, &BTreeMap::new());
            prop_assert_eq!(
                (&all.creator, &all.members, &all.removed, &all.heads),
                (&first.creator, &first.members, &first.removed, &first.heads)
            );
            prop_assert_eq!(
                all.invalid.keys().collect::<Vec<_>>(),
                first.invalid.keys().collect::<Vec<_>>()
            );
            // The creator is always an admin, and no one is both a member
            // and removed.
            prop_assert!(first.is_admin(&A));
            prop_assert!(first.members.keys().all(|p| !first.removed.contains(p)));
        }
    }
}
