//! An output file that exists under its name only once complete.
//!
//! The data goes to an unnamed file in the output's folder (`O_TMPFILE`: ext4, xfs, btrfs,
//! tmpfs), which is linked under a hidden name and renamed over the output when complete. A
//! conversion that fails (a full disk, a bad tensor) or is killed at any point before that
//! leaves nothing behind: the kernel frees an unnamed file with its last descriptor. Where the
//! file system has no `O_TMPFILE`, the data goes to a hidden `.NAME.PID.tmp` instead, removed on
//! failure; a killed run's is removed by the next conversion to the same path
//! ([`remove_stale`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;

pub struct PendingFile {
    file: File,
    /// The hidden temporary name when the file has one (no `O_TMPFILE`).
    named: Option<PathBuf>,
}

/// A hidden name beside `out`, unique to this process.
pub(crate) fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    out.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn parent(out: &Path) -> &Path {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Removes hidden temporary files of earlier conversions to `out` (`.NAME*.PID.tmp`, the
/// tuned conversion's f32 intermediate included) whose process is gone: what a killed run left.
pub fn remove_stale(out: &Path) {
    let Some(name) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let stem = Path::new(&name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Ok(dir) = std::fs::read_dir(parent(out)) else {
        return;
    };
    for entry in dir.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix('.') else {
            continue;
        };
        if !(rest.starts_with(&name) || rest.starts_with(&format!("{stem}.f32.gguf"))) {
            continue;
        }
        let Some(pid) = rest
            .strip_suffix(".tmp")
            .and_then(|r| r.rsplit('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl PendingFile {
    /// An unnamed file in `out`'s folder (or a hidden named one, see the module docs).
    pub fn beside(out: &Path) -> Result<Self, ConvertError> {
        let dir = parent(out);
        let unnamed = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o644)
            .open(dir);
        match unnamed {
            Ok(file) => Ok(Self { file, named: None }),
            Err(_) => {
                let tmp = temp_path(out);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&tmp)
                    .map_err(|e| ConvertError::io(&tmp, e))?;
                Ok(Self {
                    file,
                    named: Some(tmp),
                })
            }
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// A path that opens this file while it is pending (`/proc/self/fd/N` for an unnamed one).
    pub fn path(&self) -> PathBuf {
        match &self.named {
            Some(p) => p.clone(),
            None => PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd())),
        }
    }

    /// Gives the complete file its name `out` (replacing what was there).
    pub fn commit(mut self, out: &Path) -> Result<(), ConvertError> {
        let named = match self.named.take() {
            Some(p) => p,
            None => {
                let tmp = temp_path(out);
                let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL");
                let fd_path = cstr(&self.path());
                let to = cstr(&tmp);
                // SAFETY: both paths are NUL-terminated strings that outlive the call.
                let r = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        fd_path.as_ptr(),
                        libc::AT_FDCWD,
                        to.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if r != 0 {
                    return Err(ConvertError::io(&tmp, io::Error::last_os_error()));
                }
                tmp
            }
        };
        if let Err(e) = std::fs::rename(&named, out) {
            let _ = std::fs::remove_file(&named);
            return Err(ConvertError::io(out, e));
        }
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(p) = &self.named {
            let _ = std::fs::remove_file(p);
        }
    }
}
