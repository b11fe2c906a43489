//! Loading one plugin library, safely enough to do it again and again.
//!
//! Three traps shape this code (see `shared/notes/stack-facts.md`):
//! - abi_stable's `RootModule::load_from*` cache the first library forever,
//!   so we use `lib_header_from_path` + `init_root_module`, which do not;
//! - the dynamic loader hands back an already-open library for a path it has
//!   seen, so every load goes through a private copy with a unique name;
//! - a loaded library must never be overwritten, and is never unloaded
//!   (abi_stable does not unload, and `dlclose` of Rust code is unreliable):
//!   each generation stays mapped until the host exits.
//!
//! Every failure becomes one line naming the file and the cause.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use quiet_plugin_api::{
    abi_stable::library::{lib_header_from_path, LibraryError},
    PluginModRef, ABI_VERSION,
};

use crate::plugins::handler::LoadedHandler;

/// A plugin library that loaded and passed its checks.
pub struct LoadedPlugin {
    /// The file in the plugin folder it came from.
    pub file: PathBuf,
    /// The plugin's name.
    pub name: Arc<str>,
    /// The plugin's own version.
    pub version: String,
    /// The load generation that produced it.
    pub generation: u64,
    /// BLAKE3 of the file's bytes, in hex.
    pub hash: String,
    /// The plugin's SQL migrations, oldest first.
    pub migrations: Vec<&'static str>,
    /// Its handlers, in the order the plugin declared them.
    pub handlers: Vec<Arc<LoadedHandler>>,
}

/// Why a plugin file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file in the plugin folder.
    pub file: PathBuf,
    /// One line saying why.
    pub cause: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.cause)
    }
}

impl std::error::Error for LoadError {}

/// Whether `path` has the platform's shared-library extension.
pub fn is_plugin_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some(std::env::consts::DLL_EXTENSION)
}

/// Hashes a plugin file's bytes.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Loads the library at `file` as generation `generation`, through a private
/// copy in `cache_dir`.
pub fn load(file: &Path, cache_dir: &Path, generation: u64) -> Result<LoadedPlugin, LoadError> {
    let bytes = fs::read(file).map_err(|e| LoadError {
        file: file.to_owned(),
        cause: format!("cannot read: {e}"),
    })?;
    load_bytes(file, &bytes, cache_dir, generation)
}

/// Loads `bytes`, already read from `file`, as generation `generation`. The
/// bytes loaded are exactly the bytes the caller read and hashed.
pub fn load_bytes(
    file: &Path,
    bytes: &[u8],
    cache_dir: &Path,
    generation: u64,
) -> Result<LoadedPlugin, LoadError> {
    let fail = |cause: String| LoadError {
        file: file.to_owned(),
        cause,
    };
    let hash = hash_bytes(bytes);
    check_image(bytes).map_err(fail)?;

    fs::create_dir_all(cache_dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", cache_dir.display())))?;
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin");
    // Unique per attempt, not per generation: the dynamic loader would hand
    // back whatever it mapped under a name before, even a refused library.
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let copy = cache_dir.join(format!(
        "{stem}.g{generation}.{}.{}.{}",
        std::process::id(),
        ATTEMPT.fetch_add(1, Ordering::Relaxed),
        std::env::consts::DLL_EXTENSION
    ));
    fs::write(&copy, bytes).map_err(|e| fail(format!("cannot copy to {}: {e}", copy.display())))?;
    let loaded = load_copy(&copy, file, generation, hash);
    // Once mapped (or refused) the copy is not needed; the mapping stays.
    let _ = fs::remove_file(&copy);
    loaded.map_err(fail)
}

/// Checks that `bytes` is a whole shared library before the dynamic loader
/// sees it. The loader maps segments straight from the file, so a truncated
/// library (one still being written, say) would crash the host with SIGBUS
/// when a segment past the end of the file is touched.
fn check_image(bytes: &[u8]) -> Result<(), String> {
    use object::{Object, ObjectSegment};
    let image =
        object::File::parse(bytes).map_err(|e| format!("not a loadable shared library ({e})"))?;
    let len = bytes.len() as u64;
    for segment in image.segments() {
        let (offset, size) = segment.file_range();
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(format!(
                "not a loadable shared library (truncated: a segment needs bytes {offset}..{} of a {len}-byte file)",
                offset.saturating_add(size)
            ));
        }
    }
    Ok(())
}

fn load_copy(
    copy: &Path,
    file: &Path,
    generation: u64,
    hash: String,
) -> Result<LoadedPlugin, String> {
    let header = lib_header_from_path(copy).map_err(|e| describe(&e, copy))?;
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| describe(&e, copy))?;
    from_module(module, file, generation, hash)
}

/// Reads a plugin's root module, however it was obtained: from a library
/// (above) or in-process, as `quiet_plugin_test_support::TestHost` does.
pub fn from_module(
    module: PluginModRef,
    file: &Path,
    generation: u64,
    hash: String,
) -> Result<LoadedPlugin, String> {
    let name: Arc<str> = Arc::from(module.name().as_str());
    if name.is_empty() {
        return Err("the plugin has an empty name".into());
    }
    let handlers = (module.handlers())()
        .into_result()
        .map_err(|e| format!("making its handlers failed: {e}"))?;
    let handlers = handlers
        .into_iter()
        .map(|h| LoadedHandler::new(name.clone(), file.to_owned(), hash.clone(), h).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LoadedPlugin {
        file: file.to_owned(),
        version: module.version().as_str().to_owned(),
        migrations: module.migrations().iter().map(|m| m.as_str()).collect(),
        name,
        generation,
        hash,
        handlers,
    })
}

/// Turns abi_stable's errors (some run to 200 lines) into one line.
fn describe(err: &LibraryError, copy: &Path) -> String {
    let copy_name = copy.display().to_string();
    match err {
        LibraryError::OpenError { err, .. } => {
            let why = err.to_string().replace(&copy_name, "file");
            format!("not a loadable shared library ({})", first_line(&why))
        }
        LibraryError::GetSymbolError { .. } => {
            "not a quiet-host plugin: it exports no plugin root module (use quiet_plugin_api::export_plugin!)".into()
        }
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against plugin-api {actual_version}, but this host uses plugin-api {expected_version}; rebuild the plugin"
        ),
        LibraryError::AbiInstability(_) => format!(
            "built against an incompatible plugin-api (type layouts differ); rebuild it against plugin-api {ABI_VERSION}"
        ),
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            "built with an incompatible abi_stable version; rebuild it against this host's plugin-api".into()
        }
        LibraryError::RootModule { err, .. } => format!("plugin failed to initialise: {}", first_line(&err.to_string())),
        other => first_line(&other.to_string().replace(&copy_name, "file")).to_owned(),
    }
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_library_is_refused_before_dlopen() {
        // The running test binary is a whole ELF image; its first 16 KiB
        // are not, and mapping them would end in SIGBUS.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(check_image(&me), Ok(()));
        let err = check_image(&me[..16 * 1024]).unwrap_err();
        assert!(err.contains("not a loadable shared library"), "{err}");
    }

    #[test]
    fn garbage_and_truncated_files_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("garbage.so");
        fs::write(&file, b"this is not an ELF file at all, just text").unwrap();
        let err = load(&file, &dir.path().join("cache"), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(err.contains("not a loadable shared library"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // The private copy is gone.
        assert_eq!(
            fs::read_dir(dir.path().join("cache")).map_or(0, |d| d.count()),
            0
        );
    }
}
