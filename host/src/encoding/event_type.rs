//! Event type names: the one rule for what may name a type, checked by
//! the event store, the network (for a request's type) and the signed
//! event format, which names its type in bytes of its own.
//!
//! A type comes from whoever wrote the event, and ends up in dead letters,
//! logs and `status`: a megabyte of it, or one with line breaks, must not.

use quiet_plugin_api::Value;

/// The longest event type accepted, in bytes.
pub const MAX_LEN: usize = 64;

/// Whether `t` may name an event type: 1 to [`MAX_LEN`] bytes of
/// `A-Z a-z 0-9 _ . : -`.
pub fn is_valid(t: &str) -> bool {
    (1..=MAX_LEN).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// What the types of the host's own events begin with: the membership
/// events of `docs/design/membership.md`. Neither plugins nor
/// `event send` may create one, so that who is in a network is decided by
/// the host alone.
pub const HOSTS_PREFIX: &str = "quiet.";

/// Refuses, in one line, a type of the host's own ([`HOSTS_PREFIX`]) to
/// whoever asked to create an event of it.
pub fn check_not_hosts(t: &str) -> Result<(), String> {
    match t.starts_with(HOSTS_PREFIX) {
        false => Ok(()),
        true => Err(format!(
            "{t:?}: types that begin with {HOSTS_PREFIX:?} are the host's own; \
             choose another type name"
        )),
    }
}

/// The event type a plaintext names in its `type`, if it is a map with a
/// valid one.
pub fn of(plaintext: &Value) -> Option<&str> {
    plaintext
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| is_valid(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_short_printable_names() {
        for good in [
            "message",
            "a",
            "sync_request",
            "x.y:z-1",
            &"t".repeat(MAX_LEN),
        ] {
            assert!(is_valid(good), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            "é",
            "sync\u{1b}[2K",
            &"t".repeat(MAX_LEN + 1),
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
        assert_eq!(
            of(&Value::map([("type", Value::from("message"))])),
            Some("message")
        );
        assert_eq!(of(&Value::map([("type", Value::from(7))])), None);
        assert_eq!(of(&Value::from("message")), None);
    }

    #[test]
    fn only_the_host_creates_types_of_its_prefix() {
        for ok in ["message", "quiet", "quietly.add", "x.quiet.add"] {
            assert_eq!(check_not_hosts(ok), Ok(()), "{ok}");
        }
        let err = check_not_hosts("quiet.remove").unwrap_err();
        assert!(err.starts_with("\"quiet.remove\": types that begin with \"quiet.\""));
        assert!(!err.contains('\n'));
    }
}
