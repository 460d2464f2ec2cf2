//! The UNIX socket: created with a chosen mode and group in a directory the daemon owns; a stale
//! socket from a crashed run is replaced, a live one is never taken over; removed on exit only
//! if it is still ours. Also systemd's readiness notification (`Type=notify`).

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Group, Uid};
use tracing::{info, warn};

/// The bound socket; dropping it removes the socket file if it is still the one we created.
#[derive(Debug)]
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    id: (u64, u64),
}

/// Resolves `--socket-group`: a group name or a numeric id.
pub fn resolve_group(group: &str) -> Result<Gid> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => bail!("--socket-group {group}: no such group"),
        Err(e) => bail!("--socket-group {group}: cannot look the group up: {e}"),
    }
}

pub fn bind(path: &Path, mode: u32, group: Option<Gid>) -> Result<BoundSocket> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    prepare_dir(&dir, group)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket; refusing to replace it (choose another --socket)",
            path.display()
        ),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => bail!(
                "another process is serving on {} (a connection to it succeeded); not taking \
                 over a live socket: stop that daemon first or choose another --socket",
                path.display()
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                warn!(socket = %path.display(), "replacing a stale socket left by an earlier run");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            Err(e) => bail!(
                "{} exists and cannot be probed ({e}); not replacing it",
                path.display()
            ),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => bail!("cannot inspect {}: {e}", path.display()),
    }
    // Bound, listening and given its mode under a private name first (a short one: a socket
    // path has at most 107 bytes), then linked into place (link fails if the name exists, so no
    // live socket is ever replaced). A client that sees the path can connect at once; binding
    // the path itself left a moment between bind and listen when connecting failed with
    // "connection refused" (seen under qemu-user).
    let private = dir.join(format!(".{}.bind", std::process::id()));
    let _ = std::fs::remove_file(&private);
    let listener =
        UnixListener::bind(&private).with_context(|| format!("binding {}", private.display()))?;
    let placed = (|| -> Result<()> {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting mode {mode:o} on {}", private.display()))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&private, None, Some(gid.as_raw()))
                .with_context(|| format!("giving {} to group {gid}", private.display()))?;
        }
        match std::fs::hard_link(&private, path) {
            // A file system without hard links: move it (the path was free a moment ago).
            Err(e) if e.kind() != ErrorKind::AlreadyExists => std::fs::rename(&private, path),
            linked => linked,
        }
        .with_context(|| {
            format!(
                "binding {} (if another moed just started on it, it holds the socket now)",
                path.display()
            )
        })
    })();
    let _ = std::fs::remove_file(&private);
    placed?;
    let meta = std::fs::symlink_metadata(path)?;
    info!(socket = %path.display(), mode = format!("{mode:o}"), group = ?group.map(|g| g.as_raw()), "listening");
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
    })
}

/// The socket's directory: created (mode 0750, with the socket's group) if missing, and required
/// to belong to the daemon's user and not be writable by others, so no one else can replace
/// the socket.
fn prepare_dir(dir: &Path, group: Option<Gid>) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(dir, None, Some(gid.as_raw()))
                .with_context(|| format!("giving {} to group {gid}", dir.display()))?;
        }
    }
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("the socket directory {}", dir.display()))?;
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        bail!(
            "the socket directory {} belongs to uid {}, not to this daemon (uid {me}); put \
             --socket in a directory moed owns, such as /run/moed (systemd: RuntimeDirectory=moed)",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o002 != 0 {
        bail!(
            "the socket directory {} is writable by every user, who could replace the socket; \
             use a directory only moed can write, such as /run/moed",
            dir.display()
        );
    }
    Ok(())
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one this daemon created.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(socket = %self.path.display(), "could not remove the socket: {e}");
                }
            }
            _ => {}
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Tells systemd about our state (`READY=1`, `STOPPING=1`) when started with `Type=notify`.
pub fn sd_notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = addr.as_encoded_bytes();
    let sock = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            Ok(0)
        }
    } else {
        sock.send_to(state.as_bytes(), Path::new(&addr))
    };
    if let Err(e) = res {
        warn!("sd_notify({state}) failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_live_and_foreign_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/moed.sock");
        // Missing directory: created 0750.
        let s = bind(&path, 0o660, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        let dmeta = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dmeta.mode() & 0o777, 0o750);
        // Listening as soon as it exists, and the private name it was bound under is gone.
        UnixStream::connect(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["moed.sock"]);
        // Live: a second bind fails and leaves the socket alone.
        let err = bind(&path, 0o660, None).unwrap_err().to_string();
        assert!(err.contains("another process is serving"), "{err}");
        assert!(path.exists());
        // Stale: the listener is gone but the file is still there (as after a crash).
        drop(s);
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let s2 = bind(&path, 0o600, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        drop(s2);
        assert!(!path.exists());
        // Not a socket.
        std::fs::write(&path, "x").unwrap();
        let err = bind(&path, 0o660, None).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        // A world-writable directory is refused.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&open.join("s.sock"), 0o660, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("writable by every user"), "{err}");
    }

    #[test]
    fn remove_leaves_a_replaced_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let s = bind(&path, 0o660, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        drop(s);
        assert!(path.exists(), "a socket someone else created must stay");
    }

    #[test]
    fn groups() {
        assert_eq!(resolve_group("0").unwrap(), Gid::from_raw(0));
        assert_eq!(resolve_group("root").unwrap(), Gid::from_raw(0));
        assert!(resolve_group("no-such-group-moed").is_err());
    }
}
