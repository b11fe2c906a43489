//! Networks: membership, keys and invites.
//!
//! A network is an id and a symmetric key. The key is a secret, so it is not
//! in the database (plugins can run SQL): it lives in
//! `<data>/keys/<network_id>.key`, mode 0600, read only by the host.
//!
//! An invite is one copyable line, `quiet1:` then URL-safe base64 of the
//! network id, its key, and the inviter's peer id and address. Whoever holds
//! it can join, so treat it like a password.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use quiet_plugin_api::Value;
use rusqlite::Connection;

use crate::{
    crypto::{event_crypto::NetworkKey, identity},
    encoding::codec,
    storage::db,
};

/// Invites begin with this, then URL-safe base64 of the fields and a
/// checksum of them.
const INVITE_PREFIX: &str = "quiet2:";
/// The prefix of invites from before the checksum, which cannot tell a
/// damaged invite from a good one.
const OLD_INVITE_PREFIX: &str = "quiet1:";
/// Bytes of BLAKE3 over the fields that end an invite: a copy that lost or
/// changed a character fails it (a damaged invite decodes as a network that
/// never syncs, or a peer that is not there).
const INVITE_CHECK: usize = 8;

fn invite_check(fields: &[u8]) -> [u8; INVITE_CHECK] {
    let mut h = blake3::Hasher::new_derive_key("quiet-host 2026 invite checksum");
    h.update(fields);
    let mut out = [0u8; INVITE_CHECK];
    h.finalize_xof().fill(&mut out);
    out
}

/// A decoded invite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// The network to join.
    pub network_id: String,
    /// Its key.
    pub key: [u8; 32],
    /// The inviter's peer id.
    pub peer_id: String,
    /// Where the inviter listens, `ip:port`.
    pub address: String,
}

impl Invite {
    /// The one-line form.
    pub fn encode(&self) -> String {
        let v = Value::map([
            ("n", Value::from(self.network_id.as_str())),
            ("k", Value::from(self.key)),
            ("p", Value::from(self.peer_id.as_str())),
            ("a", Value::from(self.address.as_str())),
        ]);
        let mut bytes = codec::encode(&v);
        bytes.extend(invite_check(&bytes));
        format!("{INVITE_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses the one-line form; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("not a valid invite: {why} (copy the whole line `network create` printed)")
        };
        let text = text.trim();
        if text.starts_with(OLD_INVITE_PREFIX) {
            return Err(format!(
                "not a valid invite: it was made by an older quiet-host, whose invites \
                 ({OLD_INVITE_PREFIX}) carry no checksum; ask for a new one"
            ));
        }
        let body = text
            .strip_prefix(INVITE_PREFIX)
            .ok_or_else(|| bad(&format!("it does not start with {INVITE_PREFIX}")))?;
        let damaged = || bad("it is damaged or cut short (its checksum does not match)");
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| damaged())?;
        let (fields, check) = bytes
            .split_at_checked(bytes.len().wrapping_sub(INVITE_CHECK))
            .ok_or_else(damaged)?;
        // Not a secret: a plain comparison tells nothing worth hiding.
        if check != invite_check(fields) {
            return Err(damaged());
        }
        let v = codec::decode(fields).map_err(|_| damaged())?;
        let text_field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(network_id), Some(peer_id), Some(address)) =
            (text_field("n"), text_field("p"), text_field("a"))
        else {
            return Err(bad("fields are missing"));
        };
        let key: [u8; 32] = v
            .get("k")
            .and_then(Value::as_bytes)
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("the key is missing"))?;
        crate::crypto::event_crypto::peer_key(&peer_id)
            .map_err(|_| bad("the peer id is malformed"))?;
        if !valid_network_id(&network_id) {
            return Err(bad("the network id is malformed"));
        }
        parse_address(&address).map_err(|_| bad("the address is malformed"))?;
        Ok(Invite {
            network_id,
            key,
            peer_id,
            address,
        })
    }
}

fn valid_network_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Splits `ip:port`.
pub fn parse_address(address: &str) -> Result<(String, u16), String> {
    let addr: std::net::SocketAddr = address
        .parse()
        .map_err(|_| format!("'{address}' is not an ip:port address"))?;
    Ok((addr.ip().to_string(), addr.port()))
}

/// The network keys of one data folder, read lazily and cached.
pub struct NetworkKeys {
    dir: PathBuf,
    cache: Mutex<HashMap<String, NetworkKey>>,
}

impl NetworkKeys {
    /// The keys under `<data_dir>/keys`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("keys"),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The key of `network_id`, if this host is a member.
    pub fn get(&self, network_id: &str) -> Option<NetworkKey> {
        if !valid_network_id(network_id) {
            return None;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(network_id) {
            return Some(k.clone());
        }
        let path = self.dir.join(format!("{network_id}.key"));
        // A key others can read is not used (see `check_private`).
        if !matches!(identity::exposed_mode(&path), Ok(None)) {
            return None;
        }
        let bytes = fs::read(path).ok()?;
        let key = NetworkKey(bytes.try_into().ok()?);
        cache.insert(network_id.to_owned(), key.clone());
        Some(key)
    }

    /// Whether this data folder holds any network key: it has been in use.
    pub fn any(&self) -> bool {
        fs::read_dir(&self.dir).is_ok_and(|mut d| d.next().is_some())
    }

    /// Fails, naming the first, if a key file can be read by others than
    /// its owner: such a key is not used, as a readable `identity.key` is
    /// not, since anyone who can read it can read and write the network.
    pub fn check_private(&self) -> Result<(), String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "key") {
                continue;
            }
            match identity::exposed_mode(&path) {
                Ok(None) => {}
                Ok(Some(mode)) => {
                    return Err(format!(
                        "{}: network key is readable by others (mode {mode:o}); run `chmod 600 {}`",
                        path.display(),
                        path.display()
                    ))
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Ok(())
    }

    /// Keeps `key` as the key of `network_id`, in a file only its owner can
    /// read (the folder is made if needed).
    pub fn store(&self, network_id: &str, key: &NetworkKey) -> Result<(), String> {
        db::create_private_dir(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let path = self.dir.join(format!("{network_id}.key"));
        identity::write_private(&path, &key.0).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Creates a network whose id is derived from its creator `peer_id` and a
/// salt it keeps (see [`crate::storage::members`]); returns its invite.
/// The caller writes its genesis.
pub fn create(
    data_dir: &Path,
    conn: &Connection,
    peer_id: &str,
    address: &str,
) -> Result<Invite, String> {
    parse_address(address)?;
    let creator = crate::storage::membership::peer_of_hex(peer_id).ok_or("a malformed peer id")?;
    let salt = crate::crypto::entropy::random::<16>();
    let network_id = crate::storage::membership::network_id_of(&creator, &salt);
    let key = NetworkKey::generate();
    NetworkKeys::new(data_dir).store(&network_id, &key)?;
    conn.execute(
        "INSERT INTO networks(network_id, created_ms, invited_by, salt) VALUES (?1, ?2, NULL, ?3)",
        rusqlite::params![network_id, db::now_ms(), &salt[..]],
    )
    .map_err(|e| e.to_string())?;
    Ok(Invite {
        network_id,
        key: key.0,
        peer_id: peer_id.to_owned(),
        address: address.to_owned(),
    })
}

/// Joins the network of `invite` and records the inviter as a peer.
pub fn join(
    data_dir: &Path,
    conn: &Connection,
    invite: &Invite,
    our_peer_id: &str,
) -> Result<(), String> {
    if invite.peer_id == our_peer_id {
        return Err("this invite was made by this host; give it to another host".into());
    }
    let keys = NetworkKeys::new(data_dir);
    if let Some(existing) = keys.get(&invite.network_id) {
        if existing.0 != invite.key {
            return Err(format!(
                "already a member of network {} with another key; the invite is not for this network",
                invite.network_id
            ));
        }
    } else {
        keys.store(&invite.network_id, &NetworkKey(invite.key))?;
    }
    let (ip, port) = parse_address(&invite.address)?;
    db::with_write_tx(conn, |c| {
        c.execute(
            "INSERT OR IGNORE INTO networks(network_id, created_ms, invited_by) VALUES (?1, ?2, ?3)",
            rusqlite::params![invite.network_id, db::now_ms(), invite.peer_id],
        )?;
        c.execute(
            "INSERT INTO addresses(peer_id, network_id, ip, port, is_active, last_seen_ms) VALUES (?1, ?2, ?3, ?4, 1, NULL)
             ON CONFLICT(peer_id, network_id) DO UPDATE SET ip = excluded.ip, port = excluded.port, is_active = 1",
            rusqlite::params![invite.peer_id, invite.network_id, ip, port],
        )?;
        Ok::<_, rusqlite::Error>(())
    })
    .map_err(|e| e.to_string())
}

/// Whether this host is a member of `network_id`.
pub fn is_member(conn: &Connection, network_id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM networks WHERE network_id = ?")?
        .exists([network_id])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite() -> Invite {
        Invite {
            network_id: "0123456789abcdef0123456789abcdef".into(),
            key: [5; 32],
            peer_id: "ab".repeat(32),
            address: "127.0.0.1:7001".into(),
        }
    }

    #[test]
    fn invites_round_trip_and_damage_is_named() {
        let invite = invite();
        let line = invite.encode();
        assert!(line.starts_with("quiet2:") && !line.contains(char::is_whitespace));
        assert_eq!(Invite::decode(&format!("  {line}\n")).unwrap(), invite);
        assert!(Invite::decode("hello")
            .unwrap_err()
            .contains("does not start with quiet2:"));
        let cut = &line[..line.len() - 5];
        assert!(Invite::decode(cut)
            .unwrap_err()
            .contains("damaged or cut short"));
        assert!(Invite::decode(&line.replacen("quiet2:", "quiet1:", 1))
            .unwrap_err()
            .contains("made by an older quiet-host"));
    }

    #[test]
    fn an_invite_with_any_one_character_changed_is_refused_as_damaged() {
        let line = invite().encode();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let body = INVITE_PREFIX.len();
        let mut tried = 0;
        for at in body..line.len() {
            for &c in alphabet.iter().filter(|&&c| c != line.as_bytes()[at]) {
                let mut damaged = line.clone().into_bytes();
                damaged[at] = c;
                let damaged = String::from_utf8(damaged).unwrap();
                let err = Invite::decode(&damaged).unwrap_err();
                assert!(err.contains("damaged"), "{damaged}: {err}");
                tried += 1;
            }
        }
        assert_eq!(tried, (line.len() - body) * 63);
    }
}
