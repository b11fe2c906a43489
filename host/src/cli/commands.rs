//! The CLI's commands that change or read a host's data folder directly:
//! networks, events and messages. They work whether or not the host is running
//! (SQLite in WAL mode, `BEGIN IMMEDIATE`, busy timeout). Work that needs
//! the plugins, such as projecting a new message, is queued in
//! `submissions` for the host, which picks it up within a fraction of a
//! second (or at its next start).

use std::{io::Read, path::Path, sync::Arc};

use quiet_plugin_api::{abi_stable::std_types::RVec, Field, Value};
use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value as Json;

use crate::{
    crypto::{
        entropy::BatchWeights,
        event_crypto::{self, NetworkKey},
        identity::{HostIdentity, IdentityError, VerifyingKeys},
        signed_event::{self, EventId, Unverified},
    },
    encoding::{codec, event_type, json},
    storage::{
        db,
        event_store::{self, EventStore},
        members,
        networks::{self, Invite, NetworkKeys},
    },
};

/// The most bytes read for one text from a file or standard input: more
/// than any event holds, so that an over-long message meets the event
/// limit's own error, while a wrong file (an image, a log) is refused
/// before it fills memory.
const MAX_INPUT_BYTES: u64 = 1 << 20;

/// A text the command line names: given as the argument, read from
/// standard input when the argument is `-`, or read from `file`. Texts read
/// lose one trailing line break, as `echo` and editors add one. Secrets
/// such as invites, and long texts, need not appear in `ps` or the shell's
/// history this way.
pub fn read_input(arg: Option<&str>, file: Option<&Path>, what: &str) -> Result<String, String> {
    let (source, reader): (String, Box<dyn Read>) = match (arg, file) {
        (Some(_), Some(_)) => {
            return Err(format!("give {what} once: as an argument or with --file"))
        }
        (Some("-"), None) => ("standard input".into(), Box::new(std::io::stdin())),
        (Some(text), None) => return Ok(text.to_owned()),
        (None, Some(path)) => (
            path.display().to_string(),
            Box::new(
                std::fs::File::open(path)
                    .map_err(|e| format!("{what}: {}: {e}", path.display()))?,
            ),
        ),
        (None, None) => {
            return Err(format!(
                "give {what} as an argument, `-` to read it from standard input, or --file PATH"
            ))
        }
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what}: reading {source}: {e}"))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(format!(
            "{what} from {source} is over {} MiB",
            MAX_INPUT_BYTES >> 20
        ));
    }
    let mut text =
        String::from_utf8(bytes).map_err(|_| format!("{what} from {source} is not UTF-8 text"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// Opens the data folder for a command that writes, creating it (private)
/// if needed; refuses one whose network keys others can read.
fn open(data_dir: &Path) -> Result<Connection, String> {
    db::create_private_dir(data_dir)
        .map_err(|e| format!("data folder {}: {e}", data_dir.display()))?;
    NetworkKeys::new(data_dir).check_private()?;
    db::open(data_dir).map_err(|e| format!("{}: {e}", data_dir.join(db::DB_FILE).display()))
}

/// Opens the database for a command that only reads: it creates nothing,
/// and `None` is a folder no host has used yet.
fn open_to_read(data_dir: &Path) -> Result<Option<Connection>, String> {
    if !data_dir.is_dir() {
        return Err(format!(
            "data folder {} does not exist (pass --data, or set QUIET_DATA)",
            data_dir.display()
        ));
    }
    if !data_dir.join(db::DB_FILE).exists() {
        return Ok(None);
    }
    db::open_read_only(data_dir)
        .map(Some)
        .map_err(|e| format!("{}: {e}", data_dir.join(db::DB_FILE).display()))
}

/// This data folder's identity: made on first use, but never in a folder
/// that already holds networks, where a new one would be a stranger.
pub fn identity_of(data_dir: &Path) -> Result<HostIdentity, IdentityError> {
    match NetworkKeys::new(data_dir).any() {
        true => HostIdentity::load(data_dir),
        false => HostIdentity::load_or_create(data_dir),
    }
}

fn identity(data_dir: &Path) -> Result<HostIdentity, String> {
    identity_of(data_dir).map_err(|e| e.to_string())
}

fn require_member(conn: &Connection, network_id: &str) -> Result<(), String> {
    if networks::is_member(conn, network_id).map_err(|e| e.to_string())? {
        return Ok(());
    }
    let known: Vec<String> = conn
        .prepare("SELECT network_id FROM networks ORDER BY network_id")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| e.to_string())?;
    Err(format!(
        "not a member of network '{network_id}' (networks here: {}); see `quiet-host network --help`",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    ))
}

/// The key of a network `require_member` found this host in.
fn network_key(data_dir: &Path, network_id: &str) -> Result<NetworkKey, String> {
    NetworkKeys::new(data_dir).get(network_id).ok_or_else(|| {
        format!(
            "the key of network {network_id} is missing from {}",
            data_dir.join("keys").display()
        )
    })
}

/// `network create`: returns the invite line.
pub fn network_create(data_dir: &Path, address: Option<&str>) -> Result<String, String> {
    let conn = open(data_dir)?;
    let me = identity(data_dir)?;
    let address = listen_address(&conn, address)?;
    let invite = networks::create(data_dir, &conn, &me.peer_id(), &address)?;
    let store = EventStore::new(Arc::new(NetworkKeys::new(data_dir)), Arc::default())
        .signing_as(Arc::new(me));
    // A genesis not written now is written when the host starts: the
    // network exists either way, so its invite is printed.
    let (_, failed) = members::ensure_geneses(&conn, &store);
    for why in failed {
        eprintln!(
            "warning: membership genesis not written yet: {why}; the host writes it when it starts"
        );
    }
    Ok(invite.encode())
}

/// `network invite`: an invite to an existing network, naming this host.
pub fn network_invite(
    data_dir: &Path,
    network_id: &str,
    address: Option<&str>,
) -> Result<String, String> {
    let conn = open(data_dir)?;
    require_member(&conn, network_id)?;
    let me = identity(data_dir)?;
    let key = network_key(data_dir, network_id)?;
    let address = listen_address(&conn, address)?;
    networks::parse_address(&address)?;
    Ok(Invite {
        network_id: network_id.to_owned(),
        key: key.0,
        peer_id: me.peer_id(),
        address,
    }
    .encode())
}

fn listen_address(conn: &Connection, given: Option<&str>) -> Result<String, String> {
    match given {
        Some(a) => Ok(a.to_owned()),
        None => db::host_state(conn, "listen_addr")
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                "this host has never listened, so the invite has no address: \
             pass --address IP:PORT, or run the host with --listen first"
                    .into()
            }),
    }
}

/// `network join`: returns a one-line summary.
pub fn network_join(data_dir: &Path, invite: &str) -> Result<String, String> {
    let invite = Invite::decode(invite)?;
    let conn = open(data_dir)?;
    let me = identity(data_dir)?;
    networks::join(data_dir, &conn, &invite, &me.peer_id())?;
    Ok(format!(
        "joined network {} through peer {} at {}",
        invite.network_id,
        &invite.peer_id[..16],
        invite.address
    ))
}

/// `network members`: what this host knows of a network's members.
pub fn network_members(data_dir: &Path, network_id: &str) -> Result<members::Roster, String> {
    let Some(conn) = open_to_read(data_dir)? else {
        return Err(format!(
            "{}: no quiet-host database here, so no networks",
            data_dir.display()
        ));
    };
    require_member(&conn, network_id)?;
    members::roster(&conn, network_id).map_err(|e| e.to_string())
}

/// `network members` for a reader: one line a member, and a last line on
/// what the list rests on.
pub fn roster_text(roster: &members::Roster) -> String {
    let mut out = String::new();
    for m in &roster.members {
        out.push_str(&format!("{}  {}\n", m.peer_id, m.role));
    }
    let current = roster
        .members
        .iter()
        .filter(|m| m.role != "removed")
        .count();
    out.push_str(&match roster.known {
        true => format!(
            "{current} member{}, from {} membership events ({} without effect)\n",
            if current == 1 { "" } else { "s" },
            roster.events,
            roster.invalid
        ),
        false => "membership not yet known: this host does not hold the network's genesis yet \
                  (it comes with sync), or cannot tell it (a network made before membership, \
                  joined through another than its creator); until then, whoever holds the \
                  network key is a member\n"
            .to_string(),
    });
    out
}

/// One network, as `network list` shows it.
#[derive(Debug, Serialize)]
pub struct NetworkSummary {
    /// The network id.
    pub network_id: String,
    /// Known peers.
    pub peers: i64,
    /// Events stored.
    pub events: i64,
}

/// `network list`.
pub fn network_list(data_dir: &Path) -> Result<Vec<NetworkSummary>, String> {
    let Some(conn) = open_to_read(data_dir)? else {
        return Ok(Vec::new());
    };
    conn.prepare(
        "SELECT n.network_id,
                (SELECT COUNT(*) FROM addresses a WHERE a.network_id = n.network_id),
                (SELECT COUNT(*) FROM events e WHERE e.network_id = n.network_id)
         FROM networks n ORDER BY n.network_id",
    )
    .and_then(|mut s| {
        s.query_map([], |r| {
            Ok(NetworkSummary {
                network_id: r.get(0)?,
                peers: r.get(1)?,
                events: r.get(2)?,
            })
        })?
        .collect()
    })
    .map_err(|e| e.to_string())
}

/// `plugins replay NAME`: asks the host to rebuild plugin `name`'s
/// projection from the stored events (see `engine::replay`). Returns what
/// will happen, for the operator.
pub fn plugins_replay(data_dir: &Path, name: &str) -> Result<String, String> {
    let conn = open(data_dir)?;
    let known: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM plugins WHERE name = ?1)
                 OR EXISTS (SELECT 1 FROM plugin_cursors WHERE plugin = ?1)",
            [name],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    if !known {
        return Err(format!(
            "no plugin named {name:?} has been loaded in {}: `quiet-host status` lists the plugins",
            data_dir.display()
        ));
    }
    conn.execute(
        "INSERT OR REPLACE INTO replay_requests (plugin, requested_ms) VALUES (?1, ?2)",
        rusqlite::params![name, db::now_ms()],
    )
    .map_err(|e| e.to_string())?;
    Ok(format!(
        "asked: plugin '{name}' will be reset and offered every stored event again once the host runs with it loaded; `quiet-host status` shows the progress"
    ))
}

/// `message send`: the friendly form of `event send NETWORK message
/// {"text": TEXT}`. Returns the event id (hex).
pub fn message_send(data_dir: &Path, network_id: &str, text: &str) -> Result<String, String> {
    let ids = message_send_many(data_dir, network_id, &[text])?;
    Ok(ids.into_iter().next().expect("one message, one id"))
}

/// Sends many messages in one transaction (for tests and benchmarks);
/// returns their event ids (hex), in order.
pub fn message_send_many(
    data_dir: &Path,
    network_id: &str,
    texts: &[&str],
) -> Result<Vec<String>, String> {
    let contents = texts
        .iter()
        .map(|text| Value::map([("text", Value::from(*text))]));
    queue_events(data_dir, network_id, "message", &[], contents)
}

/// `event send`: an event of `event_type` whose content is the JSON object
/// `content` (read by [`json::json_to_value`]), depending on the events
/// `deps` names (hex ids, as `event list` prints them). What is wrong with
/// the input is refused in one line before the data folder is touched;
/// what no host would store (a reserved key, too many deps, over 64 KiB)
/// by the event store, before anything is queued. Returns the id (hex).
pub fn event_send(
    data_dir: &Path,
    network_id: &str,
    event_type: &str,
    content: &str,
    deps: &[String],
) -> Result<String, String> {
    check_type(event_type)?;
    event_type::check_not_hosts(event_type)?;
    let deps = deps
        .iter()
        .map(|d| {
            hex::decode(d)
                .ok()
                .and_then(|b| EventId::try_from(b).ok())
                .ok_or_else(|| {
                    format!("--dep {d:?} is not an event id (64 hex characters, as `event list` prints them)")
                })
        })
        .collect::<Result<Vec<EventId>, String>>()?;
    let json: Json =
        serde_json::from_str(content).map_err(|e| format!("the event content is not JSON: {e}"))?;
    let content = json::json_to_value(&json).map_err(|e| format!("the event content: {e}"))?;
    if !matches!(content, Value::Map(_)) {
        return Err(format!(
            "the event content must be a JSON object, such as {{\"text\": \"hi\"}}, not {}",
            kind_of(&json)
        ));
    }
    let ids = queue_events(data_dir, network_id, event_type, &deps, [content])?;
    Ok(ids.into_iter().next().expect("one event, one id"))
}

/// Refuses a type no event may have, quoting it escaped: it may come from
/// anywhere, and the error must stay one line.
fn check_type(event_type: &str) -> Result<(), String> {
    match event_type::is_valid(event_type) {
        true => Ok(()),
        false => Err(format!(
            "{event_type:?} is not an event type: 1 to {} of A-Z a-z 0-9 _ . : -",
            event_type::MAX_LEN
        )),
    }
}

/// What `j` is, for an error that says what was given instead.
fn kind_of(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "bytes ({\"$bytes\": …})",
    }
}

/// The one home of queueing: signs each of `contents` as an event of
/// `event_type` by this data folder's identity, depending on `deps`, and
/// queues them all in `submissions` in one transaction, for the host to
/// store and sync. One refused (by [`EventStore::new_local_event`]'s
/// rules) queues none. Returns their ids (hex), in order.
fn queue_events(
    data_dir: &Path,
    network_id: &str,
    event_type: &str,
    deps: &[EventId],
    contents: impl IntoIterator<Item = Value>,
) -> Result<Vec<String>, String> {
    let conn = open(data_dir)?;
    require_member(&conn, network_id)?;
    let me = identity(data_dir)?;
    let store = EventStore::new(Arc::new(NetworkKeys::new(data_dir)), Arc::default());
    let contents: Vec<Vec<u8>> = contents.into_iter().map(|c| codec::encode(&c)).collect();
    // All checked before any is queued: one refused queues none.
    for content in &contents {
        store.check_local_event(network_id, event_type, content, deps)?;
    }
    let mut ids = Vec::with_capacity(contents.len());
    let commit = |sealed: &[Signed]| {
        db::with_write_tx(&conn, |c| {
            let mut insert = c.prepare_cached(
                "INSERT INTO submissions(envelope, submitted_ms) VALUES (?1, ?2)",
            )?;
            for (_, envelope) in sealed {
                insert.execute(rusqlite::params![
                    codec::encode_envelope(envelope),
                    db::now_ms()
                ])?;
            }
            Ok(())
        })
        .map_err(|e: rusqlite::Error| e.to_string())
    };
    let sign = |chunk: &[Vec<u8>]| {
        chunk
            .iter()
            .map(|content| {
                let (id, mut envelope) =
                    store.seal_checked(me.signing(), network_id, event_type, content, deps)?;
                // The local MAC spares the host checking our own signature.
                let event = envelope.bytes(quiet_plugin_api::field::EVENT_CIPHERTEXT);
                let mac = me.local_mac(event.expect("just sealed"));
                envelope.set(event_store::LOCAL_MAC, mac);
                Ok((id, envelope))
            })
            .collect::<Result<Vec<Signed>, String>>()
    };
    sign_and_commit(&contents, sign, |signed| {
        commit(signed)?;
        ids.extend(signed.iter().map(|(id, _)| hex::encode(id)));
        Ok(())
    })?;
    Ok(ids)
}

/// An event signed and sealed for `submissions`, with its id.
type Signed = (EventId, quiet_plugin_api::Envelope);

/// Events one signer takes at a time.
const SIGN_CHUNK: usize = 256;

/// Signed chunks committed in one transaction at most.
const COMMIT_CHUNKS: usize = 4;

/// Signs `contents` (checked already) a chunk at a time on two threads and
/// hands the signed chunks, in order, to `commit` on this one. Signing is
/// most of what sending costs, so it never waits for SQLite: the signers run
/// ahead of the commits (by the channel's few chunks, unless one signer
/// falls behind the other), and a commit takes every
/// chunk that is ready in order, so that a commit kept waiting by the
/// host's transaction is followed by a larger one. The first error stops
/// both.
fn sign_and_commit<T: Send>(
    contents: &[Vec<u8>],
    sign: impl Fn(&[Vec<u8>]) -> Result<Vec<T>, String> + Sync,
    mut commit: impl FnMut(&[T]) -> Result<(), String>,
) -> Result<(), String> {
    const SIGNERS: usize = 2;
    let chunks: Vec<&[Vec<u8>]> = contents.chunks(SIGN_CHUNK).collect();
    if chunks.len() <= 1 {
        return match chunks.first() {
            Some(chunk) => commit(&sign(chunk)?),
            None => Ok(()),
        };
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(SIGNERS * COMMIT_CHUNKS);
        for _ in 0..SIGNERS {
            let (tx, next, chunks, sign) = (tx.clone(), &next, &chunks, &sign);
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(chunk) = chunks.get(i) else { break };
                // An error ends the receiver, which stops the other signer.
                if tx.send((i, sign(chunk))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut ready = std::collections::BTreeMap::new();
        let mut committed = 0;
        while committed < chunks.len() {
            if !ready.contains_key(&committed) {
                let (i, signed) = rx.recv().map_err(|_| "signing failed".to_string())?;
                ready.insert(i, signed?);
            }
            // Everything already signed, too, without waiting for it.
            while let Ok((i, signed)) = rx.try_recv() {
                ready.insert(i, signed?);
            }
            let mut batch = Vec::new();
            while batch.len() < COMMIT_CHUNKS * SIGN_CHUNK {
                let Some(chunk) = ready.remove(&committed) else {
                    break;
                };
                batch.extend(chunk);
                committed += 1;
            }
            if !batch.is_empty() {
                commit(&batch)?;
            }
        }
        Ok(())
    })
}

/// One message, as `message list` shows it.
#[derive(Debug, Serialize)]
pub struct Message {
    /// The event id (hex).
    pub event_id: String,
    /// The author's peer id.
    pub author: String,
    /// The text.
    pub text: String,
    /// When the author created it.
    pub created_ms: i64,
    /// Whether `author` is the verified signer. `false` for messages
    /// received before events were signed, whose author is only claimed.
    pub verified: bool,
    /// The reactions to it, by emoji (with the reactions plugin).
    pub reactions: Vec<Reaction>,
}

/// `message list`: the projected messages of a network, oldest first.
pub fn message_list(data_dir: &Path, network_id: &str) -> Result<Vec<Message>, String> {
    let Some(conn) = open_to_read(data_dir)? else {
        return Err(format!(
            "{}: no quiet-host database here, so no networks and no messages",
            data_dir.display()
        ));
    };
    require_member(&conn, network_id)?;
    let query = |verified: &str| {
        conn.prepare(&format!(
            "SELECT event_id, author, text, created_ms, {verified} FROM messages
             WHERE network_id = ? ORDER BY created_ms, event_id"
        ))
    };
    // A projection the messages plugin has not migrated yet (the host has
    // not run since the upgrade) holds only unverified messages.
    let mut stmt = query("verified")
        .or_else(|e| match e.to_string().contains("no such column") {
            true => query("0"),
            false => Err(e),
        })
        .map_err(|e| {
            if e.to_string().contains("no such table") {
                "no messages table: install the messages plugin and run the host once".to_string()
            } else {
                e.to_string()
            }
        })?;
    let mut reactions = reactions_of(&conn, network_id).map_err(|e| e.to_string())?;
    stmt.query_map([network_id], |r| {
        let id: Vec<u8> = r.get(0)?;
        Ok(Message {
            reactions: reactions.remove(&id).unwrap_or_default(),
            event_id: hex::encode(id),
            author: r.get(1)?,
            text: r.get(2)?,
            created_ms: r.get(3)?,
            verified: r.get(4)?,
        })
    })
    .and_then(|rows| rows.collect())
    .map_err(|e| e.to_string())
}

/// One emoji on a message, as `message list` shows it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Reaction {
    /// The emoji.
    pub emoji: String,
    /// How many authors reacted with it.
    pub count: usize,
    /// Their peer ids, in the order they reacted.
    pub authors: Vec<String>,
}

/// The reactions the reactions plugin projected in `network_id`, by
/// message id; none if the plugin was never installed.
fn reactions_of(
    conn: &Connection,
    network_id: &str,
) -> rusqlite::Result<std::collections::HashMap<Vec<u8>, Vec<Reaction>>> {
    let mut by_message: std::collections::HashMap<Vec<u8>, Vec<Reaction>> = Default::default();
    let mut stmt = match conn.prepare(
        "SELECT message_id, emoji, author FROM reactions WHERE network_id = ?1
         ORDER BY message_id, emoji, created_ms, author",
    ) {
        Ok(stmt) => stmt,
        Err(e) if e.to_string().contains("no such table") => return Ok(by_message),
        Err(e) => return Err(e),
    };
    let rows = stmt.query_map([network_id], |r| {
        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get(2)?))
    })?;
    for row in rows {
        let (message, emoji, author) = row?;
        let of_message = by_message.entry(message).or_default();
        match of_message.last_mut() {
            Some(last) if last.emoji == emoji => {
                last.count += 1;
                last.authors.push(author);
            }
            _ => of_message.push(Reaction {
                emoji,
                count: 1,
                authors: vec![author],
            }),
        }
    }
    Ok(by_message)
}

/// One stored event, as `event list` shows it.
#[derive(Debug, Serialize)]
pub struct ListedEvent {
    /// The event id (hex).
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// The peer id of the key that signed it; `None` for a legacy event,
    /// whose author is only claimed, and for one that did not open.
    pub author: Option<String>,
    /// For a legacy event, the author its sender wrote, not verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_author: Option<String>,
    /// Whether it was stored before events were signed (`legacy_events`).
    pub legacy: bool,
    /// When its author created it, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The ids (hex) of the events it depends on.
    pub deps: Vec<String>,
    /// Its content, as JSON (`null` if it did not open).
    pub content: Json,
    /// Why the stored row did not open or verify: the other fields are then
    /// the row's own, unchecked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A row of `events` or `legacy_events`.
struct StoredRow {
    id: Vec<u8>,
    created_ms: i64,
    event_type: String,
    event: Vec<u8>,
    legacy: bool,
}

/// Signatures checked in one batch by `event list`: a batch costs about a
/// fifth of single checks, and this bounds what is held for it.
const LIST_VERIFY_BATCH: usize = 1024;

/// `event list`: the stored events of a network (of `event_type` only, if
/// given; the newest `limit` only, if given), oldest first, each opened and its signature checked again: the
/// store verified it, but a row is only what the file holds now. One that
/// fails comes back with [`ListedEvent::error`] set, not as an error of
/// the whole command. Events stored before signatures are included, marked
/// [`ListedEvent::legacy`], with the author they claim apart.
pub fn event_list(
    data_dir: &Path,
    network_id: &str,
    event_type: Option<&str>,
    limit: Option<u32>,
) -> Result<Vec<ListedEvent>, String> {
    if let Some(t) = event_type {
        check_type(t)?;
    }
    let Some(conn) = open_to_read(data_dir)? else {
        return Err(format!(
            "{}: no quiet-host database here, so no networks and no events",
            data_dir.display()
        ));
    };
    require_member(&conn, network_id)?;
    let key = network_key(data_dir, network_id)?;
    let rows = stored_rows(&conn, network_id, event_type, limit).map_err(|e| e.to_string())?;
    let authors = VerifyingKeys::default();
    let mut listed = Vec::with_capacity(rows.len());
    // Signed events that opened, with where they go, await a batch check;
    // until then their place holds an error, so none is shown unchecked.
    let mut opened: Vec<(usize, Unverified)> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if row.legacy {
            listed.push(open_legacy(&key, row).unwrap_or_else(|e| failed(row, e)));
            continue;
        }
        listed.push(failed(row, "not verified".into()));
        match signed_event::open_event_v3(network_id, &key, &row.event, &authors) {
            Ok(u) if u.id()[..] == row.id[..] => opened.push((i, u)),
            Ok(_) => listed[i] = failed(row, "its id is not the hash of its signed body".into()),
            Err(e) => listed[i] = failed(row, e.to_string()),
        }
        if opened.len() == LIST_VERIFY_BATCH {
            verify_into(&mut listed, &rows, std::mem::take(&mut opened));
        }
    }
    verify_into(&mut listed, &rows, opened);
    Ok(listed)
}

/// Checks the signatures of `opened` in one batch and puts each event, or
/// why it failed, in its place in `listed`.
fn verify_into(listed: &mut [ListedEvent], rows: &[StoredRow], opened: Vec<(usize, Unverified)>) {
    let (at, events): (Vec<usize>, Vec<Unverified>) = opened.into_iter().unzip();
    for (i, verified) in at
        .into_iter()
        .zip(signed_event::verify_batch(events, BatchWeights::new()))
    {
        let row = &rows[i];
        listed[i] = match verified {
            Ok(e) if e.event_type != row.event_type => failed(
                row,
                format!(
                    "stored as type {:?}, signed as {:?}",
                    row.event_type, e.event_type
                ),
            ),
            Ok(e) => ListedEvent {
                event_id: hex::encode(e.id),
                author: Some(e.author_peer_id()),
                claimed_author: None,
                legacy: false,
                created_ms: e.created_ms,
                deps: e.deps.iter().map(hex::encode).collect(),
                content: json::value_to_json(&e.content),
                error: None,
                event_type: e.event_type,
            },
            Err(e) => failed(row, e.to_string()),
        };
    }
}

/// A legacy event (format 1 or 2, unsigned): decrypted, its claimed
/// author apart and its content without the fields the host now sets.
fn open_legacy(key: &NetworkKey, row: &StoredRow) -> Result<ListedEvent, String> {
    if event_crypto::event_id(&row.event)[..] != row.id[..] {
        return Err("its id is not the hash of its bytes".into());
    }
    let (created_ms, plaintext) =
        event_crypto::decrypt_event(key, &row.event).map_err(|e| e.to_string())?;
    let plaintext = codec::decode(&plaintext).map_err(|e| e.to_string())?;
    if event_type::of(&plaintext) != Some(row.event_type.as_str()) {
        return Err("its plaintext does not name the type it is stored as".into());
    }
    let Value::Map(fields) = &plaintext else {
        unreachable!("a value with a type is a map")
    };
    let content: RVec<Field> = fields
        .iter()
        .filter(|f| !signed_event::RESERVED_KEYS.contains(&f.key.as_str()))
        .cloned()
        .collect();
    Ok(ListedEvent {
        event_id: hex::encode(&row.id),
        event_type: row.event_type.clone(),
        author: None,
        claimed_author: plaintext
            .get("author")
            .and_then(Value::as_str)
            .map(str::to_owned),
        legacy: true,
        created_ms,
        deps: Vec::new(),
        content: json::value_to_json(&Value::Map(content)),
        error: None,
    })
}

/// What is shown of a row that did not open or verify: its own columns.
fn failed(row: &StoredRow, error: String) -> ListedEvent {
    ListedEvent {
        event_id: hex::encode(&row.id),
        event_type: row.event_type.clone(),
        author: None,
        claimed_author: None,
        legacy: row.legacy,
        created_ms: row.created_ms,
        deps: Vec::new(),
        content: Json::Null,
        error: Some(error),
    }
}

/// The rows of `network_id` (of `event_type`, if given) in `events` and
/// `legacy_events`, oldest first. A database no host has migrated to
/// signed events yet has no `legacy_events`: all its `events` are legacy.
fn stored_rows(
    conn: &Connection,
    network_id: &str,
    event_type: Option<&str>,
    limit: Option<u32>,
) -> rusqlite::Result<Vec<StoredRow>> {
    let select = |table: &str, legacy: bool| {
        format!(
            "SELECT event_id, created_ms, event_type, event, {legacy} FROM {table}
             WHERE network_id = ?1 AND (?2 IS NULL OR event_type = ?2)"
        )
    };
    // The newest `limit` (a negative LIMIT is none), put back oldest first.
    let newest = |rows: String| {
        format!("SELECT * FROM ({rows} ORDER BY 2 DESC, 1 DESC LIMIT ?3) ORDER BY 2, 1")
    };
    let migrated = newest(format!(
        "{} UNION ALL {}",
        select("events", false),
        select("legacy_events", true)
    ));
    let mut stmt = match conn.prepare(&migrated) {
        Err(e) if e.to_string().contains("no such table: legacy_events") => {
            conn.prepare(&newest(select("events", true)))?
        }
        other => other?,
    };
    let limit = limit.map_or(-1, i64::from);
    let rows = stmt.query_map(rusqlite::params![network_id, event_type, limit], |r| {
        Ok(StoredRow {
            id: r.get(0)?,
            created_ms: r.get(1)?,
            event_type: r.get(2)?,
            event: r.get(3)?,
            legacy: r.get(4)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::sign_and_commit;

    fn contents(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| i.to_le_bytes().to_vec()).collect()
    }

    fn index(content: &[u8]) -> usize {
        usize::from_le_bytes(content.try_into().expect("eight bytes"))
    }

    #[test]
    fn commits_every_event_once_in_order() {
        for n in [0, 1, 255, 256, 257, 5_000] {
            let mut seen = Vec::new();
            let sign = |chunk: &[Vec<u8>]| Ok(chunk.iter().map(|c| index(c)).collect());
            sign_and_commit(&contents(n), sign, |batch: &[usize]| {
                seen.extend_from_slice(batch);
                Ok(())
            })
            .expect("no error");
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{n} events");
        }
    }

    #[test]
    fn a_signing_error_stops_before_its_chunk_is_committed() {
        let mut committed = 0;
        let sign = |chunk: &[Vec<u8>]| {
            if chunk.iter().any(|c| index(c) == 3_000) {
                return Err("bad event 3000".to_string());
            }
            Ok(chunk.iter().map(|c| index(c)).collect())
        };
        let result = sign_and_commit(&contents(10_000), sign, |batch: &[usize]| {
            assert!(batch.iter().all(|&i| i < 3_000), "committed past the error");
            committed += batch.len();
            Ok(())
        });
        assert_eq!(result, Err("bad event 3000".to_string()));
        assert!(committed <= 3_000);
    }

    #[test]
    fn a_commit_error_stops_the_signers() {
        let signed = std::sync::atomic::AtomicUsize::new(0);
        let sign = |chunk: &[Vec<u8>]| {
            signed.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            Ok(chunk.iter().map(|c| index(c)).collect())
        };
        let result = sign_and_commit(&contents(100_000), sign, |_: &[usize]| {
            Err("disk full".to_string())
        });
        assert_eq!(result, Err("disk full".to_string()));
        let signed = signed.into_inner();
        assert!(
            signed < 100_000,
            "signed all {signed} after the first commit failed"
        );
    }
}
