//! What both directions of the network share: our identity, the transit
//! secrets of our live requests, the network keys and the counters; and
//! the limits on a frame's size.

use std::sync::Arc;

use crate::{
    crypto::{identity::HostIdentity, transit::LiveRequests},
    storage::{counters::Counters, networks::NetworkKeys},
};

/// The largest frame accepted or sent.
pub const MAX_FRAME: usize = 8 << 20;
/// The largest request frame accepted.
pub const MAX_REQUEST_FRAME: usize = 1 << 20;
/// Default life of a transit secret.
pub const DEFAULT_TRANSIT_TTL_MS: i64 = 30_000;

/// What both directions share: our identity, the transit secrets of our
/// live requests, the network keys, and the drop counters.
#[derive(Clone)]
pub struct Wire {
    /// This host's key pair.
    pub identity: Arc<HostIdentity>,
    /// Requests of ours that may be answered.
    pub live: Arc<LiveRequests>,
    /// Keys of the networks we are in.
    pub keys: Arc<NetworkKeys>,
    /// Where drops are counted.
    pub counters: Arc<Counters>,
}
