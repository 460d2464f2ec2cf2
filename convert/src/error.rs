//! The converter's one error type, below every other module.

use std::path::{Path, PathBuf};

use moe_runtime::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{0}")]
    Input(String),
    #[error("config.json: `{field}` {why}")]
    Config { field: String, why: String },
    #[error("the checkpoint has no tensor `{0}` (is the folder complete, and is config.json's model_type right?)")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} from config.json")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

impl ConvertError {
    pub fn io(path: &Path, cause: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            cause,
        }
    }
}
