//! Helpers the targets share: files the code under test must open by path.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// An anonymous in-memory file holding `data`, and a path that opens it
/// (`/proc/self/fd/N`): for code that maps a file by path, without touching the disk.
pub struct MemFile {
    fd: OwnedFd,
}

impl MemFile {
    pub fn new(data: &[u8]) -> Self {
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let raw = unsafe { libc::memfd_create(c"moe-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut f = std::fs::File::from(fd.try_clone().expect("dup"));
        f.write_all(data).expect("write to memfd");
        Self { fd }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// A scratch directory of this process (emptied for each input), for code that reads a folder.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// Splits `data` at NUL bytes into at most `n` parts (the last keeps any further NULs).
pub fn split_nul(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0).collect()
}

/// Runs the forward pass on one thread for the rest of the process. On rayon's pool of one per
/// core, the workers that wait for the next parallel section spin (`threads::run_on_pool`), and
/// under the fuzzer's coverage instrumentation that spinning took half of each input's time;
/// one thread also makes an input's run the same every time.
pub fn one_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| moe_runtime::threads::set_global_threads(Some(1)));
}
