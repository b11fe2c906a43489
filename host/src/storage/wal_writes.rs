//! The WAL written in large pieces per commit, instead of two writes per
//! page.
//!
//! SQLite appends each WAL frame with two writes: its 24-byte header, then
//! its page. A catch-up commits a thousand events at a time, about 700
//! frames, so 1,400 system calls, and the kernel's per-call work (locking,
//! looking up and dirtying the page-cache folio twice per frame) was a
//! quarter of the engine thread's time. This module registers a VFS,
//! [`VFS_NAME`], that wraps the platform's default one and, for WAL files
//! only, gathers appended frames in memory and writes them with a few large
//! calls (under 128 KiB each: about 25 for such a commit).
//!
//! **When gathered frames reach the file.** Other connections learn of new
//! frames only from the WAL index, which SQLite updates after the commit
//! frame is written. So the buffer is written out as soon as a commit
//! frame's page has been added to it (the frame header's "database size"
//! field is non-zero only in commit frames), and its error, if any, fails
//! the commit as a failed `write` would. Anything else that could look at
//! the file first writes the buffer out: a read (SQLite reads back frames
//! it spilled), a size query, a truncation, a sync, a file control, and
//! closing. A transaction that never commits leaves frames nobody reads.
//!
//! **Only appends are gathered.** SQLite also writes inside the log it has
//! already written: the WAL header at offset 0 when the log restarts, a
//! page overwritten in place, and frame headers rewritten with new
//! checksums after the commit frame. Those go straight to the file, after
//! the buffer, so a rewritten commit header is never left waiting.
//!
//! Durability is unchanged: nothing is buffered past the point where the
//! commit returns, and with `synchronous = NORMAL` SQLite does not sync the
//! WAL at commit anyway.

use std::ffi::{c_int, c_void, CStr};
use std::mem::{align_of, size_of};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections open the database with to get gathered WAL writes.
pub const VFS_NAME: &CStr = c"quiet-wal";

/// Gathered bytes written out even without a commit, to bound the memory.
const FLUSH_AT: usize = 1 << 20;

/// The most one call of the unix VFS's `xWrite` writes: it masks the
/// length to 17 bits (`seekAndWriteFd`), so larger buffers go in pieces.
const WRITE_AT_MOST: usize = (1 << 17) - 1;

/// The WAL header's size: SQLite writes it at offset 0 when the log starts.
const WAL_HEADER: i64 = 32;

/// Whether `data` is a commit frame's header: 24 bytes whose second
/// big-endian word, the database's size in pages after the commit, is
/// non-zero (it is zero in every other frame).
fn is_commit_header(data: &[u8]) -> bool {
    data.len() == 24 && data[4..8] != [0; 4]
}

/// Registers [`VFS_NAME`] (once per process) and returns its name, or the
/// SQLite error code if there is no default VFS to wrap.
pub fn register() -> Result<&'static CStr, c_int> {
    static REGISTERED: OnceLock<Result<(), c_int>> = OnceLock::new();
    (*REGISTERED.get_or_init(|| unsafe { register_once() })).map(|()| VFS_NAME)
}

/// The wrapped VFS, set once by [`register`].
static INNER: OnceLock<Vfs> = OnceLock::new();

/// A `*mut sqlite3_vfs` that may live in a static: SQLite's VFS objects are
/// immutable once registered and are shared by every thread.
struct Vfs(*mut ffi::sqlite3_vfs);
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

unsafe fn register_once() -> Result<(), c_int> {
    let rc = ffi::sqlite3_initialize();
    if rc != ffi::SQLITE_OK {
        return Err(rc);
    }
    let inner = ffi::sqlite3_vfs_find(ptr::null());
    if inner.is_null() {
        return Err(ffi::SQLITE_ERROR);
    }
    let _ = INNER.set(Vfs(inner));
    // Every method but `xOpen` is the inner VFS's own, and `pAppData` is
    // its too, so they behave as they would when called with `inner`.
    let mut vfs = ptr::read(inner);
    vfs.zName = VFS_NAME.as_ptr();
    vfs.pNext = ptr::null_mut();
    vfs.szOsFile = (WalFile::INNER_OFFSET + (*inner).szOsFile as usize) as c_int;
    vfs.xOpen = Some(open);
    // SQLite keeps the pointer for the life of the process.
    let vfs = Box::into_raw(Box::new(vfs));
    match ffi::sqlite3_vfs_register(vfs, 0) {
        ffi::SQLITE_OK => Ok(()),
        rc => Err(rc),
    }
}

/// A WAL file: SQLite's file object, then the buffer, then (at
/// [`WalFile::INNER_OFFSET`]) the inner VFS's file object.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    /// Appended bytes not yet written, which belong at `start`.
    buf: Vec<u8>,
    start: i64,
    /// Where the log's next frame goes: the end of what was appended.
    end: i64,
    /// The last write was a commit frame's header: its page ends the commit.
    commit_header: bool,
}

impl WalFile {
    const INNER_OFFSET: usize = size_of::<WalFile>().next_multiple_of(16);

    unsafe fn from<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
        &mut *file.cast::<WalFile>()
    }

    fn inner(&mut self) -> *mut ffi::sqlite3_file {
        unsafe {
            ptr::from_mut(self)
                .cast::<u8>()
                .add(Self::INNER_OFFSET)
                .cast()
        }
    }

    fn methods(&mut self) -> &ffi::sqlite3_io_methods {
        unsafe { &*(*self.inner()).pMethods }
    }

    /// Writes out the gathered bytes.
    fn flush(&mut self) -> c_int {
        if self.buf.is_empty() {
            return ffi::SQLITE_OK;
        }
        let write = self.methods().xWrite.expect("xWrite");
        let inner = self.inner();
        let mut rc = ffi::SQLITE_OK;
        let mut offset = self.start;
        for piece in self.buf.chunks(WRITE_AT_MOST) {
            rc = unsafe { write(inner, piece.as_ptr().cast(), piece.len() as c_int, offset) };
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += piece.len() as i64;
        }
        self.buf.clear();
        if self.buf.capacity() > FLUSH_AT * 2 {
            self.buf.shrink_to(FLUSH_AT);
        }
        rc
    }

    fn write(&mut self, data: &[u8], offset: i64) -> c_int {
        let appends = offset == self.end && offset >= WAL_HEADER;
        if !appends {
            // The header of a new log, or a write inside the log already
            // written: straight to the file, after what came before it.
            let rc = self.flush();
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            let write = self.methods().xWrite.expect("xWrite");
            let rc = unsafe {
                write(
                    self.inner(),
                    data.as_ptr().cast(),
                    data.len() as c_int,
                    offset,
                )
            };
            if offset == 0 || offset > self.end {
                // A new log, or one another process has added to.
                self.end = offset + data.len() as i64;
            }
            self.commit_header = is_commit_header(data);
            return rc;
        }
        if self.buf.is_empty() {
            self.start = offset;
        }
        self.buf.extend_from_slice(data);
        self.end += data.len() as i64;
        let ends_commit = self.commit_header;
        self.commit_header = is_commit_header(data);
        if ends_commit || self.buf.len() >= FLUSH_AT {
            return self.flush();
        }
        ffi::SQLITE_OK
    }
}

/// The methods of a WAL file; all but `xWrite` write out the buffer first
/// where the file's contents matter, then call the inner file's own.
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner = INNER.get().expect("registered").0;
    let inner_open = (*inner).xOpen.expect("xOpen");
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not a WAL: the inner VFS's own file object, in the same memory.
        return inner_open(inner, name, file, flags, out_flags);
    }
    debug_assert_eq!(file.align_offset(align_of::<WalFile>()), 0);
    let wal = file.cast::<WalFile>();
    ptr::write(
        wal,
        WalFile {
            base: ffi::sqlite3_file {
                pMethods: ptr::null(),
            },
            buf: Vec::new(),
            start: 0,
            end: 0,
            commit_header: false,
        },
    );
    let inner_file = (*wal).inner();
    (*inner_file).pMethods = ptr::null();
    let rc = inner_open(inner, name, inner_file, flags, out_flags);
    if rc == ffi::SQLITE_OK {
        (*wal).base.pMethods = &WAL_METHODS;
        return rc;
    }
    // SQLite calls no method of a file whose `pMethods` is null, so close
    // the inner file here if its open left one to close.
    if let Some(close) = (*inner_file).pMethods.as_ref().and_then(|m| m.xClose) {
        close(inner_file);
    }
    ptr::drop_in_place(wal);
    rc
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let wal = WalFile::from(file);
    let flushed = wal.flush();
    let close = wal.methods().xClose.expect("xClose");
    let closed = close(wal.inner());
    ptr::drop_in_place(file.cast::<WalFile>());
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let data = std::slice::from_raw_parts(data.cast::<u8>(), amount as usize);
    WalFile::from(file).write(data, offset)
}

/// Declares a method that writes out the buffer, then calls the inner
/// file's method of the same name with the same arguments.
macro_rules! flushing {
    ($name:ident, $method:ident $(, $arg:ident: $ty:ty)*) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            let wal = WalFile::from(file);
            let rc = wal.flush();
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            let method = wal.methods().$method.expect(stringify!($method));
            method(wal.inner() $(, $arg)*)
        }
    };
}

/// Declares a method that calls the inner file's own, leaving the buffer.
macro_rules! passing {
    ($name:ident, $method:ident $(, $arg:ident: $ty:ty)*) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            let wal = WalFile::from(file);
            let method = wal.methods().$method.expect(stringify!($method));
            method(wal.inner() $(, $arg)*)
        }
    };
}

flushing!(read, xRead, data: *mut c_void, amount: c_int, offset: ffi::sqlite3_int64);
flushing!(sync, xSync, flags: c_int);
flushing!(file_size, xFileSize, size: *mut ffi::sqlite3_int64);
flushing!(file_control, xFileControl, op: c_int, arg: *mut c_void);
passing!(lock, xLock, level: c_int);
passing!(unlock, xUnlock, level: c_int);
passing!(check_reserved_lock, xCheckReservedLock, out: *mut c_int);
passing!(sector_size, xSectorSize);
passing!(device_characteristics, xDeviceCharacteristics);

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    let wal = WalFile::from(file);
    let rc = wal.flush();
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    wal.end = wal.end.min(size);
    let truncate = wal.methods().xTruncate.expect("xTruncate");
    truncate(wal.inner(), size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};
    use std::path::Path;

    fn gathering(path: &Path) -> Connection {
        let conn =
            Connection::open_with_flags_and_vfs(path, OpenFlags::default(), register().unwrap())
                .unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);",
        )
        .unwrap();
        conn
    }

    /// A connection on the platform's own VFS, which reads the files as
    /// they are on disk.
    fn plain(path: &Path) -> Connection {
        Connection::open(path).unwrap()
    }

    fn rows(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(length(v)), 0) FROM t",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    fn insert(conn: &Connection, from: i64, n: i64, len: usize) {
        let tx = conn.unchecked_transaction().unwrap();
        for k in from..from + n {
            tx.execute(
                "INSERT INTO t (k, v) VALUES (?1, ?2)",
                (k, vec![k as u8; len]),
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// What a crash would leave: the database and its WAL as they are on
    /// disk now, opened afresh (SQLite rebuilds the index from the WAL,
    /// checking every frame's checksum).
    fn after_crash(path: &Path) -> Connection {
        let copy = path.with_extension("copy");
        std::fs::copy(path, &copy).unwrap();
        let wal = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push("-wal");
            std::path::PathBuf::from(name)
        };
        std::fs::copy(wal(path), wal(&copy)).unwrap();
        let conn = plain(&copy);
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        conn
    }

    #[test]
    fn each_commit_is_on_disk_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = gathering(&path);
        let reader = plain(&path);
        for round in 0..20 {
            // Small commits, and ones far over a write's 128 KiB and the
            // buffer's 1 MiB.
            let len = if round % 2 == 0 { 100 } else { 3000 };
            insert(&writer, round * 1000, 1000, len);
            let expected = rows(&writer);
            assert_eq!(rows(&reader), expected, "round {round}");
            assert_eq!(rows(&after_crash(&path)), expected, "round {round}");
        }
    }

    #[test]
    fn spilled_overwritten_and_rolled_back_pages_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = gathering(&path);
        // A cache of 20 pages spills to the WAL mid-transaction; updating
        // the spilled rows again overwrites frames in place, and the commit
        // then rewrites the checksums of the frames after them.
        writer.execute_batch("PRAGMA cache_size = 20").unwrap();
        insert(&writer, 0, 2000, 500);
        let tx = writer.unchecked_transaction().unwrap();
        for pass in 0..3u8 {
            tx.execute(
                "UPDATE t SET v = zeroblob(400 + ?1) WHERE k % 3 = 0",
                [pass],
            )
            .unwrap();
            tx.execute_batch("SAVEPOINT s").unwrap();
            tx.execute("UPDATE t SET v = zeroblob(10) WHERE k % 5 = 0", [])
                .unwrap();
            tx.execute_batch("ROLLBACK TO s; RELEASE s").unwrap();
        }
        tx.commit().unwrap();
        // The commit's rewritten frame headers are on disk as it returns.
        let expected = rows(&writer);
        assert_eq!(rows(&plain(&path)), expected);
        assert_eq!(rows(&after_crash(&path)), expected);
        insert(&writer, 5000, 500, 700);
        let expected = rows(&writer);
        assert_eq!(rows(&after_crash(&path)), expected);
    }

    #[test]
    fn a_restarted_log_is_gathered_and_recovered_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = gathering(&path);
        for round in 0..5 {
            insert(&writer, round * 100, 100, 2000);
            // Copies everything back, so the next commit restarts the log
            // at its start, over the frames of this one.
            writer
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .unwrap();
        }
        let expected = rows(&writer);
        assert_eq!(expected.0, 500);
        assert_eq!(rows(&after_crash(&path)), expected);
    }
}
