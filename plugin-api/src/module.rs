//! The root module every plugin library exports, and [`export_plugin!`](crate::export_plugin).
//!
//! The root module is an abi_stable *prefix type*: later versions of this
//! crate may append fields after the last one, and a host built with them
//! still loads plugins built before. Anything else that changes the layout of
//! a type crossing the boundary makes old plugins fail to load with a clear
//! error instead of crashing; abi_stable checks every layout at load time.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::HandlerBox;

/// The version of this interface crate. A host loads plugins built against a
/// compatible version of it (for 0.x: the same minor version).
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A plugin library's root module. Build it with [`export_plugin!`](crate::export_plugin).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// The plugin's name, unique among the plugins a host loads.
    pub name: RStr<'static>,
    /// The plugin's own version, for `quiet-host status`.
    pub version: RStr<'static>,
    /// SQL migrations that create and change the plugin's own tables, oldest
    /// first. The host runs each one once, in order, in a transaction, and
    /// records how many it has run for this plugin name. Never edit or reorder
    /// a migration that has shipped: append a new one.
    pub migrations: RSlice<'static, RStr<'static>>,
    /// Makes the plugin's handlers. Called once per load.
    #[sabi(last_prefix_field)]
    pub handlers: extern "C" fn() -> RResult<RVec<HandlerBox>, RString>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "quiet_plugin";
    const NAME: &'static str = "quiet_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Declares a plugin library's root module.
///
/// Put it once in the plugin crate's `lib.rs`; the crate must have
/// `crate-type = ["cdylib"]` (add `"rlib"` if tests or benches link it too).
///
/// ```ignore
/// quiet_plugin_api::export_plugin! {
///     name: "retention",
///     version: env!("CARGO_PKG_VERSION"),
///     migrations: ["CREATE TABLE IF NOT EXISTS retention_runs (at_ms INTEGER NOT NULL)"],
///     handlers: [Retention],
/// }
/// ```
///
/// It also defines `pub fn plugin_module() -> PluginModRef`, which test
/// harnesses call to use the plugin in-process, without `dlopen`.
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        version: $version:expr,
        $(migrations: [$($migration:expr),* $(,)?],)?
        handlers: [$($handler:expr),+ $(,)?] $(,)?
    ) => {
        /// This plugin's root module, built in-process (see `export_plugin!`).
        pub fn plugin_module() -> $crate::PluginModRef {
            static MIGRATIONS: &[$crate::__private::RStr<'static>] =
                &[$($($crate::__private::RStr::from_str($migration)),*)?];
            extern "C" fn handlers() -> $crate::__private::HandlersResult {
                $crate::__private::make_handlers(|| vec![$($crate::into_abi($handler)),+])
            }
            $crate::__private::module($name, $version, MIGRATIONS, handlers)
        }

        // The symbol abi_stable's loader looks up; its name is checked by a
        // test in quiet-plugin-api. Written out here so that plugin crates
        // need no direct dependency on abi_stable.
        #[no_mangle]
        #[doc(hidden)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader = {
            extern "C" fn erased() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(plugin_module)
            }
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::PluginModRef>(
                    erased,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[doc(hidden)]
pub mod __private {
    pub use abi_stable::library::{
        __call_root_module_loader as call_root_module_loader, CheckTypeLayout, LibHeader,
        RootModuleResult,
    };
    pub use abi_stable::std_types::RStr;

    use abi_stable::{
        prefix_type::WithMetadata,
        std_types::{RResult, RSlice, RString, RVec},
    };

    use super::{PluginMod, PluginModRef};
    use crate::HandlerBox;

    pub type HandlersResult = RResult<RVec<HandlerBox>, RString>;

    pub fn make_handlers(f: impl FnOnce() -> Vec<HandlerBox>) -> HandlersResult {
        crate::handler::guarded(|| Ok(RVec::from(f())))
    }

    pub fn module(
        name: &'static str,
        version: &'static str,
        migrations: &'static [RStr<'static>],
        handlers: extern "C" fn() -> HandlersResult,
    ) -> PluginModRef {
        let module = PluginMod {
            name: RStr::from_str(name),
            version: RStr::from_str(version),
            migrations: RSlice::from_slice(migrations),
            handlers,
        };
        // Leaked once per load: the module lives as long as the library,
        // which is never unloaded.
        let leaked: &'static WithMetadata<PluginMod> =
            Box::leak(Box::new(WithMetadata::new(module)));
        PluginModRef(leaked.static_as_prefix())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exported_symbol_name_matches_abi_stable() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
