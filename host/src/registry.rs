//! [`Registry`]: one immutable generation of loaded plugins and the index the
//! pipeline and scheduler look handlers up in.
//!
//! A reload builds a new `Registry` and swaps it in with one atomic store
//! ([`Plugins::swap`]). Work that started on the old generation holds an
//! `Arc` to it and finishes there; the next piece of work sees the new one.
//! So no envelope is lost in a swap and none is handled twice.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;

use crate::{handler::LoadedHandler, loader::LoadedPlugin};

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
}

/// The current generation, shared by every thread of the host.
#[derive(Default, Clone)]
pub struct Plugins(Arc<ArcSwap<Registry>>);

impl Plugins {
    /// The current generation; hold it for the length of one unit of work.
    pub fn current(&self) -> Arc<Registry> {
        self.0.load_full()
    }

    /// Makes `next` the current generation.
    pub fn swap(&self, next: Registry) {
        self.0.store(Arc::new(next));
    }
}
