//! [`Handler`]: the trait plugin authors implement, and the ABI glue that
//! makes it safe to call from the host.
//!
//! The seed design gives a handler three calls: `filter` decides whether an
//! envelope is for it, `process` turns one envelope into more, and `run_job`
//! is what the scheduler calls when a job in `jobs.yaml` names the handler.
//! A handler also lists the event types it subscribes to, so the host only
//! crosses the ABI for envelopes the handler can want.
//!
//! All three see the plugin's settings from `jobs.yaml`: `filter` through
//! its [`FilterContext`], the others through [`Context::settings`]. Across
//! the ABI they are one more `&Value` argument of each call: the host lends
//! its own copy, taken once per unit of work, and nothing is copied per call.
//!
//! Every call into a plugin runs under `catch_unwind`: a panic becomes an
//! error value the host reports, because a panic that reached the ABI would
//! end the whole host process.

use std::{
    cell::{Cell, RefCell},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Once,
};

use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, ROk, RResult, RString, RVec},
    StableAbi,
};

use crate::{Context, Envelope, FilterContext, HostRef, PluginError, Value};

/// The subscription that matches every event type.
pub const ANY_EVENT_TYPE: &str = "*";

/// A handler, as plugin authors write it. See the [module docs](self).
///
/// ```
/// use quiet_plugin_api::{envelope, Context, Envelope, Handler, PluginError, Value};
///
/// struct Echo;
///
/// impl Handler for Echo {
///     fn name(&self) -> &str { "echo" }
///     fn event_types(&self) -> &[&str] { &["ping"] }
///     fn process(&self, env: &Envelope, _ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
///         Ok(vec![envelope! { "event_type" => "pong", "n" => env.int("n") }])
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The name `jobs.yaml` refers to in `handler:`. Unique across the plugins
    /// a host loads.
    fn name(&self) -> &str;

    /// The event types this handler wants; `"*"` ([`ANY_EVENT_TYPE`]) means all.
    /// A handler that only runs jobs returns an empty list.
    fn event_types(&self) -> &[&str];

    /// Whether to process `envelope`, which has one of the subscribed event
    /// types. Runs outside any transaction; `ctx` holds the plugin's
    /// settings ([`FilterContext::settings`]). Defaults to `true`.
    fn filter(&self, envelope: &Envelope, ctx: &FilterContext<'_>) -> bool {
        let _ = (envelope, ctx);
        true
    }

    /// Handles one envelope and returns the envelopes it produces, which the
    /// host feeds back into its pipeline.
    fn process(
        &self,
        envelope: &Envelope,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        let _ = (envelope, ctx);
        Ok(Vec::new())
    }

    /// Runs this handler's job with the `params` map from `jobs.yaml`, and
    /// returns envelopes for the pipeline. Handlers without a job keep the
    /// default, which fails with a clear message.
    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        let _ = (ctx, params);
        Err(PluginError::msg(format!(
            "handler '{}' has no run_job",
            self.name()
        )))
    }

    /// Empties what this handler projected from stored events, before the
    /// host offers it every stored event of its types again
    /// (`quiet-host plugins replay PLUGIN`). Keep state that does not come
    /// from events. The default does nothing: the replay then runs over
    /// what is there, which an idempotent projection (`INSERT OR IGNORE`
    /// on the event id) absorbs.
    fn reset(&self, ctx: &mut Context<'_>) -> Result<(), PluginError> {
        let _ = ctx;
        Ok(())
    }
}

/// What a handler declares about itself, read once when the plugin loads.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct HandlerSpec {
    /// See [`Handler::name`].
    pub name: RString,
    /// See [`Handler::event_types`].
    pub event_types: RVec<RString>,
}

/// The ABI-stable form of a [`Handler`]. Plugin authors never implement this;
/// [`crate::export_plugin!`] wraps each [`Handler`] in it.
#[sabi_trait]
pub trait AbiHandler: Send + Sync {
    /// See [`HandlerSpec`].
    fn spec(&self) -> RResult<HandlerSpec, RString>;

    /// See [`Handler::filter`]; `settings` are the plugin's.
    fn filter(&self, envelope: &Envelope, settings: &Value) -> RResult<bool, RString>;

    /// See [`Handler::process`]; `settings` are the plugin's.
    fn process<'a>(
        &self,
        envelope: &Envelope,
        host: HostRef<'a>,
        settings: &'a Value,
    ) -> RResult<RVec<Envelope>, RString>;

    /// See [`Handler::run_job`]; `settings` are the plugin's.
    #[sabi(last_prefix_field)]
    fn run_job<'a>(
        &self,
        host: HostRef<'a>,
        params: &Value,
        settings: &'a Value,
    ) -> RResult<RVec<Envelope>, RString>;

    /// See [`Handler::reset`].
    fn reset<'a>(&self, host: HostRef<'a>, settings: &'a Value) -> RResult<(), RString>;
}

/// An owned, type-erased handler as it crosses the boundary.
pub type HandlerBox = AbiHandler_TO<'static, RBox<()>>;

/// Boxes a [`Handler`] for the ABI. Used by [`crate::export_plugin!`] and by
/// in-process test harnesses.
pub fn into_abi<H: Handler>(handler: H) -> HandlerBox {
    HandlerBox::from_value(Guarded(handler), TD_Opaque)
}

/// Runs `f`, turning both its error and any panic into an error string.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, RString> {
    quiet_panics();
    let outer = IN_GUARD.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_GUARD.with(|g| g.set(outer));
    match result {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RResult::RErr(e.message().into()),
        Err(payload) => {
            let text = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| payload_text(payload.as_ref()).to_owned());
            RResult::RErr(format!("panicked: {text}").into())
        }
    }
}

thread_local! {
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that, inside a guarded call, records the
/// message and location instead of printing a backtrace to the host's
/// stderr: the host reports the panic as one line. Outside guarded calls the
/// previous hook runs as before.
fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_GUARD.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!(" (at {}:{})", l.file(), l.line()))
                    .unwrap_or_default();
                let text = format!("{}{at}", payload_text(info.payload()));
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
            } else {
                previous(info)
            }
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

struct Guarded<H>(H);

impl<H: Handler> AbiHandler for Guarded<H> {
    fn spec(&self) -> RResult<HandlerSpec, RString> {
        guarded(|| {
            Ok(HandlerSpec {
                name: self.0.name().into(),
                event_types: self
                    .0
                    .event_types()
                    .iter()
                    .map(|t| RString::from(*t))
                    .collect(),
            })
        })
    }

    fn filter(&self, envelope: &Envelope, settings: &Value) -> RResult<bool, RString> {
        guarded(|| Ok(self.0.filter(envelope, &FilterContext::new(settings))))
    }

    fn process<'a>(
        &self,
        envelope: &Envelope,
        host: HostRef<'a>,
        settings: &'a Value,
    ) -> RResult<RVec<Envelope>, RString> {
        guarded(|| {
            let mut ctx = Context::new(host, settings);
            self.0.process(envelope, &mut ctx).map(RVec::from)
        })
    }

    fn run_job<'a>(
        &self,
        host: HostRef<'a>,
        params: &Value,
        settings: &'a Value,
    ) -> RResult<RVec<Envelope>, RString> {
        guarded(|| {
            let mut ctx = Context::new(host, settings);
            self.0.run_job(&mut ctx, params).map(RVec::from)
        })
    }

    fn reset<'a>(&self, host: HostRef<'a>, settings: &'a Value) -> RResult<(), RString> {
        guarded(|| self.0.reset(&mut Context::new(host, settings)))
    }
}

#[cfg(test)]
mod tests {
    use abi_stable::std_types::{RSlice, RStr};

    use super::*;
    use crate::{envelope, HostServices, HostServices_TO, Identity, LogLevel, Pruned, Rows};

    /// Passes envelopes whose `text` holds the `keyword` setting, and
    /// returns the setting from `process` and `run_job`.
    struct Keyword;

    impl Handler for Keyword {
        fn name(&self) -> &str {
            "keyword"
        }
        fn event_types(&self) -> &[&str] {
            &["note"]
        }
        fn filter(&self, env: &Envelope, ctx: &FilterContext<'_>) -> bool {
            let keyword = ctx.settings().str_or("keyword", "").unwrap_or("");
            env.str("text").is_some_and(|t| t.contains(keyword))
        }
        fn process(
            &self,
            _: &Envelope,
            ctx: &mut Context<'_>,
        ) -> Result<Vec<Envelope>, PluginError> {
            Ok(vec![
                envelope! { "keyword" => ctx.settings().str_or("keyword", "-")? },
            ])
        }
        fn run_job(&self, ctx: &mut Context<'_>, _: &Value) -> Result<Vec<Envelope>, PluginError> {
            self.process(&Envelope::of_type("x"), ctx)
        }
    }

    /// A host that serves nothing: these calls only read their settings.
    struct NoHost;

    impl HostServices for NoHost {
        fn query(&mut self, _: RStr<'_>, _: RSlice<'_, Value>) -> RResult<Rows, RString> {
            RResult::RErr("no host".into())
        }
        fn execute(&mut self, _: RStr<'_>, _: RSlice<'_, Value>) -> RResult<u64, RString> {
            RResult::RErr("no host".into())
        }
        fn now_ms(&self) -> i64 {
            0
        }
        fn log(&self, _: LogLevel, _: RStr<'_>) {}
        fn identity(&self) -> Identity {
            Identity::default()
        }
        fn count(&mut self, _: RStr<'_>, _: u64) -> RResult<(), RString> {
            ROk(())
        }
        fn prune_dead_letters(&mut self, _: i64, _: u64) -> RResult<Pruned, RString> {
            ROk(Pruned::default())
        }
        fn create_event(
            &mut self,
            _: RStr<'_>,
            _: RStr<'_>,
            _: &Value,
            _: RSlice<'_, u8>,
        ) -> RResult<RVec<u8>, RString> {
            RResult::RErr("no host".into())
        }
    }

    #[test]
    fn settings_reach_filter_process_and_run_job_across_the_abi() {
        let abi = into_abi(Keyword);
        let settings = Value::map([("keyword", "apple")]);
        let apple = envelope! { "event_type" => "note", "text" => "an apple" };
        let pear = envelope! { "event_type" => "note", "text" => "a pear" };
        assert!(abi.filter(&apple, &settings).unwrap());
        assert!(!abi.filter(&pear, &settings).unwrap());
        assert!(abi.filter(&pear, Value::EMPTY_MAP).unwrap());

        let mut host = NoHost;
        let keyword = |out: RResult<RVec<Envelope>, RString>| {
            out.unwrap()[0].str("keyword").map(str::to_owned)
        };
        let ran = abi.process(
            &apple,
            HostServices_TO::from_ptr(&mut host, TD_Opaque),
            &settings,
        );
        assert_eq!(keyword(ran).as_deref(), Some("apple"));
        let ran = abi.run_job(
            HostServices_TO::from_ptr(&mut host, TD_Opaque),
            Value::EMPTY_MAP,
            Value::EMPTY_MAP,
        );
        assert_eq!(keyword(ran).as_deref(), Some("-"));
        // A setting of the wrong type is the call's error, naming it.
        let wrong = Value::map([("keyword", 3)]);
        let ran = abi.process(
            &apple,
            HostServices_TO::from_ptr(&mut host, TD_Opaque),
            &wrong,
        );
        assert_eq!(
            ran.unwrap_err().as_str(),
            "param 'keyword' must be text, got integer"
        );
    }

    #[test]
    fn panics_become_one_line_errors_with_their_location() {
        let r: RResult<(), RString> = guarded(|| panic!("kaboom {}", 7));
        let e = r.unwrap_err();
        assert!(e.starts_with("panicked: kaboom 7 (at "), "{e}");
        assert!(e.contains("handler.rs:"), "{e}");
        assert!(!e.contains('\n'));
        let ok: RResult<u8, RString> = guarded(|| Ok(1));
        assert_eq!(ok.unwrap(), 1);
        let err: RResult<u8, RString> = guarded(|| Err(PluginError::msg("nope")));
        assert_eq!(err.unwrap_err().as_str(), "nope");
    }
}
