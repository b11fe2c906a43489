//! The `quiet-host` command line.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use quiet_host::{host, loader, status};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

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
        /// Data folder: database, identity key, lock.
        #[arg(long = "data", env = "QUIET_DATA", default_value = "data")]
        data_dir: PathBuf,
        /// Plugin folder, watched for libraries [default: <data>/plugins].
        #[arg(long = "plugins", env = "QUIET_PLUGINS")]
        plugins_dir: Option<PathBuf>,
        /// Job configuration, watched for edits.
        #[arg(long = "jobs", env = "QUIET_JOBS", default_value = "jobs.yaml")]
        jobs_path: PathBuf,
    },
    /// Show plugins, jobs and dead letters of a host (running or not).
    Status {
        /// Data folder of the host.
        #[arg(long = "data", env = "QUIET_DATA", default_value = "data")]
        data_dir: PathBuf,
        /// Print JSON (stable schema, see the README).
        #[arg(long)]
        json: bool,
        /// How many recent dead letters to show.
        #[arg(long, default_value_t = 5)]
        dead_letters: usize,
    },
    /// Work with plugin libraries.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Say whether a library would load in this host, and why not.
    Check {
        /// The library file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run {
            data_dir,
            plugins_dir,
            jobs_path,
        } => run(data_dir, plugins_dir, jobs_path),
        Command::Status {
            data_dir,
            json,
            dead_letters,
        } => status::read(&data_dir, dead_letters).map(|s| {
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(data_dir: PathBuf, plugins_dir: Option<PathBuf>, jobs_path: PathBuf) -> Result<(), String> {
    let plugins_dir = match plugins_dir {
        Some(dir) => dir,
        None => {
            let dir = data_dir.join("plugins");
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dir
        }
    };
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let running = host::start(&host::HostOptions {
        data_dir,
        plugins_dir,
        jobs_path,
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
    let cache = tempfile_dir()?;
    let result = loader::load(file, &cache, 1);
    let _ = std::fs::remove_dir_all(&cache);
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

fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("quiet-host-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
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
