//! The pre-gating network file that travels with a converted model.

use std::path::{Path, PathBuf};

use moe_runtime::gguf::Value;

use crate::error::ConvertError;

/// A pre-gating router network (ONNX, from scripts/train/train_pregate.py) referenced from the GGUF:
/// the key `moe_edge.pregate.onnx` names it relative to the GGUF's folder, where moe-run's
/// `--predictor pregate` looks for it. A file elsewhere is copied beside the output as
/// `<output stem>.pregate.onnx`, so the pair can be moved together.
pub struct PregateSidecar {
    src: PathBuf,
    dst: PathBuf,
    name: String,
}

impl PregateSidecar {
    pub fn new(out: &Path, onnx: &Path) -> Result<Self, ConvertError> {
        let meta = std::fs::metadata(onnx).map_err(|e| ConvertError::io(onnx, e))?;
        if !meta.is_file() || meta.len() == 0 {
            return Err(ConvertError::Input(format!(
                "--pregate {}: not a (non-empty) file; pass the .onnx that scripts/train/train_pregate.py wrote",
                onnx.display()
            )));
        }
        let out_dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let same_dir = match (onnx.parent(), std::fs::canonicalize(&out_dir)) {
            (Some(p), Ok(o)) => {
                let p = if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                };
                std::fs::canonicalize(p).is_ok_and(|p| p == o)
            }
            _ => false,
        };
        let name = if same_dir {
            onnx.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            format!("{stem}.pregate.onnx")
        };
        Ok(Self {
            src: onnx.to_path_buf(),
            dst: out_dir.join(&name),
            name,
        })
    }

    pub fn metadata(&self) -> (String, Value) {
        (
            moe_runtime::moe::predictor::PREGATE_KEY.into(),
            Value::String(self.name.clone()),
        )
    }

    /// Copies the network beside the output when it is not there yet; returns where it is.
    pub fn install(&self) -> Result<&Path, ConvertError> {
        let same = match (
            std::fs::canonicalize(&self.src),
            std::fs::canonicalize(&self.dst),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            std::fs::copy(&self.src, &self.dst).map_err(|e| ConvertError::io(&self.dst, e))?;
        }
        Ok(&self.dst)
    }
}
