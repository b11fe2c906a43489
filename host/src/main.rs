//! The `quiet-host` command line.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use quiet_host::{
    cli::{commands, host, status, terminal},
    engine::watchdog,
    plugins::loader,
};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

/// The host's allocations (not the plugins' or SQLite's, which keep their
/// own) go to mimalloc. A receiver allocates and frees its events a
/// response (a thousand) at a time, and some on another thread than the one
/// that frees them; glibc's per-thread cache holds seven blocks of a size,
/// so most of those went to its locked, coalescing paths. A receiver runs
/// 5 % fewer instructions, and its engine used 7-18 % less CPU in 100k
/// catch-ups (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`: the host's version and the plugin ABI it loads.
fn version() -> &'static str {
    let v = format!(
        "{} (plugin ABI {})",
        env!("CARGO_PKG_VERSION"),
        quiet_plugin_api::ABI_VERSION
    );
    Box::leak(v.into_boxed_str())
}

/// A long-lived host for Quiet sync: plugins, scheduled jobs, an envelope
/// pipeline and SQLite.
#[derive(Parser)]
#[command(name = "quiet-host", version = version(), propagate_version = true)]
struct Cli {
    /// Data folder: database, identity and network keys, lock.
    #[arg(
        long = "data",
        env = "QUIET_DATA",
        default_value = "data",
        global = true
    )]
    data_dir: PathBuf,

    /// Log line format; filter with RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host until SIGINT or SIGTERM; reloads plugins and jobs.yaml
    /// whenever they change.
    Run {
        /// Plugin folder, watched for libraries [default: <data>/plugins].
        #[arg(long = "plugins", env = "QUIET_PLUGINS")]
        plugins_dir: Option<PathBuf>,
        /// Job configuration, watched for edits.
        #[arg(long = "jobs", env = "QUIET_JOBS", default_value = "jobs.yaml")]
        jobs_path: PathBuf,
        /// Listen for peers on IP:PORT (port 0 picks a free one). Without it
        /// the host does not sync.
        #[arg(long, env = "QUIET_LISTEN")]
        listen: Option<String>,
        /// How long one plugin call (filter, process, run_job) may run, in
        /// milliseconds; a plugin whose call runs longer is disabled and the
        /// host carries on without it [default: 10000].
        #[arg(long = "call-budget-ms", env = "QUIET_CALL_BUDGET_MS",
              value_parser = clap::value_parser!(u64).range(1..))]
        call_budget_ms: Option<u64>,
    },
    /// Show plugins, jobs and dead letters of a host (running or not).
    Status {
        /// Print JSON (stable schema, see docs/status.md).
        #[arg(long)]
        json: bool,
        /// How many recent dead letters to show.
        #[arg(long, default_value_t = 5)]
        dead_letters: usize,
    },
    /// Run three hosts on loopback: they sync, a plugin is hot-reloaded,
    /// jobs.yaml is edited; then everything is stopped and removed.
    Demo {
        /// Folder holding the built plugins (libsync.so, libmessages.so,
        /// libretention.so) [default: the folder of this executable].
        #[arg(long)]
        plugins_from: Option<PathBuf>,
        /// Keep the hosts' data folders afterwards.
        #[arg(long)]
        keep: bool,
        /// Seconds to wait for the hosts to converge.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Work with plugin libraries.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Create, join and list networks.
    Network {
        #[command(subcommand)]
        command: NetworkCommand,
    },
    /// Send and list messages.
    Message {
        #[command(subcommand)]
        command: MessageCommand,
    },
    /// Send and list events of any type, signed by this host.
    Event {
        #[command(subcommand)]
        command: EventCommand,
    },
}

#[derive(Subcommand)]
enum EventCommand {
    /// Sign an event with this host's identity and queue it; prints its id.
    ///
    /// The running host (or its next start) stores and syncs it. Refused
    /// in one line, with nothing queued: content that is not a JSON object
    /// or uses a key the host sets (type, author, created_ms, deps), a bad
    /// type or dep, more than 16 deps, an event over 64 KiB.
    #[command(after_help = "Examples:
  quiet-host event send NETWORK note '{\"text\": \"hi\", \"pinned\": true}'
  quiet-host event send NETWORK reaction '{\"emoji\": \"👍\"}' --dep MESSAGE_ID
  some-tool | quiet-host event send NETWORK note -")]
    Send {
        /// The network id.
        network: String,
        /// The event type: 1 to 64 of A-Z a-z 0-9 _ . : -
        #[arg(value_name = "TYPE")]
        event_type: String,
        /// The content, a JSON object (bytes as {"$bytes": "<hex>"}; a
        /// number with a fraction or exponent is a float, one without an
        /// integer), or `-` to read it from standard input.
        #[arg(value_name = "JSON")]
        content: Option<String>,
        /// Read the content from this file instead.
        #[arg(long, conflicts_with = "content")]
        file: Option<PathBuf>,
        /// An event this one depends on, in the same network (its id, as
        /// `event list` prints it); repeat for more, up to 16.
        #[arg(long = "dep", value_name = "ID")]
        deps: Vec<String>,
    },
    /// List a network's stored events, oldest first.
    ///
    /// One line each: time, id, type, author (the signer's peer id, cut to
    /// 12), the number of deps, the content as JSON, with control
    /// characters escaped. Each is decrypted and its signature checked
    /// again; one that fails is shown as an error line. Events stored
    /// before signatures are listed too, their claimed author marked `?`.
    List {
        /// The network id.
        network: String,
        /// Only events of this type.
        #[arg(long = "type", value_name = "TYPE")]
        event_type: Option<String>,
        /// Only the newest N (still listed oldest first).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Print JSON: an array of {event_id, event_type, author, legacy,
        /// created_ms, deps, content}, with claimed_author for legacy
        /// events and error for rows that failed.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network and print its invite (one line; treat it as a password).
    Create {
        /// The address peers reach this host at [default: the host's --listen address].
        #[arg(long)]
        address: Option<String>,
    },
    /// Print an invite to a network this host is in (naming this host).
    Invite {
        /// The network id.
        network: String,
        /// The address peers reach this host at [default: the host's --listen address].
        #[arg(long)]
        address: Option<String>,
    },
    /// Join a network with an invite from `network create` or `network invite`.
    Join {
        /// The invite line, or `-` to read it from standard input (so that
        /// it appears in neither `ps` nor the shell's history).
        invite: Option<String>,
        /// Read the invite from this file instead.
        #[arg(long, conflicts_with = "invite")]
        file: Option<PathBuf>,
    },
    /// List a network's members, as this host knows them from the
    /// network's membership events.
    Members {
        /// The network id.
        network: String,
        /// Print JSON: {known, members: [{peer_id, role}], events, invalid}.
        #[arg(long)]
        json: bool,
    },
    /// List this host's networks.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MessageCommand {
    /// Send a message to a network (the running host stores and syncs it).
    Send {
        /// The network id.
        network: String,
        /// The text, or `-` to read it from standard input.
        text: Option<String>,
        /// Read the text from this file instead (one trailing line break
        /// is dropped, as from standard input).
        #[arg(long, conflicts_with = "text")]
        file: Option<PathBuf>,
        /// Send this many messages ("TEXT #1", "TEXT #2", …) in one
        /// transaction, for load tests; prints the first and last id.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// List a network's messages, oldest first.
    List {
        /// The network id.
        network: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Say whether a library would load in this host, and why not.
    Check {
        /// The library file.
        file: PathBuf,
    },
    /// Rebuild a plugin's projection from scratch: the host empties it
    /// (the plugin's reset) and offers the plugin every stored event of its
    /// types again, in order. Works whether the host runs or not; the
    /// replay starts once the host runs with the plugin loaded.
    Replay {
        /// The plugin's name, as `status` lists it (such as `messages`).
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let data_dir = cli.data_dir;
    let result = match cli.command {
        Command::Run {
            plugins_dir,
            jobs_path,
            listen,
            call_budget_ms,
        } => run(
            data_dir,
            plugins_dir,
            jobs_path,
            listen,
            call_budget_ms.map_or(watchdog::DEFAULT_CALL_BUDGET, Duration::from_millis),
        ),
        Command::Status { json, dead_letters } => status::read(&data_dir, dead_letters).map(|s| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).expect("status serialises")
                );
            } else {
                print!("{}", status::render(&s));
            }
        }),
        Command::Plugins {
            command: PluginsCommand::Check { file },
        } => check(&file),
        Command::Plugins {
            command: PluginsCommand::Replay { name },
        } => commands::plugins_replay(&data_dir, &name).map(|said| println!("{said}")),
        Command::Demo {
            plugins_from,
            keep,
            timeout,
        } => demo(plugins_from, keep, timeout),
        Command::Network { command } => network(&data_dir, command),
        Command::Message { command } => message(&data_dir, command),
        Command::Event { command } => event(&data_dir, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn demo(plugins_from: Option<PathBuf>, keep: bool, timeout: u64) -> Result<(), String> {
    let plugins_from = match plugins_from {
        Some(dir) => dir,
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .ok_or("cannot find this executable's folder; pass --plugins-from")?,
    };
    quiet_host::cli::demo::run(&quiet_host::cli::demo::DemoOptions {
        plugins_from,
        keep,
        timeout: std::time::Duration::from_secs(timeout),
    })
}

fn network(data: &Path, command: NetworkCommand) -> Result<(), String> {
    match command {
        NetworkCommand::Create { address } => {
            println!("{}", commands::network_create(data, address.as_deref())?)
        }
        NetworkCommand::Invite { network, address } => {
            println!(
                "{}",
                commands::network_invite(data, &network, address.as_deref())?
            )
        }
        NetworkCommand::Join { invite, file } => {
            let invite = commands::read_input(invite.as_deref(), file.as_deref(), "the invite")?;
            println!("{}", commands::network_join(data, &invite)?)
        }
        NetworkCommand::Members { network, json } => {
            let roster = commands::network_members(data, &network)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&roster).expect("serialises")
                );
            } else {
                print!("{}", commands::roster_text(&roster));
            }
        }
        NetworkCommand::List { json } => {
            let list = commands::network_list(data)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("serialises")
                );
            } else {
                for n in &list {
                    println!("{}  {} peers  {} events", n.network_id, n.peers, n.events);
                }
            }
        }
    }
    Ok(())
}

fn message(data: &Path, command: MessageCommand) -> Result<(), String> {
    match command {
        MessageCommand::Send {
            network,
            text,
            file,
            count,
        } => {
            let text = commands::read_input(text.as_deref(), file.as_deref(), "the message text")?;
            if count == 1 {
                println!("{}", commands::message_send(data, &network, &text)?);
            } else {
                let texts: Vec<String> = (1..=count).map(|i| format!("{text} #{i}")).collect();
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                let ids = commands::message_send_many(data, &network, &texts)?;
                if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
                    println!("{first}\n{last}");
                }
            }
        }
        MessageCommand::List { network, json } => {
            let list = commands::message_list(data, &network)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("serialises")
                );
            } else {
                for m in &list {
                    // The text is a peer's to choose; an author from before
                    // signatures was too, and is marked `?`.
                    let mark = if m.verified { " " } else { "?" };
                    let reactions: String = m
                        .reactions
                        .iter()
                        .map(|r| format!("  {} {}", terminal::printable(&r.emoji), r.count))
                        .collect();
                    println!(
                        "{}  {}{mark} {}{reactions}",
                        m.created_ms,
                        terminal::short(&m.author, 12),
                        terminal::printable(&m.text)
                    );
                }
            }
        }
    }
    Ok(())
}

fn event(data: &Path, command: EventCommand) -> Result<(), String> {
    match command {
        EventCommand::Send {
            network,
            event_type,
            content,
            file,
            deps,
        } => {
            let content =
                commands::read_input(content.as_deref(), file.as_deref(), "the event content")?;
            println!(
                "{}",
                commands::event_send(data, &network, &event_type, &content, &deps)?
            );
        }
        EventCommand::List {
            network,
            event_type,
            limit,
            json,
        } => {
            let list = commands::event_list(data, &network, event_type.as_deref(), limit)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("serialises")
                );
            } else {
                for e in &list {
                    println!("{}", event_line(e));
                }
            }
        }
    }
    Ok(())
}

/// One line of `event list`. The content and a legacy event's claimed
/// author are a peer's to choose: serde_json escapes what is below U+0020,
/// and `printable` the rest that acts on a terminal.
fn event_line(e: &commands::ListedEvent) -> String {
    let head = format!(
        "{}  {}  {}",
        e.created_ms,
        e.event_id,
        terminal::printable(&e.event_type)
    );
    if let Some(error) = &e.error {
        return format!("{head}  error: {}", terminal::printable(error));
    }
    let (author, mark) = match (&e.author, &e.claimed_author) {
        (Some(a), _) => (terminal::short(a, 12), " "),
        (None, Some(claimed)) => (terminal::short(claimed, 12), "?"),
        (None, None) => ("".into(), "?"),
    };
    let content = serde_json::to_string(&e.content).expect("serialises");
    let deps = match e.deps.len() {
        1 => "1 dep".to_string(),
        n => format!("{n} deps"),
    };
    format!(
        "{head}  {author}{mark} {deps}  {}",
        terminal::printable(&content)
    )
}

fn run(
    data_dir: PathBuf,
    plugins_dir: Option<PathBuf>,
    jobs_path: PathBuf,
    listen: Option<String>,
    call_budget: Duration,
) -> Result<(), String> {
    let plugins_dir = match plugins_dir {
        Some(dir) => dir,
        None => {
            let dir = data_dir.join("plugins");
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dir
        }
    };
    // A file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) then fails
    // the write, which the engine reports as it reports a full disk, instead
    // of killing the host in the middle of a commit.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let running = host::start(&host::HostOptions {
        data_dir,
        plugins_dir,
        jobs_path,
        listen,
        call_budget,
    })
    .map_err(|e| e.to_string())?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down: finishing work in hand");
    }
    running.shutdown();
    tracing::info!("stopped");
    Ok(())
}

fn check(file: &Path) -> Result<(), String> {
    // A fresh folder of random name, 0700: one whose name others could
    // guess, they could make first, and plant a library in.
    let cache = tempfile::Builder::new()
        .prefix("quiet-host-check-")
        .tempdir()
        .map_err(|e| format!("a temporary folder: {e}"))?;
    let result = loader::load(file, cache.path(), 1);
    let plugin = result.map_err(|e| e.to_string())?;
    println!(
        "{}: ok: plugin '{}' {} (plugin ABI {}), {} migration(s), handlers:",
        file.display(),
        plugin.name,
        plugin.version,
        quiet_plugin_api::ABI_VERSION,
        plugin.migrations.len()
    );
    for h in &plugin.handlers {
        let types = if h.event_types.is_empty() {
            "(jobs only)".to_string()
        } else {
            h.event_types.join(", ")
        };
        println!("  {:<20} {types}", h.name);
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
