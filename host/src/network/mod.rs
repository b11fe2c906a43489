//! The network: frames over TCP, and the two paths between a socket and the
//! engine.
//!
//! **In** (socket → envelope): a reader thread per connection reads
//! length-prefixed frames (at most [`MAX_FRAME`](wire::MAX_FRAME) bytes; a
//! larger length closes the connection) and opens each with
//! [`Inbound::open`](inbound::Inbound::open): transit crypto unwraps a
//! response with the transit secret of a live request of ours, event crypto
//! opens the sealed box with our key and verifies the sender and its
//! membership proof (and, for a response, opens and checks the signed
//! events in it for the event store, while the engine stores the frame
//! before), and the decoded map becomes an envelope that names the
//! verified sender (`sender_peer_id`) and network (`network_id`), so that
//! payloads need not repeat them. Anything that fails is dropped and
//! counted; nothing from the network reaches a plugin before it has been
//! authenticated this far. The reader then queues the envelope for the
//! engine thread without blocking; when the queue is full it is dropped and
//! counted, so a flood cannot grow memory. Opening on the reader keeps the
//! crypto off the engine thread, which owns the database: during a catch-up
//! the two run on separate cores.
//!
//! **Out** (envelope → socket): [`NetworkOutbox`](outbound::NetworkOutbox)
//! seals `event_plaintext` to `seal_to`, wraps it (a request registers its
//! transit secret; a response is encrypted under the requester's), and
//! hands the frame for `dest_ip:dest_port` to a
//! [`Transport`](outbound::Transport): [`Tcp`](tcp::Tcp), where a sender
//! thread writes it, or the network simulator's.
//!
//! Why TCP, not UDP as the seed assumes: catch-up moves megabytes, and TCP
//! brings flow and congestion control for free. The protocol does not rely
//! on TCP's guarantees: every frame stands alone and is idempotent, so lost,
//! duplicated or reordered frames (a dropped connection, a retry) only cost
//! a later sync round.
//!
//! The modules, in the order a frame from a peer meets them: [`listener`]
//! (sockets, connection slots, the budget of opens for strangers, the
//! budget of bytes of frames being read),
//! [`inbound`] (frame → authenticated envelope), then the engine's inbox;
//! and on the way out [`outbound`] (envelope → sealed frame, sent once its
//! transaction commits) and [`tcp`] (a sender thread per destination).
//! [`wire`] holds what both directions share, and [`sender_rates`] what one
//! sender may cost.
//!
//! The layer above the engine: it may use every layer below and plugs into
//! the engine's ports (its inbox, and [`crate::engine::pipeline::Outbox`]).

pub mod inbound;
pub mod listener;
pub mod outbound;
pub mod sender_rates;
pub mod tcp;
pub mod wire;
