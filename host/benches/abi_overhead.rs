//! Per-envelope overhead of the plugin boundary.
//!
//! The same handler, the `echo` test plugin, is called two ways:
//! - `direct_rust_call`: `Echo` linked in as an rlib and called as a plain
//!   Rust function;
//! - `through_abi`: the same code built as a cdylib, loaded with
//!   [`quiet_host::plugins::loader::load`] and called through `LoadedHandler`,
//!   the path the pipeline takes (abi_stable trait object, `catch_unwind`
//!   guard, `RResult`/`RVec` conversions, deallocation through the plugin's
//!   vtable).
//!
//! Each iteration is one envelope: `filter`, then `process`, then dropping
//! the produced envelope. Both paths clone the 1 KiB payload into a fresh
//! envelope, so allocation is paid on both sides and the difference between
//! the two medians is the boundary's cost. The `filter_only_*` pair measures
//! the crossing alone, with no allocation.
//!
//! The dlopen'ed plugin is built with `cargo build --release`, so that both
//! sides run the same optimised code (`cargo bench` compiles the rlib with the
//! bench profile, which inherits release). Set `QUIET_BENCH_DEBUG_PLUGIN=1`
//! to load the debug build from `quiet_test_support::plugin` instead; that
//! measures an unoptimised plugin, not the boundary.
//!
//! Run with `cargo bench -p quiet-host --bench abi_overhead`. Figures are in
//! `BENCHMARKS.md`.

use std::{path::PathBuf, time::Duration};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use echo::Echo;
use quiet_host::{
    plugins::{context::HostContext, loader},
    storage::statements::Statements,
};
use quiet_plugin_api::{envelope, Context, Envelope, FilterContext, Handler, Identity, Value};
use rusqlite::Connection;

fn plugin_library() -> PathBuf {
    if std::env::var_os("QUIET_BENCH_DEBUG_PLUGIN").is_some() {
        quiet_test_support::plugin("echo-plugin", "v1")
    } else {
        quiet_test_support::release_plugin("echo-plugin")
    }
}

fn ping() -> Envelope {
    envelope! {
        "event_type" => "ping",
        "request_id" => "r-1",
        "seq" => 7,
        "payload" => vec![0u8; 1024],
    }
}

fn envelope_through_handler(c: &mut Criterion) {
    let library = plugin_library();
    let cache = tempfile::tempdir().expect("cache dir");
    let plugin = loader::load(&library, cache.path(), 1).expect("loading the echo plugin");
    let handler = plugin
        .handlers
        .iter()
        .find(|h| h.name == "echo")
        .expect("the echo plugin has an echo handler")
        .clone();

    let conn = Connection::open_in_memory().expect("in-memory database");
    conn.execute_batch("BEGIN").expect("BEGIN");
    let identity = Identity::default();
    let statements = Statements::new(&conn);
    let mut host = HostContext::new(&statements, &plugin.name, &identity, None);
    let env = ping();
    // A plugin's settings as the pipeline lends them, whether jobs.yaml
    // gives any or not.
    let settings = Value::EMPTY_MAP;
    let no_settings = FilterContext::new(settings);

    // Both paths must do the same work before their times are compared.
    let direct = Echo
        .process(&env, &mut Context::new(host.as_abi(), settings))
        .expect("direct process");
    let abi = handler
        .process(&env, &mut host, settings)
        .expect("abi process");
    assert_eq!(direct.as_slice(), abi.as_slice());
    assert_eq!(direct.len(), 1);
    assert_eq!(direct[0].bytes("payload").map(<[u8]>::len), Some(1024));
    assert!(Echo.filter(&env, &no_settings) && handler.filter(&env, settings).expect("abi filter"));

    let mut group = c.benchmark_group("envelope_through_handler");
    group.measurement_time(Duration::from_secs(8));

    group.bench_function("direct_rust_call", |b| {
        b.iter(|| {
            let env = black_box(&env);
            if Echo.filter(env, &no_settings) {
                let out = Echo
                    .process(env, &mut Context::new(host.as_abi(), settings))
                    .expect("direct process");
                drop(black_box(out));
            }
        })
    });

    group.bench_function("through_abi", |b| {
        b.iter(|| {
            let env = black_box(&env);
            if handler.filter(env, settings).expect("abi filter") {
                let out = handler
                    .process(env, &mut host, settings)
                    .expect("abi process");
                drop(black_box(out));
            }
        })
    });

    group.bench_function("filter_only_direct", |b| {
        b.iter(|| black_box(Echo.filter(black_box(&env), &no_settings)))
    });

    group.bench_function("filter_only_abi", |b| {
        b.iter(|| {
            black_box(
                handler
                    .filter(black_box(&env), settings)
                    .expect("abi filter"),
            )
        })
    });

    group.finish();
}

criterion_group!(benches, envelope_through_handler);
criterion_main!(benches);
