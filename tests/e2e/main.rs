//! End-to-end tests: real `quiet-host` processes, real compiled plugins
//! loaded with dlopen, real SQLite files.
//!
//! Each test builds the plugins it needs with cargo (see
//! `quiet_test_support::plugin`), starts hosts in temporary folders and
//! checks what they did through `quiet-host status --json` and the database.

mod cli;
mod crash;
mod faults;
mod jobs;
mod membership;
mod plugin_events;
mod plugin_faults;
mod reactions;
mod reload;
mod replay;
mod restart;
mod signed;
mod sync;

use std::path::{Path, PathBuf};

pub use quiet_test_support::peers::{db, query_i64};
use quiet_test_support::{install, plugin, HostDirs, HostProcess};

/// The `quiet-host` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiet-host"))
}

/// `quiet-host status` (the text form) of a data folder.
pub fn status_text(data: &Path) -> String {
    let out = std::process::Command::new(bin())
        .args(["status", "--data"])
        .arg(data)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status entry of the job called `name`.
pub fn job<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["name"] == name)
}

/// The status entry of the plugin file whose name is `file`.
pub fn plugin_file<'a>(status: &'a serde_json::Value, file: &str) -> Option<&'a serde_json::Value> {
    status["plugins"].as_array()?.iter().find(|p| {
        p["file"]
            .as_str()
            .is_some_and(|f| f.ends_with(&format!("/{file}")))
    })
}

/// Asserts `out` failed with exit code 2 and one `error: ` line of stderr
/// holding every one of `needles`; returns that line.
pub fn one_line_error(out: &std::process::Output, needles: &[&str]) -> String {
    assert_eq!(out.status.code(), Some(2), "exit status {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
    stderr
}

/// Fresh folders holding `jobs_yaml` and the ticker plugin (v1) as
/// `libticker.so`, and a host running on them.
pub fn ticker_host(jobs_yaml: &str) -> (HostDirs, HostProcess) {
    let dirs = HostDirs::new(jobs_yaml);
    install(
        &plugin("ticker-plugin", "v1"),
        &dirs.plugins,
        "libticker.so",
    );
    let host = HostProcess::start(&bin(), &dirs);
    (dirs, host)
}
