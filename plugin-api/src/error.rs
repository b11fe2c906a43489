//! [`PluginError`]: what a handler returns when it fails.

use std::fmt;

/// A handler's failure, reported by the host in its log, in the dead-letter
/// table and in `quiet-host status`. The host rolls back what the call wrote.
///
/// Any `std::error::Error` converts into it, so `?` works on rusqlite-free
/// plugin code as usual; use [`PluginError::msg`] for a plain message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    message: String,
}

impl PluginError {
    /// An error with the given message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

// Like anyhow: no `impl Error for PluginError`, which leaves room for this
// blanket conversion.
impl<E: std::error::Error> From<E> for PluginError {
    fn from(e: E) -> Self {
        Self::msg(e)
    }
}

/// Returns early from a handler with a [`PluginError`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::PluginError::msg(format!($($arg)*))) };
}
