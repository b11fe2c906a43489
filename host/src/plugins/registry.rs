//! [`Registry`]: one immutable generation of loaded plugins and the index the
//! pipeline and scheduler look handlers up in.
//!
//! A reload builds a new `Registry` and swaps it in with one atomic store
//! ([`Plugins::swap`]). Work that started on the old generation holds an
//! `Arc` to it and finishes there; the next piece of work sees the new one.
//! So no envelope is lost in a swap and none is handled twice.
//!
//! A plugin build the watchdog disabled ([`Plugins::disable`]) is left out
//! of every generation swapped in afterwards, whoever builds it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use arc_swap::ArcSwap;

use crate::{
    plugins::{call_budget::CallSite, handler::LoadedHandler, loader::LoadedPlugin},
    storage::db,
};

/// One generation of loaded plugins.
#[derive(Default)]
pub struct Registry {
    /// The generation number; 0 before the first load.
    pub generation: u64,
    /// Loaded plugins, ordered by file name.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    by_name: HashMap<String, Arc<LoadedHandler>>,
    by_type: HashMap<String, Vec<Arc<LoadedHandler>>>,
    any_type: Vec<Arc<LoadedHandler>>,
}

impl Registry {
    /// Indexes `plugins`, which must already be free of conflicts (see
    /// [`Registry::conflict`]) and sorted by file name.
    pub fn new(generation: u64, plugins: Vec<Arc<LoadedPlugin>>) -> Self {
        let mut reg = Registry {
            generation,
            ..Default::default()
        };
        let ordered: Vec<Arc<LoadedHandler>> = plugins
            .iter()
            .flat_map(|p| p.handlers.iter().cloned())
            .collect();
        for h in &ordered {
            reg.by_name.insert(h.name.clone(), h.clone());
        }
        // Each type's list keeps the global order: plugins by file name, then
        // handlers in the order the plugin declared them; `*` subscribers sit
        // in that same order among the specific ones.
        let types: Vec<&String> = ordered
            .iter()
            .flat_map(|h| h.event_types.iter())
            .filter(|t| *t != quiet_plugin_api::ANY_EVENT_TYPE)
            .collect();
        for t in types {
            let list = ordered
                .iter()
                .filter(|h| h.subscribes_to_all() || h.event_types.contains(t))
                .cloned()
                .collect();
            reg.by_type.insert(t.clone(), list);
        }
        reg.any_type = ordered
            .into_iter()
            .filter(|h| h.subscribes_to_all())
            .collect();
        reg.plugins = plugins;
        reg
    }

    /// If `candidate` clashes with a plugin in `others` (same plugin name or
    /// same handler name), says how.
    pub fn conflict(candidate: &LoadedPlugin, others: &[Arc<LoadedPlugin>]) -> Option<String> {
        for other in others {
            if other.name == candidate.name {
                return Some(format!(
                    "plugin name '{}' is already taken by {}",
                    candidate.name,
                    other.file.display()
                ));
            }
            for h in &candidate.handlers {
                if other.handlers.iter().any(|o| o.name == h.name) {
                    return Some(format!(
                        "handler '{}' is already provided by plugin '{}' ({})",
                        h.name,
                        other.name,
                        other.file.display()
                    ));
                }
            }
        }
        None
    }

    /// The handler called `name`.
    pub fn handler(&self, name: &str) -> Option<&Arc<LoadedHandler>> {
        self.by_name.get(name)
    }

    /// The handlers subscribed to `event_type`, in pipeline order.
    pub fn subscribers(&self, event_type: &str) -> &[Arc<LoadedHandler>] {
        self.by_type.get(event_type).unwrap_or(&self.any_type)
    }

    /// This generation without the disabled builds, as generation
    /// `generation`.
    fn without(&self, disabled: &[Disabled], generation: u64) -> Registry {
        let kept = self
            .plugins
            .iter()
            .filter(|p| !disabled.iter().any(|d| d.is(&p.file, &p.hash)))
            .cloned()
            .collect();
        Registry::new(generation, kept)
    }
}

/// A plugin build the watchdog disabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disabled {
    /// The file in the plugin folder.
    pub file: PathBuf,
    /// The build's hash; another build of the file loads again.
    pub hash: String,
    /// The plugin's name.
    pub plugin: String,
    /// Its handlers, which stop with it.
    pub handlers: Vec<String>,
    /// Why, in one line.
    pub reason: String,
    /// When.
    pub at_ms: i64,
}

impl Disabled {
    /// Whether this is the build `hash` of `file`.
    pub fn is(&self, file: &Path, hash: &str) -> bool {
        self.file == file && self.hash == hash
    }
}

/// The current generation, shared by every thread of the host, and the
/// builds disabled since the host started.
#[derive(Default, Clone)]
pub struct Plugins {
    current: Arc<ArcSwap<Registry>>,
    /// Also serialises swaps, so that none brings a disabled build back.
    disabled: Arc<Mutex<Vec<Disabled>>>,
}

impl Plugins {
    /// The current generation; hold it for the length of one unit of work.
    pub fn current(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Makes `next`, less any disabled build, the current generation.
    pub fn swap(&self, next: Registry) {
        let disabled = self.lock();
        let next = match next
            .plugins
            .iter()
            .any(|p| disabled.iter().any(|d| d.is(&p.file, &p.hash)))
        {
            true => next.without(&disabled, next.generation),
            false => next,
        };
        self.current.store(Arc::new(next));
    }

    /// Disables the build of the plugin that `site` belongs to, for
    /// `reason`: at once, a new generation without it becomes current.
    pub fn disable(&self, site: &CallSite, reason: String) {
        let mut disabled = self.lock();
        let current = self.current();
        let handlers = current
            .plugins
            .iter()
            .find(|p| p.file == site.file && p.hash == site.hash)
            .map_or_else(
                || vec![site.handler.clone()],
                |p| p.handlers.iter().map(|h| h.name.clone()).collect(),
            );
        disabled.push(Disabled {
            file: site.file.clone(),
            hash: site.hash.clone(),
            plugin: site.plugin.to_string(),
            handlers,
            reason,
            at_ms: db::now_ms(),
        });
        let next = current.without(&disabled, current.generation + 1);
        self.current.store(Arc::new(next));
    }

    /// Every build disabled so far, oldest first.
    pub fn disabled(&self) -> Vec<Disabled> {
        self.lock().clone()
    }

    /// Why the handler called `handler` is disabled, if it is.
    pub fn why_disabled(&self, handler: &str) -> Option<String> {
        self.lock()
            .iter()
            .rev()
            .find(|d| d.handlers.iter().any(|h| h == handler))
            .map(|d| format!("plugin '{}' {}", d.plugin, d.reason))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Disabled>> {
        self.disabled.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::{into_abi, Handler};

    use super::*;

    struct Named(&'static str);

    impl Handler for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn event_types(&self) -> &[&str] {
            &["x"]
        }
    }

    fn build(name: &'static str, hash: &str) -> Arc<LoadedPlugin> {
        let file = PathBuf::from(format!("/plugins/lib{name}.so"));
        let handler = LoadedHandler::new(
            name.into(),
            file.clone(),
            hash.into(),
            into_abi(Named(name)),
        )
        .unwrap();
        Arc::new(LoadedPlugin {
            file,
            name: name.into(),
            version: "1".into(),
            generation: 1,
            hash: hash.into(),
            migrations: vec![],
            handlers: vec![Arc::new(handler)],
        })
    }

    #[test]
    fn a_disabled_build_stays_out_of_every_later_generation_and_another_build_loads() {
        let plugins = Plugins::default();
        plugins.swap(Registry::new(1, vec![build("a", "h1"), build("b", "h1")]));
        let site = plugins.current().handler("a").unwrap().site().clone();
        plugins.disable(&site, "exceeded the budget".into());
        let now = plugins.current();
        assert_eq!(now.generation, 2);
        assert!(now.handler("a").is_none() && now.handler("b").is_some());
        assert_eq!(now.subscribers("x").len(), 1);
        assert_eq!(
            plugins.why_disabled("a").as_deref(),
            Some("plugin 'a' exceeded the budget")
        );
        assert_eq!(plugins.why_disabled("b"), None);

        // A reload that still holds the build does not bring it back.
        plugins.swap(Registry::new(3, vec![build("a", "h1"), build("b", "h1")]));
        assert!(plugins.current().handler("a").is_none());
        assert_eq!(plugins.current().generation, 3);

        // Another build of the same file does load.
        plugins.swap(Registry::new(4, vec![build("a", "h2"), build("b", "h1")]));
        assert!(plugins.current().handler("a").is_some());
        assert_eq!(plugins.disabled().len(), 1);
    }
}
