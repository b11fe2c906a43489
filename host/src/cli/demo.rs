//! `quiet-host demo`: three real hosts on loopback, syncing, reloading.
//!
//! It starts three `quiet-host run` child processes, each with its own data
//! folder under a temporary directory and its own copy of the shipped
//! plugins, joins them into one network (B through A's invite, C through
//! B's), has each send messages and shows them converge. Then, while the
//! hosts run, it reinstalls a plugin on one host (a hot reload to a new
//! generation) and edits another host's jobs.yaml, and shows both take
//! effect. It ends with a summary table, stops every child with SIGTERM and
//! removes the folder (unless `--keep`). Nothing leaves loopback.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    cli::{commands, status},
    storage::counters::{self, CounterKind},
};

/// The plugins the demo installs on every host.
const PLUGINS: &[&str] = &["sync", "messages", "retention"];
/// Messages each host sends in the first phase.
const PER_HOST: usize = 5;

const JOBS: &str = "jobs:
  - name: sync_with_peers
    handler: sync
    frequency_ms: 3000
    params:
      max_events_per_response: 1000
  - name: retention
    handler: retention
    frequency_ms: 3600000
";

/// Demo options.
pub struct DemoOptions {
    /// Where the built plugin libraries are (`lib<name>.so`).
    pub plugins_from: PathBuf,
    /// Keep the data folders afterwards, and say where they are.
    pub keep: bool,
    /// How long to wait for convergence before giving up.
    pub timeout: Duration,
}

struct Host {
    name: &'static str,
    data: PathBuf,
    plugins: PathBuf,
    jobs: PathBuf,
    child: Child,
}

/// Children that are stopped however the demo ends.
struct Hosts(Vec<Host>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &mut self.0 {
            // SAFETY: kill(2) with a child pid we own and a valid signal.
            unsafe { libc::kill(h.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for h in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while h.child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = h.child.kill();
                    let _ = h.child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Runs the demo; returns an error line if a step fails.
pub fn run(opts: &DemoOptions) -> Result<(), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the quiet-host binary: {e}"))?;
    let libs: Vec<PathBuf> = PLUGINS
        .iter()
        .map(|p| {
            opts.plugins_from
                .join(format!("lib{p}.{}", std::env::consts::DLL_EXTENSION))
        })
        .collect();
    if let Some(missing) = libs.iter().find(|l| !l.is_file()) {
        return Err(format!(
            "{} is missing: build the plugins first (scripts/demo.sh does), or pass --plugins-from",
            missing.display()
        ));
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone()).map_err(|e| e.to_string())?;
    }
    let root = tempfile::Builder::new()
        .prefix("quiet-host-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let result = demo(opts, &exe, &libs, root.path(), &interrupted);
    if opts.keep {
        let kept = root.keep();
        println!("\ndata folders kept in {}", kept.display());
    }
    result
}

fn demo(
    opts: &DemoOptions,
    exe: &Path,
    libs: &[PathBuf],
    root: &Path,
    stop: &AtomicBool,
) -> Result<(), String> {
    let started = Instant::now();
    say("starting three hosts on loopback (A, B, C), each with its own data folder and plugins");
    let mut hosts = Hosts(Vec::new());
    for name in ["A", "B", "C"] {
        hosts.0.push(start_host(exe, root, name, libs)?);
    }
    let addrs: Vec<String> = hosts
        .0
        .iter()
        .map(|h| wait_listening(h, stop))
        .collect::<Result<_, _>>()?;
    for (h, a) in hosts.0.iter().zip(&addrs) {
        say(&format!(
            "  {} listening on {a}, data {}",
            h.name,
            h.data.display()
        ));
    }
    let [a, b, c] = [&hosts.0[0], &hosts.0[1], &hosts.0[2]];

    say("A creates a network; B joins with A's invite; C joins with B's invite");
    let invite = commands::network_create(&a.data, None)?;
    let network = crate::storage::networks::Invite::decode(&invite)?.network_id;
    commands::network_join(&b.data, &invite)?;
    commands::network_join(&c.data, &commands::network_invite(&b.data, &network, None)?)?;

    say(&format!("each host sends {PER_HOST} messages"));
    for h in &hosts.0 {
        for i in 1..=PER_HOST {
            commands::message_send(&h.data, &network, &format!("hello {i} from {}", h.name))?;
        }
    }
    let total = PER_HOST * hosts.0.len();
    let converged = converge(&hosts.0, &network, total, opts.timeout, stop)?;
    say(&format!(
        "converged: all three hosts list the same {total} messages after {converged:.1?}"
    ));

    say("hot reload: reinstalling the messages plugin on B (a new file) while it runs");
    let reload = reinstall(b, "messages", &libs[1], stop)?;
    say(&format!(
        "  B loaded messages generation {} in {reload:.1?}",
        reload_generation(b)?
    ));

    say("editing A's jobs.yaml: sync_with_peers every 3000 ms -> 2000 ms");
    let edited = edit_jobs(a, stop)?;
    say(&format!("  A applied the new frequency in {edited:.1?}"));

    say("one more message from each host, handled by the new generation and schedule");
    for h in &hosts.0 {
        commands::message_send(
            &h.data,
            &network,
            &format!("after the reload, from {}", h.name),
        )?;
    }
    let total = total + hosts.0.len();
    let again = converge(&hosts.0, &network, total, opts.timeout, stop)?;
    say(&format!(
        "converged again on {total} messages after {again:.1?}"
    ));

    summary(&hosts.0, &network, total, started.elapsed())?;
    let direct = status::read(&a.data, 0)?
        .networks
        .iter()
        .flat_map(|n| n.peers.iter())
        .any(|p| p.last_sync_ms.is_some() && p.address == addrs[2]);
    if direct {
        say("A and C, introduced only through B, synced directly");
    }
    say("stopping the hosts");
    drop(hosts);
    say("done");
    Ok(())
}

fn say(line: &str) {
    println!("{line}");
}

fn start_host(
    exe: &Path,
    root: &Path,
    name: &'static str,
    libs: &[PathBuf],
) -> Result<Host, String> {
    let dir = root.join(name);
    let (data, plugins, jobs) = (dir.join("data"), dir.join("plugins"), dir.join("jobs.yaml"));
    fs::create_dir_all(&plugins).map_err(|e| format!("{}: {e}", plugins.display()))?;
    for lib in libs {
        let to = plugins.join(lib.file_name().expect("a file"));
        fs::copy(lib, &to).map_err(|e| format!("{}: {e}", to.display()))?;
    }
    fs::write(&jobs, JOBS).map_err(|e| format!("{}: {e}", jobs.display()))?;
    let log = fs::File::create(dir.join("host.log")).map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .arg("run")
        .arg("--data")
        .arg(&data)
        .arg("--plugins")
        .arg(&plugins)
        .arg("--jobs")
        .arg(&jobs)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start host {name}: {e}"))?;
    Ok(Host {
        name,
        data,
        plugins,
        jobs,
        child,
    })
}

/// Polls `f` every 100 ms until it returns `Some`, the deadline passes, or
/// the demo is interrupted.
fn poll<T>(
    timeout: Duration,
    stop: &AtomicBool,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if stop.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn wait_listening(h: &Host, stop: &AtomicBool) -> Result<String, String> {
    poll(
        Duration::from_secs(20),
        stop,
        &format!("host {} starting", h.name),
        || {
            let s = status::read(&h.data, 0).ok()?;
            s.running_pid.and(s.listen_addr)
        },
    )
    .map_err(|e| {
        format!(
            "{e} (see {})",
            h.data
                .parent()
                .expect("host dir")
                .join("host.log")
                .display()
        )
    })
}

fn count(h: &Host, network: &str) -> usize {
    commands::message_list(&h.data, network).map_or(0, |m| m.len())
}

fn converge(
    hosts: &[Host],
    network: &str,
    total: usize,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Duration, String> {
    let started = Instant::now();
    let result = poll(timeout, stop, "convergence", || {
        let counts: Vec<usize> = hosts.iter().map(|h| count(h, network)).collect();
        let line: Vec<String> = hosts
            .iter()
            .zip(&counts)
            .map(|(h, n)| format!("{} {n:>2}/{total}", h.name))
            .collect();
        print!(
            "\r  syncing: {}   {:>5.1}s",
            line.join("   "),
            started.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
        let ids: Vec<Vec<String>> = hosts
            .iter()
            .map(|h| {
                commands::message_list(&h.data, network)
                    .map(|m| m.into_iter().map(|m| m.event_id).collect())
            })
            .collect::<Result<_, _>>()
            .ok()?;
        (counts.iter().all(|n| *n == total) && ids.iter().all(|l| *l == ids[0]))
            .then(|| started.elapsed())
    });
    println!();
    result
}

fn plugin_generation(h: &Host, plugin: &str) -> Option<i64> {
    status::read(&h.data, 0)
        .ok()?
        .plugins
        .iter()
        .find(|p| p.name.as_deref() == Some(plugin) && p.error.is_none())?
        .generation
}

fn reload_generation(h: &Host) -> Result<i64, String> {
    plugin_generation(h, "messages").ok_or_else(|| "the messages plugin is not loaded".into())
}

/// Installs a new file for `plugin`: the same library with a few bytes
/// appended, so its content (and hash) differ, as an upgraded build's would.
fn reinstall(h: &Host, plugin: &str, lib: &Path, stop: &AtomicBool) -> Result<Duration, String> {
    let before = plugin_generation(h, plugin).unwrap_or(0);
    let mut bytes = fs::read(lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    bytes.extend_from_slice(b"\0quiet-host demo reinstall\0");
    let name = lib.file_name().expect("a file");
    let tmp = h.plugins.join(".reinstall.partial");
    fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
    let started = Instant::now();
    fs::rename(&tmp, h.plugins.join(name)).map_err(|e| e.to_string())?;
    poll(Duration::from_secs(10), stop, "the reload", || {
        (plugin_generation(h, plugin)? > before).then(|| started.elapsed())
    })
}

fn edit_jobs(h: &Host, stop: &AtomicBool) -> Result<Duration, String> {
    let tmp = h.jobs.with_extension("swp");
    fs::write(
        &tmp,
        JOBS.replace("frequency_ms: 3000", "frequency_ms: 2000"),
    )
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    fs::rename(&tmp, &h.jobs).map_err(|e| e.to_string())?;
    poll(Duration::from_secs(10), stop, "the jobs.yaml edit", || {
        let s = status::read(&h.data, 0).ok()?;
        let job = s.jobs.iter().find(|j| j.name == "sync_with_peers")?;
        (job.frequency_ms == 2000).then(|| started.elapsed())
    })
}

fn summary(hosts: &[Host], network: &str, total: usize, elapsed: Duration) -> Result<(), String> {
    println!("\n  host  peer id           messages  events  plugin gen  sync runs  duplicates  dropped  dead letters");
    for h in hosts {
        let s = status::read(&h.data, 0)?;
        let events: i64 = s.networks.iter().map(|n| n.events).sum();
        let runs = s
            .jobs
            .iter()
            .find(|j| j.name == "sync_with_peers")
            .map_or(0, |j| j.run_count);
        // Receiving an event from two peers is normal, and so is traffic;
        // only what was refused or lost counts as dropped.
        let duplicates = s.counters.get("duplicate_events").copied().unwrap_or(0);
        let dropped: i64 = s
            .counters
            .iter()
            .filter(|(name, _)| counters::kind(name) == CounterKind::Dropped)
            .map(|(_, n)| n)
            .sum();
        println!(
            "  {:<4}  {:<16}  {:>8}  {:>6}  {:>10}  {:>9}  {:>10}  {:>7}  {:>12}",
            h.name,
            s.peer_id.as_deref().map_or("-", |p| &p[..16]),
            format!("{}/{total}", count(h, network)),
            events,
            s.generation,
            runs,
            duplicates,
            dropped,
            s.dead_letters.total
        );
    }
    println!("  total time {elapsed:.1?}\n");
    Ok(())
}
