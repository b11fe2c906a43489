//! The operator's command line: every error is one line that says what,
//! where and what to do, and exits 2; the demo runs from start to finish.

use std::{
    fs,
    io::Write,
    net::TcpListener,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use quiet_test_support::{plugin, wait_for, HostDirs};

use crate::{
    bin, one_line_error, query_i64,
    sync::{cli, create_network, sync_host, synced_pair},
};

fn quiet(args: &[&str], data: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap()
}

#[test]
fn a_bad_invite_is_named_and_nothing_is_joined() {
    let dir = tempfile::tempdir().unwrap();
    let out = quiet(
        &["network", "join", "quiet2:not-really-an-invite"],
        dir.path(),
    );
    one_line_error(&out, &["not a valid invite", "copy the whole line"]);
    let out = quiet(&["network", "join", "hello"], dir.path());
    one_line_error(&out, &["does not start with quiet2:"]);
    let list = quiet(&["network", "list", "--json"], dir.path());
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
}

#[test]
fn a_port_in_use_is_refused_with_what_to_do() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dirs = HostDirs::new("jobs: []\n");
    let out = dirs
        .run_command(&bin())
        .args(["--listen", &port])
        .output()
        .unwrap();
    one_line_error(
        &out,
        &[
            &format!("cannot listen on {port}"),
            "port is in use",
            "--listen",
        ],
    );
}

#[test]
fn a_damaged_or_exposed_identity_is_refused() {
    let dirs = HostDirs::new("jobs: []\n");
    fs::create_dir_all(&dirs.data).unwrap();
    let key = dirs.data.join("identity.key");
    fs::write(&key, b"short").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let run = |dirs: &HostDirs| dirs.run_command(&bin()).output().unwrap();
    one_line_error(
        &run(&dirs),
        &["identity.key", "not an identity key", "32 bytes"],
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::write(&key, [7u8; 32]).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        one_line_error(
            &run(&dirs),
            &["identity.key", "readable by others", "chmod 600"],
        );
    }
}

#[test]
fn status_of_a_folder_with_no_host_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = quiet(&["status"], dir.path());
    one_line_error(&out, &["no quiet-host database here", "quiet-host run"]);
}

#[test]
fn an_incompatible_plugin_is_refused_by_plugins_check() {
    let mismatch = plugin("abi-mismatch-plugin", "v1");
    let out = Command::new(bin())
        .args(["plugins", "check"])
        .arg(&mismatch)
        .output()
        .unwrap();
    one_line_error(&out, &["incompatible plugin-api", "rebuild it"]);
    // One built before signed events, against plugin-api 0.1.
    let old = plugin("abi-mismatch-plugin", "plugin-api-0.1");
    let out = Command::new(bin())
        .args(["plugins", "check"])
        .arg(&old)
        .output()
        .unwrap();
    one_line_error(
        &out,
        &["built against plugin-api 0.1.0, but this host uses plugin-api 0.2.0; rebuild the plugin"],
    );
    let good = plugin("ticker-plugin", "v1");
    let out = Command::new(bin())
        .args(["plugins", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: plugin 'ticker'"));
}

#[test]
fn version_names_the_plugin_abi() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("plugin ABI {}", quiet_plugin_api::ABI_VERSION)),
        "{text}"
    );
}

#[test]
fn the_demo_runs_three_hosts_to_the_end_and_leaves_nothing_running() {
    let libs = tempfile::tempdir().unwrap();
    for (package, name) in [
        ("quiet-sync-plugin", "sync"),
        ("quiet-messages-plugin", "messages"),
        ("quiet-retention-plugin", "retention"),
    ] {
        let to = libs
            .path()
            .join(format!("lib{name}.{}", std::env::consts::DLL_EXTENSION));
        fs::copy(plugin(package, "v1"), to).unwrap();
    }
    let out = Command::new(bin())
        .args(["demo", "--keep", "--plugins-from"])
        .arg(libs.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "converged: all three hosts list the same 15 messages",
        "loaded messages generation 2",
        "applied the new frequency",
        "converged again on 18 messages",
        "done",
    ] {
        assert!(stdout.contains(step), "{step:?} missing from:\n{stdout}");
    }
    // Every host was stopped: their data folders are free to lock again.
    let kept = stdout
        .lines()
        .find_map(|l| l.strip_prefix("data folders kept in "))
        .expect("the kept folder is named");
    for host in ["A", "B", "C"] {
        let data = Path::new(kept).join(host).join("data");
        assert_eq!(
            quiet_host::cli::host::running_pid(&data),
            None,
            "host {host} still running"
        );
    }
    fs::remove_dir_all(kept).unwrap();
}

#[test]
fn logs_can_be_json_lines() {
    let dirs = HostDirs::new("jobs: []\n");
    let host =
        quiet_test_support::HostProcess::start_with(&bin(), &dirs, &["--log-format", "json"]);
    let line = host.wait_log("quiet-host running", std::time::Duration::from_secs(5));
    let json: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(json["level"], "INFO");
    assert_eq!(json["fields"]["message"], "quiet-host running");
    assert!(json["fields"]["peer_id"]
        .as_str()
        .is_some_and(|p| p.len() == 64));
    host.stop();
}

/// Runs a CLI command on a data folder with `stdin` as its standard input.
fn quiet_with_stdin(args: &[&str], data: &Path, stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .arg("--data")
        .arg(data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A network made in a folder whose host has never run: the invite names
/// a made-up address.
fn offline_network(data: &Path) -> (String, String) {
    let invite = cli(data, &["network", "create", "--address", "127.0.0.1:7001"]);
    let network = quiet_host::storage::networks::Invite::decode(&invite)
        .unwrap()
        .network_id;
    (invite, network)
}

#[test]
fn a_message_over_the_event_limit_is_refused_when_sent_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (_, net) = offline_network(dir.path());
    let text = fs::File::create(dir.path().join("long.txt"))
        .and_then(|mut f| f.write_all("x".repeat(70_000).as_bytes()))
        .map(|()| dir.path().join("long.txt"))
        .unwrap();
    let out = quiet(
        &["message", "send", &net, "--file", text.to_str().unwrap()],
        dir.path(),
    );
    one_line_error(
        &out,
        &["over the limit of 65536 bytes", "shorten it by at least"],
    );
    assert!(out.stdout.is_empty(), "an id was printed for it");
    assert_eq!(
        query_i64(dir.path(), "SELECT COUNT(*) FROM submissions"),
        Some(0)
    );
    // One that fits is taken, and gets its id.
    let ok = quiet(&["message", "send", &net, &"x".repeat(60_000)], dir.path());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        query_i64(dir.path(), "SELECT COUNT(*) FROM submissions"),
        Some(1)
    );
}

#[test]
fn message_texts_and_invites_can_come_from_standard_input_or_a_file() {
    let (a_dirs, a) = sync_host();
    let (invite, net) = create_network(&a_dirs.data);
    let out = quiet_with_stdin(
        &["message", "send", &net, "-"],
        &a_dirs.data,
        "from stdin, with a line break\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = a_dirs.data.join("text.txt");
    fs::write(&file, "from a file\nof two lines\n").unwrap();
    let out = quiet(
        &["message", "send", &net, "--file", file.to_str().unwrap()],
        &a_dirs.data,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let texts = wait_for(Duration::from_secs(20), || {
        let list = cli(&a_dirs.data, &["message", "list", &net, "--json"]);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let texts: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect();
        (texts.len() == 2).then_some(texts)
    })
    .unwrap_or_else(|| panic!("not projected; log:\n{}", a.log().join("\n")));
    assert!(
        texts.contains(&"from stdin, with a line break".to_string()),
        "{texts:?}"
    );
    assert!(
        texts.contains(&"from a file\nof two lines".to_string()),
        "{texts:?}"
    );

    // Invites too: the secret never has to be an argument.
    let b = tempfile::tempdir().unwrap();
    let out = quiet_with_stdin(&["network", "join", "-"], b.path(), &format!("{invite}\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = tempfile::tempdir().unwrap();
    let invite_file = c.path().join("invite");
    fs::write(&invite_file, &invite).unwrap();
    let out = quiet(
        &["network", "join", "--file", invite_file.to_str().unwrap()],
        &c.path().join("data"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for data in [b.path().to_path_buf(), c.path().join("data")] {
        assert!(cli(&data, &["network", "list"]).starts_with(&net));
    }
    // Neither an argument nor a file: say how to give one.
    let out = quiet(&["message", "send", &net], &a_dirs.data);
    one_line_error(&out, &["give the message text", "--file"]);
}

#[test]
fn network_join_names_an_invite_with_one_character_changed_as_damaged() {
    let a = tempfile::tempdir().unwrap();
    let (invite, _) = offline_network(a.path());
    let b = tempfile::tempdir().unwrap();
    // The middle of the line, where a slip of the hand would land.
    let at = invite.len() / 2;
    let swapped = if invite.as_bytes()[at] == b'A' {
        "B"
    } else {
        "A"
    };
    let damaged = format!("{}{swapped}{}", &invite[..at], &invite[at + 1..]);
    let out = quiet(&["network", "join", &damaged], b.path());
    one_line_error(&out, &["not a valid invite", "damaged"]);
    let list = quiet(&["network", "list", "--json"], b.path());
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_data_folder_is_private_and_a_missing_or_exposed_key_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    // A host that has stored a message: its folder, database and WAL, the
    // files that hold decrypted text, are its owner's alone.
    let (dirs, host) = sync_host();
    let (_, net) = create_network(&dirs.data);
    cli(&dirs.data, &["message", "send", &net, "hello"]);
    wait_for(Duration::from_secs(20), || {
        (query_i64(&dirs.data, "SELECT COUNT(*) FROM messages") == Some(1)).then_some(())
    })
    .expect("the message was not stored");
    assert_eq!(mode(&dirs.data), 0o700);
    for file in ["quiet.db", "quiet.db-wal", "quiet.db-shm", "identity.key"] {
        assert_eq!(mode(&dirs.data.join(file)), 0o600, "{file}");
    }
    host.stop();

    // A folder made by an older build, open to all, is closed on next use.
    fs::set_permissions(&dirs.data, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        dirs.data.join("quiet.db"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    cli(&dirs.data, &["message", "send", &net, "again"]);
    assert_eq!(mode(&dirs.data), 0o700);
    assert_eq!(mode(&dirs.data.join("quiet.db")), 0o600);

    // A network key others can read is refused, by the host and the CLI.
    let key = dirs.data.join(format!("keys/{net}.key"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let run = dirs.run_command(&bin()).output().unwrap();
    one_line_error(
        &run,
        &[&format!("{net}.key"), "readable by others", "chmod 600"],
    );
    let send = quiet(&["message", "send", &net, "exposed"], &dirs.data);
    one_line_error(&send, &["readable by others"]);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    // A folder that holds networks but lost its identity is not given a new
    // one: that would be another peer, a stranger to the network.
    let before = fs::read(dirs.data.join("identity.key")).unwrap();
    fs::remove_file(dirs.data.join("identity.key")).unwrap();
    let run = dirs.run_command(&bin()).output().unwrap();
    one_line_error(&run, &["identity.key is missing", "restore the key"]);
    let send = quiet(&["message", "send", &net, "stranger"], &dirs.data);
    one_line_error(&send, &["identity.key is missing"]);
    assert!(!dirs.data.join("identity.key").exists());
    fs::write(dirs.data.join("identity.key"), before).unwrap();
}

#[test]
fn commands_that_only_read_never_create_a_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for args in [
        &["status"][..],
        &["network", "list"],
        &["message", "list", "0123456789abcdef0123456789abcdef"],
    ] {
        let out = quiet(args, &missing);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // An empty folder stays empty: no database appears in it.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let list = quiet(&["network", "list", "--json"], &empty);
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
    let out = quiet(
        &["message", "list", "0123456789abcdef0123456789abcdef"],
        &empty,
    );
    one_line_error(&out, &["no quiet-host database here"]);
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);
}

/// Queues, as a member gone bad would through the host's own library, a
/// `message` event whose text it chose, signed by the host in `data`.
fn queue_crafted_message(data: &Path, network: &str, text: &str) {
    use quiet_host::{
        crypto::identity::HostIdentity,
        encoding::codec,
        storage::{event_store::EventStore, networks::NetworkKeys},
    };
    use quiet_plugin_api::Value;
    let store = EventStore::new(
        std::sync::Arc::new(NetworkKeys::new(data)),
        Default::default(),
    );
    let me = HostIdentity::load(data).unwrap();
    let content = Value::map([("text", Value::from(text))]);
    let (_, envelope) = store
        .new_local_event(me.signing(), network, "message", &content, &[])
        .unwrap();
    quiet_host::storage::db::open(data)
        .unwrap()
        .execute(
            "INSERT INTO submissions(envelope, submitted_ms) VALUES (?1, 0)",
            [codec::encode_envelope(&envelope)],
        )
        .unwrap();
}

#[test]
fn fields_a_peer_chose_never_crash_or_rewrite_the_terminal() {
    let (dirs, host) = sync_host();
    let (_, net) = create_network(&dirs.data);
    // A text that would clear the line and forge another.
    let forged = "hi\r\x1b[2Kquiet-host running (pid 1)\nDEAD LETTERS (0 total)\u{202e}";
    queue_crafted_message(&dirs.data, &net, forged);
    wait_for(Duration::from_secs(20), || {
        (query_i64(&dirs.data, "SELECT COUNT(*) FROM messages") == Some(1)).then_some(())
    })
    .unwrap_or_else(|| panic!("not projected; log:\n{}", host.log().join("\n")));
    // Authors are verified signers now, but messages projected before
    // signatures kept the author their sender claimed: a one-letter one
    // (`message list` cut every author to 12 bytes and panicked) and one
    // of multi-byte characters.
    let db = quiet_host::storage::db::open(&dirs.data).unwrap();
    for (i, author) in ["x", "ééé"].iter().enumerate() {
        db.execute(
            "INSERT INTO messages (event_id, network_id, author, text, created_ms, verified) \
             VALUES (?1, ?2, ?3, 'old', 1, 0)",
            rusqlite::params![vec![i as u8; 32], net, author],
        )
        .unwrap();
    }
    let list = quiet(&["message", "list", &net], &dirs.data);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8(list.stdout).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(!text.contains(['\x1b', '\r', '\u{202e}']), "{text:?}");
    assert!(
        text.contains("\\u{1b}[2Kquiet-host running (pid 1)\\nDEAD LETTERS"),
        "{text}"
    );
    // Claimed authors are marked `?`; the signer is this host.
    assert!(text.contains("  x? ") && text.contains("  ééé? "), "{text}");
    let me = &quiet_host::crypto::identity::HostIdentity::load(&dirs.data)
        .unwrap()
        .peer_id()[..12];
    assert!(text.contains(&format!("  {me}  hi")), "{text}");
    // The JSON form keeps the text as it was written.
    let json = quiet(&["message", "list", &net, "--json"], &dirs.data);
    let json = String::from_utf8_lossy(&json.stdout);
    assert!(json.contains("\\u001b[2K"), "{json}");
    assert!(json.contains("\"verified\": false"), "{json}");

    // A dead letter's reason comes from a handler's error, which may quote
    // what a peer sent: status prints it on its one line.
    quiet_host::storage::db::open(&dirs.data)
        .unwrap()
        .execute(
            "INSERT INTO dead_letters(at_ms, plugin, handler, reason, envelope) \
             VALUES (0, 'p', 'h', ?1, '{}')",
            ["bad\n  #1 forged line\x1b[1A"],
        )
        .unwrap();
    let status = quiet(&["status"], &dirs.data);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status = String::from_utf8(status.stdout).unwrap();
    assert!(!status.contains('\x1b'), "{status:?}");
    assert!(
        status.contains("bad\\n  #1 forged line\\u{1b}[1A"),
        "{status}"
    );
}

#[test]
fn status_lists_traffic_apart_from_drops_and_a_stopped_hosts_jobs_run_at_start() {
    let (a_dirs, a, _b_dirs, b, _) = synced_pair();
    wait_for(Duration::from_secs(10), || {
        (query_i64(
            &a_dirs.data,
            "SELECT value FROM counters WHERE name = 'net_bytes_sent'",
        )
        .is_some())
        .then_some(())
    })
    .expect("no traffic counted");
    let status = String::from_utf8(quiet(&["status"], &a_dirs.data).stdout).unwrap();
    let section = |title: &str| -> String {
        status
            .split(&format!("\n{title}\n"))
            .nth(1)
            .map(|rest| rest.split("\n\n").next().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    assert!(section("TRAFFIC").contains("net_bytes_sent"), "{status}");
    assert!(!section("DROPPED").contains("net_"), "{status}");
    assert!(section("JOBS").contains("sync_with_peers"), "{status}");
    a.stop();
    b.stop();
    let stopped = String::from_utf8(quiet(&["status"], &a_dirs.data).stdout).unwrap();
    let job = stopped
        .lines()
        .find(|l| l.trim_start().starts_with("sync_with_peers"))
        .unwrap_or_else(|| panic!("{stopped}"));
    assert!(job.trim_end().ends_with("at start"), "{job}");
}

/// `event list NETWORK [--type T] --json` of a data folder, parsed.
fn event_list_json(data: &Path, network: &str, event_type: Option<&str>) -> Vec<serde_json::Value> {
    let by_type: Vec<&str> = event_type.iter().flat_map(|t| ["--type", t]).collect();
    event_list_json_with(data, network, &by_type)
}

/// `event list NETWORK --json` with more `options`, parsed.
fn event_list_json_with(data: &Path, network: &str, options: &[&str]) -> Vec<serde_json::Value> {
    let args = [&["event", "list", network, "--json"][..], options].concat();
    let json: serde_json::Value = serde_json::from_str(&cli(data, &args)).unwrap();
    json.as_array().unwrap().clone()
}

fn peer_id(data: &Path) -> String {
    quiet_host::crypto::identity::HostIdentity::load(data)
        .unwrap()
        .peer_id()
}

/// The trimmed stdout of a command that must succeed.
fn succeeded(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn event_send_takes_json_from_an_argument_a_file_or_stdin_and_event_list_reads_it_back() {
    let (dirs, host) = sync_host();
    let (_, net) = create_network(&dirs.data);
    let from_arg = cli(
        &dirs.data,
        &[
            "event",
            "send",
            &net,
            "note",
            r#"{"text": "from an argument", "n": 1, "f": 1.0, "raw": {"$bytes": "00ff"}}"#,
        ],
    );
    let file = dirs.data.join("note.json");
    fs::write(&file, "{\"text\": \"from a file\"}\n").unwrap();
    let from_file = cli(
        &dirs.data,
        &[
            "event",
            "send",
            &net,
            "note",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    let from_stdin = succeeded(quiet_with_stdin(
        &["event", "send", &net, "note", "-", "--dep", &from_arg],
        &dirs.data,
        "{\"text\": \"from stdin\"}\n",
    ));
    // `message send` is the same path, for one type: a text that would
    // clear the line and forge another.
    let hostile = "hi\r\x1b[2Kquiet-host running (pid 1)\nDEAD LETTERS\u{202e}\u{7f}";
    cli(&dirs.data, &["message", "send", &net, hostile]);
    wait_for(Duration::from_secs(20), || {
        (crate::sync::events(&dirs.data, &net) == 4).then_some(())
    })
    .unwrap_or_else(|| panic!("not stored; log:\n{}", host.log().join("\n")));

    let me = peer_id(&dirs.data);
    let notes = event_list_json(&dirs.data, &net, Some("note"));
    let ids: Vec<&str> = notes
        .iter()
        .map(|n| n["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&from_arg, &from_file, &from_stdin], "oldest first");
    // Integers, floats and bytes come back as they were sent.
    assert_eq!(
        notes[0]["content"],
        serde_json::json!({"text": "from an argument", "n": 1, "f": 1.0, "raw": {"$bytes": "00ff"}})
    );
    assert_eq!(
        notes[1]["content"],
        serde_json::json!({"text": "from a file"})
    );
    assert_eq!(
        notes[2]["content"],
        serde_json::json!({"text": "from stdin"})
    );
    assert_eq!(notes[2]["deps"], serde_json::json!([from_arg]));
    for n in &notes {
        assert_eq!(n["author"], me.as_str(), "{n}");
        assert_eq!(n["event_type"], "note");
        assert_eq!(n["legacy"], false);
        assert!(n.get("error").is_none(), "{n}");
    }
    // --limit keeps the newest, still oldest first, with or without a type.
    let newest = |options: &[&str]| -> Vec<String> {
        let listed = event_list_json_with(&dirs.data, &net, options);
        listed
            .iter()
            .map(|n| n["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        newest(&["--type", "note", "--limit", "2"]),
        [from_file.clone(), from_stdin.clone()]
    );
    assert_eq!(newest(&["--limit", "0"]), Vec::<String>::new());
    // The four, and the network's genesis.
    assert_eq!(newest(&["--limit", "9"]).len(), 5);
    assert_eq!(newest(&["--limit", "1"]).len(), 1);
    // The JSON form keeps the text as written.
    let messages = event_list_json(&dirs.data, &net, Some("message"));
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["content"]["text"], hostile);

    // The text form: one line an event, nothing that acts on a terminal.
    let text = cli(&dirs.data, &["event", "list", &net]);
    // The four, and the network's genesis.
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(
        !text.contains(['\x1b', '\r', '\u{202e}', '\u{7f}']),
        "{text:?}"
    );
    let line = |id: &str| text.lines().find(|l| l.contains(id)).unwrap().to_owned();
    assert!(
        line(&from_stdin).ends_with(&format!(
            "  {from_stdin}  note  {}  1 dep  {{\"text\":\"from stdin\"}}",
            &me[..12]
        )),
        "{text}"
    );
    assert!(
        text.contains(
            r#"{"text":"hi\r\u001b[2Kquiet-host running (pid 1)\nDEAD LETTERS\u{202e}\u{7f}"}"#
        ),
        "{text}"
    );
    host.stop();
}

#[test]
fn event_send_refuses_what_no_host_would_store_in_one_line_and_queues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, net) = offline_network(dir.path());
    let long = dir.path().join("long.json");
    fs::write(&long, format!("{{\"text\": \"{}\"}}", "x".repeat(70_000))).unwrap();
    let many_deps: Vec<String> = (0..17)
        .flat_map(|i| ["--dep".to_owned(), format!("{i:064x}")])
        .collect();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (
            vec!["note", r#"{"type": "message"}"#],
            &["may not have the key `type`"],
        ),
        (
            vec!["note", r#"{"author": "me"}"#],
            &["may not have the key `author`"],
        ),
        (vec!["note", r#"{"created_ms": 1}"#], &["`created_ms`"]),
        (vec!["note", r#"{"deps": []}"#], &["`deps`"]),
        (
            vec!["note", "[1, 2]"],
            &["must be a JSON object", "not an array"],
        ),
        (
            vec!["note", "\"hi\""],
            &["must be a JSON object", "not a string"],
        ),
        (
            vec!["note", "{\"text\": "],
            &["the event content is not JSON"],
        ),
        (
            vec!["note", r#"{"n": [18446744073709551615]}"#],
            &["at .n[0]", "beyond the 64-bit range"],
        ),
        (
            vec!["note", "--file", long.to_str().unwrap()],
            &["over the limit of 65536 bytes", "shorten it by at least"],
        ),
        (
            vec!["bad type", "{}"],
            &["\"bad type\" is not an event type"],
        ),
        (
            vec!["two\nlines", "{}"],
            &["\"two\\nlines\" is not an event type"],
        ),
        (
            vec!["quiet.remove", "{}"],
            &["\"quiet.remove\": types that begin with \"quiet.\" are the host's own"],
        ),
        (
            [
                vec!["note", "{}"],
                many_deps.iter().map(String::as_str).collect(),
            ]
            .concat(),
            &["at most 16 deps"],
        ),
        (
            vec!["note", "{}", "--dep", "abc"],
            &["--dep \"abc\" is not an event id"],
        ),
        (vec!["note"], &["give the event content", "--file"]),
    ];
    for (args, needles) in cases {
        let out = quiet(&[&["event", "send", &net][..], &args].concat(), dir.path());
        one_line_error(&out, needles);
        assert!(out.stdout.is_empty(), "{args:?} printed an id");
    }
    assert_eq!(
        query_i64(dir.path(), "SELECT COUNT(*) FROM submissions"),
        Some(0)
    );
    // `event list` refuses a bad type as `event send` does.
    one_line_error(
        &quiet(&["event", "list", &net, "--type", "a b"], dir.path()),
        &["\"a b\" is not an event type"],
    );
    // One that fits is taken, and gets its id.
    let id = succeeded(quiet(&["event", "send", &net, "note", "{}"], dir.path()));
    assert_eq!(id.len(), 64, "{id}");
    assert_eq!(
        query_i64(dir.path(), "SELECT COUNT(*) FROM submissions"),
        Some(1)
    );
}

#[test]
fn event_list_shows_a_row_that_fails_as_an_error_and_legacy_events_as_unverified() {
    use quiet_host::{
        crypto::{event_crypto, signed_event},
        encoding::codec,
        storage::{event_store::EventStore, networks::NetworkKeys},
    };
    use quiet_plugin_api::{field, Value};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_, net) = offline_network(data);
    let keys = NetworkKeys::new(data);
    let key = keys.get(&net).unwrap();
    let store = EventStore::new(std::sync::Arc::new(keys), Default::default());
    let me = quiet_host::crypto::identity::HostIdentity::load(data).unwrap();
    let conn = quiet_host::storage::db::open(data).unwrap();
    let insert = |table: &str, id: &[u8], created_ms: i64, event_type: &str, event: &[u8]| {
        let routed = if table == "legacy_events" { ", 1" } else { "" };
        let columns = if table == "legacy_events" {
            ", routed"
        } else {
            ""
        };
        conn.execute(
            &format!(
                "INSERT INTO {table} (event_id, network_id, created_ms, event_type, event, received_ms{columns})
                 VALUES (?1, ?2, ?3, ?4, ?5, 0{routed})"
            ),
            rusqlite::params![id, net, created_ms, event_type, event],
        )
        .unwrap();
    };
    // A legacy message, from before signatures: its author is what its
    // sender wrote.
    let plaintext = Value::map([
        ("type", Value::from("message")),
        ("author", Value::from("claimed-bob")),
        ("created_ms", Value::from(1_000)),
        ("text", Value::from("old")),
    ]);
    let legacy = event_crypto::encrypt_event(&key, 1_000, &codec::encode(&plaintext));
    insert(
        "legacy_events",
        &event_crypto::event_id(&legacy),
        1_000,
        "message",
        &legacy,
    );
    // Signed events, as the store would hold them; one has its signature
    // changed on disk, one is stored under a type it was not signed as.
    let mut signed = Vec::new();
    for text in ["intact", "signature changed", "type changed"] {
        let content = Value::map([("text", Value::from(text))]);
        let (id, envelope) = store
            .new_local_event(me.signing(), &net, "note", &content, &[])
            .unwrap();
        let event = envelope.bytes(field::EVENT_CIPHERTEXT).unwrap().to_vec();
        signed.push((id, event));
        std::thread::sleep(Duration::from_millis(2));
    }
    let created = |event: &[u8]| i64::from_be_bytes(event[..8].try_into().unwrap());
    let (intact, bad_signature, bad_type) = (&signed[0], &signed[1], &signed[2]);
    insert("events", &intact.0, created(&intact.1), "note", &intact.1);
    let mut inner = signed_event::open_inner(&key, &bad_signature.1).unwrap();
    inner[0] ^= 1;
    let resealed = signed_event::seal_inner(&key, created(&bad_signature.1), &inner);
    insert(
        "events",
        &bad_signature.0,
        created(&resealed),
        "note",
        &resealed,
    );
    insert(
        "events",
        &bad_type.0,
        created(&bad_type.1),
        "message",
        &bad_type.1,
    );
    // And an intact event copied under an id that is not its own.
    let later = created(&bad_type.1) + 10;
    insert("events", &[0xff; 32], later, "note", &intact.1);

    let text = cli(data, &["event", "list", &net]);
    // The network's genesis, which `network create` wrote, is listed too.
    let (genesis, lines): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.contains("  quiet.network  "));
    assert_eq!(genesis.len(), 1, "{text}");
    assert!(genesis[0].contains(&me.peer_id()[..12]), "{text}");
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[0].ends_with("  message  claimed-bob? 0 deps  {\"text\":\"old\"}"),
        "{text}"
    );
    assert!(
        lines[1].contains(&format!(
            "  {}  note  {}  0 deps",
            hex::encode(intact.0),
            &me.peer_id()[..12]
        )),
        "{text}"
    );
    assert!(
        lines[2].ends_with("  note  error: signature does not verify"),
        "{text}"
    );
    assert!(
        lines[3].ends_with("  message  error: stored as type \"message\", signed as \"note\""),
        "{text}"
    );
    assert!(
        lines[4].ends_with("  note  error: its id is not the hash of its signed body"),
        "{text}"
    );
    let json: Vec<_> = event_list_json(data, &net, None)
        .into_iter()
        .filter(|e| e["event_type"] != "quiet.network")
        .collect();
    assert_eq!(json[0]["legacy"], true);
    assert_eq!(json[0]["author"], serde_json::Value::Null);
    assert_eq!(json[0]["claimed_author"], "claimed-bob");
    assert_eq!(json[0]["content"], serde_json::json!({"text": "old"}));
    assert_eq!(json[1]["author"], me.peer_id().as_str());
    assert!(json[1].get("error").is_none(), "{}", json[1]);
    assert_eq!(json[2]["error"], "signature does not verify");
    assert_eq!(json[2]["content"], serde_json::Value::Null);
    // `--type` picks the rows by their stored type.
    let messages = event_list_json(data, &net, Some("message"));
    assert_eq!(messages.len(), 2);
}

#[test]
fn a_note_sent_on_one_host_reaches_the_event_list_of_a_synced_peer() {
    let (a_dirs, a, b_dirs, b, net) = synced_pair();
    let content = r#"{"text": "a note for b", "tags": ["x", 2]}"#;
    let id = cli(&a_dirs.data, &["event", "send", &net, "note", content]);
    let notes = wait_for(Duration::from_secs(30), || {
        let notes = event_list_json(&b_dirs.data, &net, Some("note"));
        (!notes.is_empty()).then_some(notes)
    })
    .unwrap_or_else(|| panic!("B never got A's note; log of B:\n{}", b.log().join("\n")));
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["event_id"], id.as_str());
    assert_eq!(notes[0]["author"], peer_id(&a_dirs.data).as_str());
    assert_eq!(
        notes[0]["content"],
        serde_json::from_str::<serde_json::Value>(content).unwrap()
    );
    // B lists it as A does.
    assert_eq!(notes, event_list_json(&a_dirs.data, &net, Some("note")));
    a.stop();
    b.stop();
}
