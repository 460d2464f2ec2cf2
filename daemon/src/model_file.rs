//! The model file under a running daemon. Weights are read through a memory map of it, so a file
//! truncated while moed runs makes reads of the vanished pages raise SIGBUS (which would kill
//! the daemon without a word, mid-request), and a file rewritten in place changes the weights
//! under a running generation. moed guards against both:
//!
//! - a SIGBUS handler: a fault inside the model's map is answered by mapping a page of zeros
//!   there, so the read completes and the process survives, and the fault is noted; a fault
//!   anywhere else is a real crash and gets the default action;
//! - before and after every generation (and after every token, for the SIGBUS note) the mapped
//!   file's size and modification time are compared with the ones loaded.
//!
//! Either finding fails the request at hand with 500 `model_file_changed` and stops the daemon
//! (exit status 1, the reason in the log). The weights in memory can no longer be trusted, and
//! a reload belongs to the service manager: `Restart=on-failure` (targets/moed.service) starts
//! moed again on the new file, and a half-written one then fails to load with the loader's
//! error instead of serving wrong answers. A file *replaced* (renamed over, as moe-convert and
//! package managers do) is harmless: the old inode stays mapped and moed keeps serving it, and
//! logs that a restart would load the new one.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Once;

use nix::libc;
use tracing::warn;

static MAP_START: AtomicUsize = AtomicUsize::new(0);
static MAP_END: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static FAULTS: AtomicUsize = AtomicUsize::new(0);

/// The mapped model file and what it was when loaded.
pub struct ModelFile {
    path: PathBuf,
    /// The inode that is mapped (a handle of our own, for fstat).
    file: File,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    replaced_logged: AtomicBool,
}

/// Async-signal-safe: atomics, mmap and signal only.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if addr >= MAP_START.load(SeqCst) && addr < MAP_END.load(SeqCst) {
        let base = addr & !(PAGE.load(SeqCst) - 1);
        // SAFETY: replaces one page of the model's read-only map, which the file no longer
        // backs, with zeros; nothing else lives in that range.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                PAGE.load(SeqCst),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTS.fetch_add(1, SeqCst);
            return;
        }
    }
    // Not the model's map: the default action, when the faulting access repeats.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sysconf has no preconditions; the sigaction struct is zeroed, then filled.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, SeqCst);
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                warn!(
                    "cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

impl ModelFile {
    /// Watches `path`, mapped at `map`: installs the SIGBUS handler for that range.
    pub fn watch(path: &Path, map: &[u8]) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let m = file.metadata()?;
        MAP_START.store(map.as_ptr() as usize, SeqCst);
        MAP_END.store(map.as_ptr() as usize + map.len(), SeqCst);
        install_handler();
        Ok(Self {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            file,
            replaced_logged: AtomicBool::new(false),
        })
    }

    /// Whether a read of the map faulted (SIGBUS) since loading: cheap, for every token.
    pub fn faulted() -> bool {
        FAULTS.load(SeqCst) > 0
    }

    /// Ok while the mapped file is the one loaded; otherwise why the weights cannot be trusted.
    pub fn check(&self) -> Result<(), String> {
        let path = self.path.display();
        let restart = "moed stops; its service manager restarts it on the file as it is now";
        if Self::faulted() {
            return Err(format!(
                "the model file {path} was truncated while moed had it mapped (a read of it \
                 raised SIGBUS): {restart}"
            ));
        }
        let m = self
            .file
            .metadata()
            .map_err(|e| format!("the model file {path} cannot be checked: {e}: {restart}"))?;
        if m.len() != self.size || (m.mtime(), m.mtime_nsec()) != self.mtime {
            return Err(format!(
                "the model file {path} was modified in place while moed had it mapped ({} bytes \
                 when loaded, {} now): {restart}",
                self.size,
                m.len()
            ));
        }
        let same = std::fs::metadata(&self.path)
            .map(|p| (p.dev(), p.ino()) == (self.dev, self.ino))
            .unwrap_or(false);
        if !same && !self.replaced_logged.swap(true, SeqCst) {
            warn!(
                "the model file {path} was replaced or removed; moed keeps serving the one it \
                 loaded (restart it to load the new file)"
            );
        }
        Ok(())
    }
}
