//! Test support for quiet-host's end-to-end tests and benches: builds real
//! plugin libraries with cargo, and runs real `quiet-host` processes.
//!
//! Plugins are built by calling cargo from the test (not from a build
//! script, which would deadlock on the target directory), serialised by a
//! process-wide mutex and a file lock so that parallel test binaries do not
//! overwrite each other's artifacts. Each build is copied to
//! `target/test-plugins/<lib>-<variant>.so`, because cargo overwrites the
//! top-level artifact when a variant is built.

pub mod hostile;
pub mod peers;

use std::{
    collections::HashMap,
    fs::{self, File},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds `package` (a cdylib, debug profile) with
/// `QUIET_TEST_VARIANT=variant` and returns the path of a private copy of the
/// library. Cached per process.
pub fn plugin(package: &str, variant: &str) -> PathBuf {
    build_plugin(package, variant, false)
}

/// Like [`plugin`], in the release profile (variant `v1`), for benchmarks
/// that must compare optimised code with optimised code.
pub fn release_plugin(package: &str) -> PathBuf {
    build_plugin(package, "v1", true)
}

fn build_plugin(package: &str, variant: &str, release: bool) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(String, String), PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let profile = if release { "release" } else { "debug" };
    let key = (package.to_owned(), format!("{variant}-{profile}"));
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let out_dir = target_dir().join("test-plugins");
    fs::create_dir_all(&out_dir).unwrap();
    let lock = File::create(out_dir.join(".lock")).unwrap();
    lock.lock().expect("locking the plugin build");
    let artifact = cargo_build(package, variant, release);
    let name = artifact.file_stem().unwrap().to_string_lossy().into_owned();
    let ext = artifact.extension().unwrap().to_string_lossy().into_owned();
    let copy = out_dir.join(format!("{name}-{variant}-{profile}.{ext}"));
    let tmp = out_dir.join(format!(
        ".{name}-{variant}-{profile}.{}.tmp",
        std::process::id()
    ));
    fs::copy(&artifact, &tmp).unwrap();
    fs::rename(&tmp, &copy).unwrap();
    drop(lock);
    built.insert(key, copy.clone());
    copy
}

fn cargo_build(package: &str, variant: &str, release: bool) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        package,
        "--message-format=json-render-diagnostics",
    ];
    if release {
        args.push("--release");
    }
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(args)
        .env("QUIET_TEST_VARIANT", variant)
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo");
    assert!(out.status.success(), "cargo build -p {package} failed");
    let suffix = format!(".{}", std::env::consts::DLL_EXTENSION);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains(package))
        })
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.to_string_lossy().ends_with(&suffix))
        .unwrap_or_else(|| panic!("cargo built no {suffix} for {package}"))
}

/// Installs `library` into `dir` as `name` the way an operator would: copy
/// to a temporary name, then rename over the old file.
pub fn install(library: &Path, dir: &Path, name: &str) {
    let tmp = dir.join(format!(".{name}.partial"));
    fs::copy(library, &tmp).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Writes `text` to `path` by rename, as editors do.
pub fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Polls `f` every 20 ms until it returns `Some`, or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A folder layout for one host: data, plugins and jobs.yaml.
pub struct HostDirs {
    _root: tempfile::TempDir,
    /// `--data`.
    pub data: PathBuf,
    /// `--plugins`.
    pub plugins: PathBuf,
    /// `--jobs`.
    pub jobs: PathBuf,
}

impl HostDirs {
    /// Fresh, empty folders and a jobs.yaml holding `jobs_yaml`.
    pub fn new(jobs_yaml: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dirs = HostDirs {
            data: root.path().join("data"),
            plugins: root.path().join("plugins"),
            jobs: root.path().join("conf").join("jobs.yaml"),
            _root: root,
        };
        fs::create_dir_all(&dirs.plugins).unwrap();
        fs::create_dir_all(dirs.jobs.parent().unwrap()).unwrap();
        fs::write(&dirs.jobs, jobs_yaml).unwrap();
        dirs
    }
}

impl HostDirs {
    /// `bin run` on these folders, for the caller to add to and start.
    pub fn run_command(&self, bin: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--data"])
            .arg(&self.data)
            .arg("--plugins")
            .arg(&self.plugins)
            .arg("--jobs")
            .arg(&self.jobs);
        cmd
    }
}

/// A running `quiet-host run` child process; killed on drop.
pub struct HostProcess {
    child: Child,
    bin: PathBuf,
    data: PathBuf,
    log: std::sync::Arc<Mutex<Vec<String>>>,
}

impl HostProcess {
    /// Starts `bin run` on `dirs` and waits until it says it is running.
    pub fn start(bin: &Path, dirs: &HostDirs) -> Self {
        Self::start_with(bin, dirs, &[])
    }

    /// Like [`HostProcess::start`], listening on a free loopback port.
    pub fn start_listening(bin: &Path, dirs: &HostDirs) -> Self {
        Self::start_with(bin, dirs, &["--listen", "127.0.0.1:0"])
    }

    /// Like [`HostProcess::start`], with more arguments for `run`.
    pub fn start_with(bin: &Path, dirs: &HostDirs, extra: &[&str]) -> Self {
        let mut child = dirs
            .run_command(bin)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting quiet-host");
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let host = HostProcess {
            child,
            bin: bin.to_owned(),
            data: dirs.data.clone(),
            log,
        };
        host.wait_log("quiet-host running", Duration::from_secs(20));
        host
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the host logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`; panics with the log if not.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        wait_for(timeout, || {
            self.log().into_iter().find(|l| l.contains(needle))
        })
        .unwrap_or_else(|| {
            panic!(
                "no log line with {needle:?} within {timeout:?}; log:\n{}",
                self.log().join("\n")
            )
        })
    }

    /// `quiet-host status --json` for this host's data folder.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.bin, &self.data)
    }

    /// CPU seconds (user and system) the host has used, from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which may itself hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// Runs `ARGS --data` this host's data folder with the host's binary;
    /// see [`peers::cli`].
    pub fn cli(&self, args: &[&str]) -> String {
        peers::cli(&self.bin, &self.data, args)
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        proc_status(self.pid(), "VmRSS:")
    }

    /// Sends SIGTERM and waits; panics unless the host exits 0 within 10 s.
    pub fn stop(mut self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let status = wait_for(Duration::from_secs(10), || self.child.try_wait().unwrap())
            .unwrap_or_else(|| {
                panic!(
                    "host did not stop after SIGTERM; log:\n{}",
                    self.log().join("\n")
                )
            });
        assert!(
            status.success(),
            "host exited with {status}; log:\n{}",
            self.log().join("\n")
        );
    }

    /// Sends SIGKILL, as a crash would, and waits; panics unless the host
    /// was still running until then (it died of this signal, not before).
    pub fn kill(mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "host had already exited with {status}; log:\n{}",
            self.log().join("\n")
        );
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number from `/proc/PID/status`: the first word after `field`
/// (`VmRSS:` in KiB, `Threads:`), or 0 if the process is gone.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `bin status --json --data data` and parses it; panics on failure.
pub fn status_json(bin: &Path, data: &Path) -> serde_json::Value {
    let out = Command::new(bin)
        .args(["status", "--json", "--dead-letters", "50", "--data"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}
