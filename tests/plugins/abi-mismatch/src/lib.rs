//! Test-only plugin built against an incompatible plugin interface.
//!
//! It exports a root module under the same name and version as
//! quiet-plugin-api's, but with another layout, as a plugin built against a
//! diverged copy of the interface would. The host must refuse it with a
//! clear one-line error, not crash. (A cargo feature on quiet-plugin-api
//! would do the same, but features unify across a workspace build and would
//! change the host's own copy too.)
//!
//! Built with `QUIET_TEST_VARIANT=plugin-api-0.1`, it declares the interface
//! version before signed events instead, as a plugin left over from before
//! an upgrade does.

// abi_stable's derives expand to impls inside a const block.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics, export_root_module,
    library::RootModule,
    package_version_strings,
    prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings,
    std_types::{RStr, RString, RVec},
    StableAbi,
};

/// The diverged root module: `version` became a number and `handlers`
/// returns names only.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OtherPluginModRef)))]
pub struct OtherPluginMod {
    pub name: RStr<'static>,
    pub version: u32,
    #[sabi(last_prefix_field)]
    pub handlers: extern "C" fn() -> RVec<RString>,
}

impl RootModule for OtherPluginModRef {
    declare_root_module_statics! {OtherPluginModRef}
    const BASE_NAME: &'static str = "quiet_plugin";
    const NAME: &'static str = "quiet_plugin";
    const VERSION_STRINGS: VersionStrings = match option_env!("QUIET_TEST_VARIANT") {
        Some(v) => match v.as_bytes() {
            b"plugin-api-0.1" => VersionStrings::new("0.1.0"),
            _ => package_version_strings!(),
        },
        None => package_version_strings!(),
    };
}

extern "C" fn handlers() -> RVec<RString> {
    RVec::from(vec![RString::from("mismatch")])
}

#[export_root_module]
pub fn root() -> OtherPluginModRef {
    OtherPluginMod {
        name: RStr::from_str("abi_mismatch"),
        version: 1,
        handlers,
    }
    .leak_into_prefix()
}
