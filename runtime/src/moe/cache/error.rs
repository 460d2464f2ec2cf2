//! What can go wrong in the expert cache.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("expert cache: cannot open {path}: {cause}")]
    Open { path: String, cause: io::Error },
    /// A read of the expert failed: the request that needed it fails with this error; the
    /// cache stays usable, and a later request reads the expert again. The I/O error is part of
    /// the message (not a `source()`, which would print it twice in an error chain).
    #[error("reading expert {expert} of layer {layer} from {} failed: {cause}", .path.display())]
    Read {
        layer: u32,
        expert: u32,
        path: PathBuf,
        /// Shared by every request waiting for that read.
        cause: Arc<io::Error>,
    },
    #[error("{0}")]
    Budget(String),
}
