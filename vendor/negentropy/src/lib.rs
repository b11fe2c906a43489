// Copyright (c) 2023 Doug Hoyte
// Copyright (c) 2023 Yuki Kishimoto
// Distributed under the MIT software license

//! Rust implementation of the negentropy set-reconciliation protocol.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![allow(clippy::vec_init_then_push)]
#![cfg_attr(bench, feature(test))]
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

#[cfg(bench)]
extern crate test;

#[cfg(feature = "std")]
extern crate std;

#[cfg(not(feature = "std"))]
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::convert::TryFrom;
#[cfg(feature = "std")]
use std::collections::HashSet;

mod constants;
mod encoding;
mod error;
mod id;
mod sha256;
mod storage;
mod types;

pub use self::constants::{FINGERPRINT_SIZE, ID_SIZE, PROTOCOL_VERSION};
use self::encoding::{decode_var_int, encode_var_int, get_byte_array, get_bytes};
pub use self::error::Error;
pub use self::id::Id;
pub use self::storage::{NegentropyStorageBase, NegentropyStorageVector, Storage};
use self::types::Mode;
pub use self::types::{Bound, Item};

const MAX_U64: u64 = u64::MAX;
const BUCKETS: usize = 16;
const DOUBLE_BUCKETS: usize = BUCKETS * 2;

/// Negentropy
#[derive(Debug)]
pub struct Negentropy<'a, T> {
    storage: Storage<'a, T>,
    frame_size_limit: u64,
    is_initiator: bool,
    // quiet-host: whether the initiator lists the ids only it has, and how
    // many it found when it does not.
    collect_have_ids: bool,
    skipped_have_ids: u64,
    // quiet-host: whether the responder answers id lists with only the ids
    // the initiator lacks.
    answer_missing_ids: bool,
    last_timestamp_in: u64,
    last_timestamp_out: u64,
}

impl<'a, T> Negentropy<'a, T>
where
    T: NegentropyStorageBase,
{
    /// Create a new [`Negentropy`] instance.
    ///
    /// Frame size limit must be `equal to 0` or `greater than 4096`.
    pub fn new(storage: Storage<'a, T>, frame_size_limit: u64) -> Result<Self, Error> {
        if frame_size_limit != 0 && frame_size_limit < 4096 {
            return Err(Error::FrameSizeLimitTooSmall);
        }

        Ok(Self {
            storage,
            frame_size_limit,
            is_initiator: false,
            collect_have_ids: true,
            skipped_have_ids: 0,
            answer_missing_ids: false,
            last_timestamp_in: 0,
            last_timestamp_out: 0,
        })
    }

    /// Create a new [`Negentropy`] instance from **owned** storage.
    ///
    /// Frame size limit must be `equal to 0` or `greater than 4096`
    #[inline]
    pub fn owned(storage: T, frame_size_limit: u64) -> Result<Self, Error> {
        Self::new(Storage::Owned(storage), frame_size_limit)
    }

    /// Create a new [`Negentropy`] instance from **borrowed** storage.
    ///
    /// Frame size limit must be `equal to 0` or `greater than 4096`.
    #[inline]
    pub fn borrowed(storage: &'a T, frame_size_limit: u64) -> Result<Self, Error> {
        Self::new(Storage::Borrowed(storage), frame_size_limit)
    }

    /// Initiate reconciliation set
    pub fn initiate(&mut self) -> Result<Vec<u8>, Error> {
        if self.is_initiator {
            return Err(Error::AlreadyBuiltInitialMessage);
        }
        self.is_initiator = true;

        let bytes: Vec<u8> =
            self.split_range(0, self.storage.size()?, Bound::with_timestamp(MAX_U64))?;

        let mut output: Vec<u8> = Vec::with_capacity(1 + bytes.len());
        output.push(PROTOCOL_VERSION as u8);
        output.extend(bytes);

        Ok(output)
    }

    /// Check if this instance has been used to create an initial message
    #[inline]
    pub fn is_initiator(&self) -> bool {
        self.is_initiator
    }

    /// Set Initiator: for resuming initiation flow with a new instance
    #[inline]
    pub fn set_initiator(&mut self) {
        self.is_initiator = true;
    }

    /// quiet-host: the initiator stops listing the ids only it has (the
    /// `have_ids` of [`reconcile_with_ids`](Self::reconcile_with_ids) stay
    /// empty). A caller that ignores them saves 32 bytes per such id: a
    /// whole store's worth when the other side is empty.
    #[inline]
    pub fn skip_have_ids(&mut self) {
        self.collect_have_ids = false;
    }

    /// quiet-host: how many ids only we have the reconcile calls since
    /// [`skip_have_ids`](Self::skip_have_ids) found and did not list (or,
    /// from a responder that answers with the missing ids only, were told
    /// of: then a range whose answer a frame cut short may count twice, so
    /// read it as "none" or "some").
    #[inline]
    pub fn skipped_have_ids(&self) -> u64 {
        self.skipped_have_ids
    }

    /// quiet-host: the responder answers each id list of the initiator with
    /// the ids in that range only it has (and a count of the initiator's
    /// ids it lacks), not with every id it has there. Upstream's answer
    /// repeats the ids both sides share, so a range that differs by one id
    /// cost both lists: at a million items, where the initiator lists
    /// ranges of about 15 ids, that was two thirds of the bytes of
    /// reconciling 1,000 scattered differences.
    ///
    /// Only for an initiator that has called
    /// [`skip_have_ids`](Self::skip_have_ids) (it reads the count into
    /// [`skipped_have_ids`](Self::skipped_have_ids)); one that lists the
    /// ids only it has cannot find them in such an answer, and fails with
    /// [`Error::UnexpectedMode`]. The initiator has to ask for it outside
    /// of negentropy's messages: upstream initiators cannot read it.
    #[inline]
    pub fn answer_id_lists_with_missing_ids(&mut self) {
        self.answer_missing_ids = true;
    }

    /// Reconcile (server method)
    pub fn reconcile(&mut self, query: &[u8]) -> Result<Vec<u8>, Error> {
        if self.is_initiator {
            return Err(Error::Initiator);
        }

        self.reconcile_aux(query, &mut Vec::new(), &mut Vec::new())
    }

    /// Reconcile (client method)
    pub fn reconcile_with_ids(
        &mut self,
        query: &[u8],
        have_ids: &mut Vec<Id>,
        need_ids: &mut Vec<Id>,
    ) -> Result<Option<Vec<u8>>, Error> {
        if !self.is_initiator {
            return Err(Error::NonInitiator);
        }

        let output: Vec<u8> = self.reconcile_aux(query, have_ids, need_ids)?;
        if output.len() == 1 {
            return Ok(None);
        }

        Ok(Some(output))
    }

    fn reconcile_aux(
        &mut self,
        mut query: &[u8],
        have_ids: &mut Vec<Id>,
        need_ids: &mut Vec<Id>,
    ) -> Result<Vec<u8>, Error> {
        self.last_timestamp_in = 0;
        self.last_timestamp_out = 0;

        let mut full_output: Vec<u8> = Vec::with_capacity(1);
        full_output.push(PROTOCOL_VERSION as u8);

        let protocol_version: u64 = get_byte_array::<1>(&mut query)?
            .first()
            .copied()
            .map(|b| b as u64)
            .ok_or(Error::ProtocolVersionNotFound)?;

        if !(0x60..=0x6F).contains(&protocol_version) {
            return Err(Error::InvalidProtocolVersion);
        }

        if protocol_version != PROTOCOL_VERSION {
            if self.is_initiator {
                return Err(Error::UnsupportedProtocolVersion);
            } else {
                return Ok(full_output);
            }
        }

        let storage_size = self.storage.size()?;
        let mut prev_bound: Bound = Bound::new();
        let mut prev_index: usize = 0;
        let mut skip: bool = false;
        let mut emitted_index: usize = 0; // items below the last bound written to full_output end here

        while !query.is_empty() {
            let mut o: Vec<u8> = Vec::new();

            let curr_bound: Bound = self.decode_bound(&mut query)?;
            let mode: Mode = self.decode_mode(&mut query)?;

            let lower: usize = prev_index;
            let mut upper: usize =
                self.storage
                    .find_lower_bound(prev_index, storage_size, &curr_bound);

            match mode {
                Mode::Skip => {
                    skip = true;
                }
                Mode::Fingerprint => {
                    let their_fingerprint: [u8; FINGERPRINT_SIZE] = get_byte_array(&mut query)?;
                    let our_fingerprint: [u8; FINGERPRINT_SIZE] =
                        self.storage.fingerprint(lower, upper)?.to_bytes();

                    if their_fingerprint != our_fingerprint {
                        // do_skip
                        if skip {
                            skip = false;
                            o.extend(self.encode_bound(&prev_bound));
                            o.extend(self.encode_mode(Mode::Skip));
                        }

                        o.extend(self.split_range(lower, upper, curr_bound)?);
                    } else {
                        skip = true;
                    }
                }
                Mode::IdList => {
                    let num_ids: u64 = decode_var_int(&mut query);

                    // The count comes from the peer: check that the message
                    // holds that many IDs before reserving room for them.
                    if num_ids > (query.len() / ID_SIZE) as u64 {
                        return Err(Error::ParseEndsPrematurely);
                    }

                    #[cfg(feature = "std")]
                    let mut their_elems: HashSet<Id> = HashSet::with_capacity(num_ids as usize);
                    #[cfg(not(feature = "std"))]
                    let mut their_elems: BTreeSet<Id> = BTreeSet::new();

                    for _ in 0..num_ids {
                        let e: [u8; ID_SIZE] = get_byte_array(&mut query)?;
                        their_elems.insert(Id::from_byte_array(e));
                    }

                    if self.is_initiator {
                        // quiet-host: counted here, as the closure borrows self.
                        let mut skipped: u64 = 0;
                        let collect = self.collect_have_ids;
                        self.storage.iterate(lower, upper, &mut |item: Item, _| {
                            let k: Id = item.id;
                            if !their_elems.contains(&k) {
                                if collect {
                                    have_ids.push(k);
                                } else {
                                    skipped += 1;
                                }
                            } else {
                                their_elems.remove(&k);
                            }

                            Ok(true)
                        })?;
                        self.skipped_have_ids += skipped;

                        skip = true;

                        for k in their_elems.into_iter() {
                            need_ids.push(k);
                        }
                    } else {
                        // do_skip
                        if skip {
                            skip = false;
                            o.extend(self.encode_bound(&prev_bound));
                            o.extend(self.encode_mode(Mode::Skip));
                        }

                        // quiet-host: answering with the missing ids only,
                        // the ids they listed are left out, and the pass
                        // goes on past the cut only to find which of their
                        // ids we have, for the count.
                        let missing_only = self.answer_missing_ids;
                        let mut response_ids: Vec<u8> = Vec::new();
                        let mut num_response_ids: usize = 0;
                        let mut end_bound = curr_bound;
                        let mut cut = false;

                        self.storage
                            .iterate(lower, upper, &mut |item: Item, index| {
                                if missing_only && (their_elems.remove(&item.id) || cut) {
                                    return Ok(!their_elems.is_empty() || !cut);
                                }
                                if self.exceeded_frame_size_limit(
                                    full_output.len() + response_ids.len(),
                                ) {
                                    end_bound = Bound::from_item(&item);
                                    upper = index; // shrink upper so that remaining range gets correct fingerprint
                                    cut = true;
                                    return Ok(missing_only && !their_elems.is_empty());
                                }

                                response_ids.extend(item.id.iter());
                                num_response_ids += 1;
                                Ok(true)
                            })?;

                        o.extend(self.encode_bound(&end_bound));
                        if missing_only {
                            o.extend(self.encode_mode(Mode::MissingIds));
                            o.extend(encode_var_int(their_elems.len() as u64));
                        } else {
                            o.extend(self.encode_mode(Mode::IdList));
                        }
                        o.extend(encode_var_int(num_response_ids as u64));
                        o.extend(response_ids);

                        full_output.extend(&o);
                        o.clear();
                        emitted_index = upper;
                    }
                }
                Mode::MissingIds => {
                    // quiet-host: the answer to our id list of this range:
                    // the ids we lack, and how many of ours they lack.
                    if !self.is_initiator || self.collect_have_ids {
                        return Err(Error::UnexpectedMode(Mode::MissingIds.as_u64()));
                    }
                    let they_lack: u64 = decode_var_int(&mut query);
                    let num_ids: u64 = decode_var_int(&mut query);
                    if num_ids > (query.len() / ID_SIZE) as u64 {
                        return Err(Error::ParseEndsPrematurely);
                    }

                    #[cfg(feature = "std")]
                    let mut their_elems: HashSet<Id> = HashSet::with_capacity(num_ids as usize);
                    #[cfg(not(feature = "std"))]
                    let mut their_elems: BTreeSet<Id> = BTreeSet::new();
                    for _ in 0..num_ids {
                        let e: [u8; ID_SIZE] = get_byte_array(&mut query)?;
                        their_elems.insert(Id::from_byte_array(e));
                    }
                    // Ids we hold after all (our set grew since our list,
                    // or the peer lists what we have) are not needed.
                    if !their_elems.is_empty() {
                        self.storage.iterate(lower, upper, &mut |item: Item, _| {
                            their_elems.remove(&item.id);
                            Ok(true)
                        })?;
                    }
                    need_ids.extend(their_elems);
                    self.skipped_have_ids = self.skipped_have_ids.saturating_add(they_lack);
                    skip = true;
                }
            }

            if self.exceeded_frame_size_limit(full_output.len() + o.len()) {
                // frameSizeLimit exceeded: Stop range processing and return a fingerprint for the remaining range.
                // The receiver reads that range as starting at the last bound written, so fingerprint from there.
                let remaining_fingerprint =
                    self.storage.fingerprint(emitted_index, storage_size)?;

                full_output.extend(self.encode_bound(&Bound::with_timestamp(MAX_U64)));
                full_output.extend(self.encode_mode(Mode::Fingerprint));
                full_output.extend(remaining_fingerprint.iter());
                break;
            } else {
                if !o.is_empty() {
                    emitted_index = upper;
                }
                full_output.extend(o);
            }

            prev_index = upper;
            prev_bound = curr_bound;
        }

        Ok(full_output)
    }

    fn split_range(
        &mut self,
        lower: usize,
        upper: usize,
        upper_bound: Bound,
    ) -> Result<Vec<u8>, Error> {
        let num_elems: usize = upper - lower;
        let mut o: Vec<u8> = Vec::with_capacity(10 + 10 + num_elems);

        if num_elems < DOUBLE_BUCKETS {
            o.extend(self.encode_bound(&upper_bound));
            o.extend(self.encode_mode(Mode::IdList));

            o.extend(encode_var_int(num_elems as u64));
            self.storage.iterate(lower, upper, &mut |item: Item, _| {
                o.extend(item.id.iter());
                Ok(true)
            })?;
        } else {
            let items_per_bucket: usize = num_elems / BUCKETS;
            let buckets_with_extra: usize = num_elems % BUCKETS;
            let mut curr: usize = lower;

            for i in 0..BUCKETS {
                let bucket_size: usize =
                    items_per_bucket + (if i < buckets_with_extra { 1 } else { 0 });
                let our_fingerprint = self.storage.fingerprint(curr, curr + bucket_size)?;
                curr += bucket_size;

                let next_bound = if curr == upper {
                    upper_bound
                } else {
                    let mut prev_item: Item = Item::with_timestamp(0);
                    let mut curr_item: Item = Item::with_timestamp(0);

                    self.storage
                        .iterate(curr - 1, curr + 1, &mut |item: Item, index| {
                            if index == curr - 1 {
                                prev_item = item;
                            } else {
                                curr_item = item;
                            }

                            Ok(true)
                        })?;

                    self.get_minimal_bound(&prev_item, &curr_item)?
                };

                o.extend(self.encode_bound(&next_bound));
                o.extend(self.encode_mode(Mode::Fingerprint));
                o.extend(our_fingerprint.iter());
            }
        }

        Ok(o)
    }

    #[inline]
    fn exceeded_frame_size_limit(&self, n: usize) -> bool {
        self.frame_size_limit != 0 && n > (self.frame_size_limit as usize) - 200
    }

    // Decoding
    #[inline]
    fn decode_mode(&self, encoded: &mut &[u8]) -> Result<Mode, Error> {
        let mode = decode_var_int(encoded);
        Mode::try_from(mode)
    }

    fn decode_timestamp_in(&mut self, encoded: &mut &[u8]) -> u64 {
        let timestamp: u64 = decode_var_int(encoded);

        let mut timestamp: u64 = if timestamp == 0 {
            MAX_U64
        } else {
            timestamp - 1
        };

        timestamp = timestamp.saturating_add(self.last_timestamp_in);

        self.last_timestamp_in = timestamp;

        timestamp
    }

    fn decode_bound(&mut self, encoded: &mut &[u8]) -> Result<Bound, Error> {
        let timestamp = self.decode_timestamp_in(encoded);
        let len: usize = decode_var_int(encoded) as usize;
        let id: &[u8] = get_bytes(encoded, len)?;
        Bound::with_timestamp_and_id(timestamp, id)
    }

    // Encoding
    #[inline]
    fn encode_mode(&self, mode: Mode) -> Vec<u8> {
        encode_var_int(mode.as_u64())
    }

    fn encode_timestamp_out(&mut self, timestamp: u64) -> Vec<u8> {
        if timestamp == MAX_U64 {
            self.last_timestamp_out = MAX_U64;
            return encode_var_int(0);
        }

        let temp: u64 = timestamp;
        let timestamp: u64 = timestamp.saturating_sub(self.last_timestamp_out);
        self.last_timestamp_out = temp;
        encode_var_int(timestamp.saturating_add(1))
    }

    fn encode_bound(&mut self, bound: &Bound) -> Vec<u8> {
        let mut output: Vec<u8> = Vec::new();

        output.extend(self.encode_timestamp_out(bound.item.timestamp));
        output.extend(encode_var_int(bound.id_len as u64));

        let mut bound_slice = bound.item.id.to_vec();
        bound_slice.resize(bound.id_len, 0);
        output.extend(bound_slice);

        output
    }

    fn get_minimal_bound(&self, prev: &Item, curr: &Item) -> Result<Bound, Error> {
        if curr.timestamp != prev.timestamp {
            Ok(Bound::with_timestamp(curr.timestamp))
        } else {
            let mut shared_prefix_bytes: usize = 0;
            let curr_key = curr.id;
            let prev_key = prev.id;

            for i in 0..ID_SIZE {
                if curr_key[i] != prev_key[i] {
                    break;
                }
                shared_prefix_bytes += 1;
            }
            Ok(Bound::with_timestamp_and_id(
                curr.timestamp,
                &curr_key[..shared_prefix_bytes + 1],
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use self::storage::NegentropyStorageVector;
    use super::*;

    #[test]
    fn test_reconciliation_set() {
        // Client
        let mut storage_client = NegentropyStorageVector::new();
        storage_client
            .insert(
                0,
                Id::from_byte_array([
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                ]),
            )
            .unwrap();
        storage_client
            .insert(
                1,
                Id::from_byte_array([
                    0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb,
                    0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb,
                    0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb,
                ]),
            )
            .unwrap();
        storage_client.seal().unwrap();

        let mut client = Negentropy::new(Storage::Borrowed(&storage_client), 0).unwrap();
        let init_output = client.initiate().unwrap();

        // Relay
        let mut storage_relay = NegentropyStorageVector::new();
        storage_relay
            .insert(
                0,
                Id::from_byte_array([
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                ]),
            )
            .unwrap();
        storage_relay
            .insert(
                2,
                Id::from_byte_array([
                    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
                    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
                    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
                ]),
            )
            .unwrap();
        storage_relay
            .insert(
                3,
                Id::from_byte_array([
                    0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                    0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                    0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                ]),
            )
            .unwrap();
        storage_relay
            .insert(
                5,
                Id::from_byte_array([
                    0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                    0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                    0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                ]),
            )
            .unwrap();
        storage_relay
            .insert(
                10,
                Id::from_byte_array([
                    0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33,
                    0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33,
                    0x33, 0x33, 0x33, 0x33, 0x33, 0x33,
                ]),
            )
            .unwrap();
        storage_relay.seal().unwrap();
        let mut relay = Negentropy::new(Storage::Borrowed(&storage_relay), 0).unwrap();
        let reconcile_output = relay.reconcile(&init_output).unwrap();

        // Client
        let mut have_ids = Vec::new();
        let mut need_ids = Vec::new();
        let reconcile_output_with_ids = client
            .reconcile_with_ids(&reconcile_output, &mut have_ids, &mut need_ids)
            .unwrap();

        // Check reconcile with IDs output
        assert!(reconcile_output_with_ids.is_none());

        // Check have IDs
        assert!(have_ids.contains(&Id::from_byte_array([
            0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb,
            0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb,
            0xbb, 0xbb, 0xbb, 0xbb
        ])));

        // Check need IDs
        #[cfg(feature = "std")]
        need_ids.sort();
        assert_eq!(
            need_ids,
            vec![
                Id::from_byte_array([
                    0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                    0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                    0x11, 0x11, 0x11, 0x11, 0x11, 0x11
                ]),
                Id::from_byte_array([
                    0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                    0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                    0x22, 0x22, 0x22, 0x22, 0x22, 0x22
                ]),
                Id::from_byte_array([
                    0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33,
                    0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33,
                    0x33, 0x33, 0x33, 0x33, 0x33, 0x33
                ]),
                Id::from_byte_array([
                    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
                    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
                    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc
                ]),
            ]
        )
    }

    #[test]
    fn test_id_list_longer_than_message() {
        let mut storage = NegentropyStorageVector::new();
        storage.insert(0, Id::from_byte_array([0xaa; 32])).unwrap();
        storage.seal().unwrap();

        // Version, an infinite upper bound, IdList mode, and a count of 2^34
        // IDs, with none following. Reserving room for them up front asked for
        // over a terabyte, and the failed allocation aborted the process.
        let query = [0x61, 0x00, 0x00, 0x02, 0xc0, 0x80, 0x80, 0x80, 0x00];
        let mut relay = Negentropy::borrowed(&storage, 0).unwrap();
        assert_eq!(relay.reconcile(&query), Err(Error::ParseEndsPrematurely));

        // One ID short.
        let mut query = vec![0x61, 0x00, 0x00, 0x02, 0x02];
        query.extend(&[0xbb; ID_SIZE]);
        assert_eq!(relay.reconcile(&query), Err(Error::ParseEndsPrematurely));
    }

    // Runs a full sync between two frame-limited parties and returns every
    // item the initiator reported as had and as needed, accumulated over all
    // rounds.
    fn run_frame_limited_sync(
        initiator_storage: &NegentropyStorageVector,
        responder_storage: &NegentropyStorageVector,
        initiator_limit: u64,
        responder_limit: u64,
    ) -> (Vec<Id>, Vec<Id>) {
        let mut initiator = Negentropy::borrowed(initiator_storage, initiator_limit).unwrap();
        let mut responder = Negentropy::borrowed(responder_storage, responder_limit).unwrap();

        let mut have_ids: Vec<Id> = Vec::new();
        let mut need_ids: Vec<Id> = Vec::new();
        let mut round_have: Vec<Id> = Vec::new();
        let mut round_need: Vec<Id> = Vec::new();

        let mut msg = initiator.initiate().unwrap();
        let mut round: usize = 0;

        loop {
            round += 1;
            assert!(round < 100, "sync did not terminate");

            let response = responder.reconcile(&msg).unwrap();
            assert!(response.len() <= responder_limit as usize);

            round_have.clear();
            round_need.clear();
            let next = initiator
                .reconcile_with_ids(&response, &mut round_have, &mut round_need)
                .unwrap();
            have_ids.extend_from_slice(&round_have);
            need_ids.extend_from_slice(&round_need);

            match next {
                Some(output) => {
                    assert!(output.len() <= initiator_limit as usize);
                    msg = output;
                }
                None => break,
            }
        }

        (have_ids, need_ids)
    }

    // Checks that have/need hold exactly the true differences between the two
    // sides.
    fn assert_full_coverage(
        have_ids: &[Id],
        need_ids: &[Id],
        initiator_only: &[Id],
        responder_only: &[Id],
    ) {
        for id in have_ids {
            assert!(
                initiator_only.contains(id),
                "item reported as had is not an initiator-only item"
            );
        }
        for id in need_ids {
            assert!(
                responder_only.contains(id),
                "item reported as needed is not a responder-only item"
            );
        }
        for id in initiator_only {
            assert!(have_ids.contains(id), "item never reported as had");
        }
        for id in responder_only {
            assert!(need_ids.contains(id), "item never reported as needed");
        }
    }

    #[test]
    fn test_frame_size_limit_cut_reports_all_differences() {
        // A deterministic case where a frame size cut used to end the sync with
        // items missing: the initiator's frame fills at a range where it holds
        // nothing, so its message ends with a remaining-range fingerprint, and
        // the responder's frame fills while splitting that range, sending the
        // fingerprint of the empty set although it holds items there. The
        // remaining range used to be fingerprinted from the current range's
        // upper index instead of the last bound written to the message, so the
        // items in between were never reported.
        // https://github.com/nostrdevkit/negentropy/issues/15

        // Mirrors the reproduction: ids are a little-endian sequence
        // number followed by zero bytes.
        fn seq_id(seq: u64) -> Id {
            let mut bytes = [0u8; ID_SIZE];
            bytes[..8].copy_from_slice(&seq.to_le_bytes());
            Id::from_byte_array(bytes)
        }

        let mut seq: u64 = 1;
        let mut client_only: Vec<Id> = Vec::new();
        let mut server_only: Vec<Id> = Vec::new();

        let mut storage_client = NegentropyStorageVector::with_capacity(1720);
        let mut storage_server = NegentropyStorageVector::with_capacity(1556);

        // 1500 items shared by both sides.
        for i in 0..1500 {
            let id = seq_id(seq);
            seq += 1;
            storage_client.insert(1000 + i * 10, id).unwrap();
            storage_server.insert(1000 + i * 10, id).unwrap();
        }

        // 15 items only the server holds.
        for i in 0..15 {
            let id = seq_id(seq);
            seq += 1;
            server_only.push(id);
            storage_server.insert(1000 + i * 1000 + 5, id).unwrap();
        }

        // 70 items only the client holds, at timestamps shared between them.
        for b in 0..2 {
            for j in 0..35 {
                let id = seq_id(seq);
                seq += 1;
                client_only.push(id);
                storage_client
                    .insert(1000 + b * 1000 + 201 + j % 8, id)
                    .unwrap();
            }
        }

        // 40 items shared by both sides.
        for j in 0..40 {
            let id = seq_id(seq);
            seq += 1;
            storage_client.insert(15900 + j * 2, id).unwrap();
            storage_server.insert(15900 + j * 2, id).unwrap();
        }

        // One more item only the server holds.
        let id = seq_id(seq);
        seq += 1;
        server_only.push(id);
        storage_server.insert(15999, id).unwrap();

        // 110 items only the client holds, above everything the server holds.
        for i in 0..110 {
            let id = seq_id(seq);
            seq += 1;
            client_only.push(id);
            storage_client.insert(50000 + i * 10, id).unwrap();
        }

        storage_client.seal().unwrap();
        storage_server.seal().unwrap();

        // The initiator cuts frames at 4096 bytes and the responder at 4767,
        // as in the reproduction.
        let (have_ids, need_ids) =
            run_frame_limited_sync(&storage_client, &storage_server, 4096, 4767);
        assert_full_coverage(&have_ids, &need_ids, &client_only, &server_only);

        // The same case with the responder holding the newest items: each
        // side's fix covers only the cuts it makes itself, so this direction
        // must be complete too.
        let (have_ids, need_ids) =
            run_frame_limited_sync(&storage_server, &storage_client, 4096, 4767);
        assert_full_coverage(&have_ids, &need_ids, &server_only, &client_only);
    }

    // quiet-host: a whole sync, upstream's or (with `missing_ids`) one whose
    // initiator skips the ids only it has and whose responder answers id
    // lists with the missing ids only. Returns what the initiator has and
    // needs, its count of ids only it has, and the bytes both sides sent.
    fn run_sync(
        initiator_storage: &NegentropyStorageVector,
        responder_storage: &NegentropyStorageVector,
        limit: u64,
        missing_ids: bool,
    ) -> (Vec<Id>, Vec<Id>, u64, usize) {
        let mut initiator = Negentropy::borrowed(initiator_storage, limit).unwrap();
        let mut responder = Negentropy::borrowed(responder_storage, limit).unwrap();
        if missing_ids {
            initiator.skip_have_ids();
            responder.answer_id_lists_with_missing_ids();
        }
        let (mut have_ids, mut need_ids) = (Vec::new(), Vec::new());
        let mut msg = initiator.initiate().unwrap();
        let mut bytes = msg.len();
        for _ in 0..10_000 {
            let response = responder.reconcile(&msg).unwrap();
            assert!(limit == 0 || response.len() <= limit as usize);
            bytes += response.len();
            match initiator
                .reconcile_with_ids(&response, &mut have_ids, &mut need_ids)
                .unwrap()
            {
                Some(next) => {
                    bytes += next.len();
                    msg = next;
                }
                None => {
                    assert!(
                        !missing_ids || have_ids.is_empty(),
                        "ids only the initiator has are listed"
                    );
                    return (have_ids, need_ids, initiator.skipped_have_ids(), bytes);
                }
            }
        }
        panic!("sync did not terminate");
    }

    // quiet-host: two sets of `shared` items with a few scattered extra on
    // each side (timestamps repeat, as they do for events made in a burst).
    fn scattered_sets(
        shared: u64,
        initiator_extra: u64,
        responder_extra: u64,
    ) -> (
        NegentropyStorageVector,
        NegentropyStorageVector,
        Vec<Id>,
        Vec<Id>,
    ) {
        fn id(n: u64) -> Id {
            let mut bytes = [0u8; ID_SIZE];
            bytes[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
            bytes[8..16].copy_from_slice(&n.to_le_bytes());
            Id::from_byte_array(bytes)
        }
        let (mut a, mut b) = (
            NegentropyStorageVector::new(),
            NegentropyStorageVector::new(),
        );
        for n in 0..shared {
            a.insert(n / 7, id(n)).unwrap();
            b.insert(n / 7, id(n)).unwrap();
        }
        let step = |extra: u64| shared / extra.max(1);
        let mut a_only = Vec::new();
        for i in 0..initiator_extra {
            let n = shared + i;
            a.insert(i * step(initiator_extra) / 7, id(n)).unwrap();
            a_only.push(id(n));
        }
        let mut b_only = Vec::new();
        for i in 0..responder_extra {
            let n = 2 * shared + i;
            b.insert((i * step(responder_extra) + 3) / 7, id(n))
                .unwrap();
            b_only.push(id(n));
        }
        a.seal().unwrap();
        b.seal().unwrap();
        (a, b, a_only, b_only)
    }

    fn sorted(mut ids: Vec<Id>) -> Vec<Id> {
        ids.sort();
        ids
    }

    #[test]
    fn quiet_missing_ids_answers_find_the_same_needs_in_fewer_bytes() {
        // Goal 4's case, 1,000 scattered differences in a million: the
        // initiator lists ranges of about 15 ids, so every differing range
        // ends in its id list and the answer to it.
        let (a, b, _, b_only) = scattered_sets(1_000_000, 0, 1_000);
        let (_, need, skipped, bytes) = run_sync(&a, &b, 0, true);
        assert_eq!(sorted(need), sorted(b_only.clone()));
        assert_eq!(
            skipped, 0,
            "the initiator holds nothing the responder lacks"
        );

        // Upstream's answers, for the bytes.
        let (have, need_upstream, _, upstream_bytes) = run_sync(&a, &b, 0, false);
        assert!(have.is_empty());
        assert_eq!(sorted(need_upstream), sorted(b_only));
        assert!(
            bytes * 10 < upstream_bytes * 7,
            "{} bytes against upstream's {}",
            bytes,
            upstream_bytes
        );
    }

    #[test]
    fn quiet_missing_ids_answers_count_the_ids_only_the_initiator_has() {
        let (a, b, a_only, b_only) = scattered_sets(50_000, 40, 30);
        let (_, need, skipped, _) = run_sync(&a, &b, 0, true);
        assert_eq!(sorted(need), sorted(b_only));
        assert!(
            skipped > 0 && skipped <= a_only.len() as u64 * 2,
            "{}",
            skipped
        );

        // And with both sides' frames cut short, over and over.
        let (a, b, _, b_only) = scattered_sets(20_000, 500, 3_000);
        let (_, need, skipped, _) = run_sync(&a, &b, 4096, true);
        assert_eq!(sorted(need), sorted(b_only));
        assert!(skipped > 0);

        // An empty initiator: the responder's whole set, in cut frames.
        let empty = {
            let mut s = NegentropyStorageVector::new();
            s.seal().unwrap();
            s
        };
        let (_, need, skipped, _) = run_sync(&empty, &b, 4096, true);
        assert_eq!(need.len(), b.size().unwrap());
        assert_eq!(skipped, 0);
    }

    #[test]
    fn quiet_missing_ids_are_only_read_by_an_initiator_that_skips_have_ids() {
        let mut storage = NegentropyStorageVector::new();
        storage.insert(0, Id::from_byte_array([0xaa; 32])).unwrap();
        storage.seal().unwrap();
        // Version, an infinite upper bound, MissingIds mode, none lacking
        // and one id.
        let mut answer = vec![0x61, 0x00, 0x00, 0x03, 0x00, 0x01];
        answer.extend(&[0xbb; ID_SIZE]);

        let mut responder = Negentropy::borrowed(&storage, 0).unwrap();
        assert_eq!(responder.reconcile(&answer), Err(Error::UnexpectedMode(3)));

        let (mut have, mut need) = (Vec::new(), Vec::new());
        let mut lister = Negentropy::borrowed(&storage, 0).unwrap();
        lister.set_initiator();
        assert_eq!(
            lister.reconcile_with_ids(&answer, &mut have, &mut need),
            Err(Error::UnexpectedMode(3))
        );

        let mut skipper = Negentropy::borrowed(&storage, 0).unwrap();
        skipper.set_initiator();
        skipper.skip_have_ids();
        assert_eq!(
            skipper.reconcile_with_ids(&answer, &mut have, &mut need),
            Ok(None)
        );
        assert_eq!(need, vec![Id::from_byte_array([0xbb; 32])]);

        // A count of ids beyond the message's end.
        let short = [0x61, 0x00, 0x00, 0x03, 0x00, 0x02, 0xbb];
        assert_eq!(
            skipper.reconcile_with_ids(&short, &mut have, &mut need),
            Err(Error::ParseEndsPrematurely)
        );
    }
}

#[cfg(bench)]
mod benches {
    use test::{black_box, Bencher};

    use super::storage::NegentropyStorageVector;
    use super::Id;

    #[bench]
    pub fn insert(bh: &mut Bencher) {
        let mut storage_client = NegentropyStorageVector::new();
        bh.iter(|| {
            black_box(storage_client.insert(
                0,
                Id::from_byte_array([
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                ]),
            ))
            .unwrap();
        });
    }
}
